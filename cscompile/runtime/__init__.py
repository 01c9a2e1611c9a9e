"""The embedded runtime: ONNX Runtime sessions, KV cache, decode loop, tokenizer.

Needs only numpy, onnxruntime, tokenizers and jinja2: no torch, no transformers.

>>> from cscompile import runtime
>>> model = runtime.load_text_model("~/.cache/cscompile/models/smollm2")  # doctest: +SKIP
>>> model.generate("Hello", runtime.GenerationConfig(max_new_tokens=8)).text  # doctest: +SKIP
>>> bundle = runtime.load("smollm2.csb")  # doctest: +SKIP
"""

from __future__ import annotations

from cscompile.decode.generate import (
    Generation,
    GenerationConfig,
    GenerationResult,
    GenerationStats,
    TextModel,
    TokenEvent,
    load_text_model,
    sample,
)
from cscompile.decode.session import DecoderSession, KVState
from cscompile.decode.spec import DecoderSpec
from cscompile.decode.tokenizer import Tokenizer
from cscompile.runtime.bundle import BundleModel, is_bundle, load

__all__ = [
    "BundleModel",
    "DecoderSession",
    "DecoderSpec",
    "Generation",
    "GenerationConfig",
    "GenerationResult",
    "GenerationStats",
    "KVState",
    "TextModel",
    "TokenEvent",
    "Tokenizer",
    "is_bundle",
    "load",
    "load_text_model",
    "sample",
]
