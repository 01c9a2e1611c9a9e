"""The product's precision path on the real model: `cscompile quantize smollm2` keeps quality."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cscompile.metrics import onnx_scorer, perplexity, reference_corpus
from cscompile.runtime import GenerationConfig, load_text_model

pytestmark = pytest.mark.integration


def test_exact_int4_keeps_perplexity(smollm2, tmp_path):
    from cscompile.cli.main import main

    out = tmp_path / "smol-int4"
    assert main(["quantize", str(smollm2.directory), "-o", str(out)]) == 0
    report = json.loads((out / "quantize.json").read_text())
    assert report["projections"] == {"int4-grid": 210, "int8-grid": 1}
    assert report["attention"].startswith("GroupQueryAttention")
    q = load_text_model(out, threads=2)
    dense = load_text_model(smollm2.directory, threads=2)
    ids = dense.tokenizer.encode(reference_corpus())[:2048]
    p_q = perplexity(onnx_scorer(q.session), ids).perplexity
    p_d = perplexity(onnx_scorer(dense.session), ids).perplexity
    assert p_q / p_d - 1 < 0.015, (p_q, p_d)  # measured +0.42% on 8,176 tokens
    # greedy text agrees with the dense model where the dense model is not at a near-tie
    # ("What is the capital of France?" is: 'The' 25.33 vs 'L' 25.24, and int8 activations flip it)
    cfg = GenerationConfig(max_new_tokens=16, stop_at_eos=False)
    for prompt in ("Write a short poem about the sea.", "What is 17 times 23?"):
        assert (
            q.generate(prompt, cfg, chat=True).token_ids == dense.generate(prompt, cfg, chat=True).token_ids
        )
    assert np.isfinite(p_q)
