"""A registry of tiny decoders with random weights, built in code, for the fast test tier.

Each entry is a transformers config (Llama, Qwen2-like with QKV bias, MHA and GQA variants)
small enough to build, export and run in about a second. ``build_tiny`` writes the same
directory layout as a fetched model (``model.onnx``, ``config.json``, ``tokenizer/``,
``hf/``), with a small byte-level BPE tokenizer trained on Python's own documentation, so
every runtime and compiler path can be tested without the real model. Needs the ``export``
extra.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cscompile.errors import UserError, require

#: The tokenizer of the tiny models (trained once per process, deterministic).
TINY_VOCAB = 320
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_MODELS: dict[str, dict[str, Any]] = {
    # name: (model_type, config overrides)
    "llama-1l": {
        "model_type": "llama",
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "llama-2l": {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
    },
    "llama-mha-2l": {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "llama-untied-2l": {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "tie_word_embeddings": False,
    },
    "qwen2-2l": {
        "model_type": "qwen2",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    # widths that are multiples of 32: block-quantized (MatMulNBits, GGUF) tests
    "llama-q-2l": {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
    },
    # depth: four layers to drop from (quantizable widths); a longer context for prompt compression
    "llama-4l": {
        "model_type": "llama",
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 1024,
    },
    # heads of 32 (one grid block): the native width search drops single heads
    "llama-hd32-3l": {
        "model_type": "llama",
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 128,
        "intermediate_size": 128,
    },
    # GPT-2 style: LayerNorm, learned positions, fused QKV (Conv1D), GELU MLP
    "gpt2-2l": {"model_type": "gpt2", "n_layer": 2, "n_head": 4},
}

_BASE = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 48,
    "intermediate_size": 96,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "initializer_range": 0.15,  # peaked logits: greedy argmax is not decided by rounding noise
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny_tokenizer() -> Any:
    """A byte-level BPE with ``TINY_VOCAB`` entries trained on ``pydoc_data.topics``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from cscompile.metrics import reference_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = reference_corpus()[:200_000]
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer=trainer)
    return tok


def hf_config(name: str) -> Any:
    transformers = require("transformers", "export", "building tiny test models")
    if name not in TINY_MODELS:
        raise UserError("tiny model", f"'{name}'", f"one of {sorted(TINY_MODELS)}")
    spec = dict(TINY_MODELS[name])
    model_type = spec.pop("model_type")
    if model_type == "gpt2":
        return transformers.GPT2Config(
            vocab_size=TINY_VOCAB,
            n_embd=_BASE["hidden_size"],
            n_positions=_BASE["max_position_embeddings"],
            initializer_range=_BASE["initializer_range"],
            bos_token_id=0,
            eos_token_id=2,
            **spec,
        )
    heads = spec["num_attention_heads"]
    hidden = spec.get("hidden_size", _BASE["hidden_size"])
    kwargs = {**_BASE, **spec, "head_dim": hidden // heads}
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    return cls(**kwargs)


def build_hf_model(name: str, seed: int = 0) -> Any:
    torch = require("torch", "export", "building tiny test models")
    transformers = require("transformers", "export", "building tiny test models")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(name), dtype=torch.float32)
    return model.eval()


def write_tokenizer(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().save(str(directory / "tokenizer.json"))
    cfg = {
        "chat_template": CHAT_TEMPLATE,
        "eos_token": "<|im_end|>",
        "bos_token": "<|endoftext|>",
        "model_max_length": 256,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def build_tiny(name: str, out_dir: Path | str, seed: int = 0) -> Path:
    """Build tiny model ``name`` into ``out_dir`` (fetched-model layout). Returns ``out_dir``."""
    from cscompile.models.export import export_hf_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_hf_model(name, seed)
    model.save_pretrained(str(out / "hf"))
    (out / "config.json").write_text(model.config.to_json_string())
    write_tokenizer(out / "tokenizer")
    report = export_hf_model(model, out / "model.onnx")
    (out / "export.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    return out


def tiny_gemma3(seed: int = 0, sliding_window: int = 6, softcap: float | None = 30.0) -> Any:
    """A three-layer Gemma 3 text model (local, global, local) with every norm weight randomised.

    Not in :data:`TINY_MODELS` (the passes' tests run over that registry; Gemma's graph is the
    exporter's and the runtime's to test). Final logit soft-capping on by default, so its path is
    tested (``softcap=None``: off, as in the released Gemma 3, which the native step runs).
    """
    torch = require("torch", "export", "building tiny test models")
    transformers = require("transformers", "export", "building tiny test models")
    cfg = transformers.Gemma3TextConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=256,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        final_logit_softcapping=softcap,
        initializer_range=0.15,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def build_tiny_gemma3(
    out_dir: Path | str, seed: int = 0, sliding_window: int = 6, softcap: float | None = 30.0
) -> Path:
    """:func:`tiny_gemma3` exported into ``out_dir`` (fetched-model layout); raw tokenizer with BOS."""
    from cscompile.models.export import export_hf_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_gemma3(seed, sliding_window, softcap)
    (out / "config.json").write_text(model.config.to_json_string())
    tok_dir = out / "tokenizer"
    write_tokenizer(tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]  # like Gemma 3 270M's GGUF: no template, runs raw with BOS
    cfg["add_bos_token"] = True
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    report = export_hf_model(model, out / "model.onnx", probe_ids=list(range(3, 20)))
    (out / "export.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    return out


#: A window and an original RoPE context short enough that a prompt of 12 and 16 decode steps run
#: well past both (the family matrix, tests/unit/test_family_matrix.py).
FAMILY_WINDOW = 8
FAMILY_ORIGINAL_CONTEXT = 16

_ROPE_SCALINGS: dict[str, dict[str, Any]] = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": FAMILY_ORIGINAL_CONTEXT},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": FAMILY_ORIGINAL_CONTEXT},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                 "long_factor": [1.0 + 0.5 * i for i in range(8)],
                 "original_max_position_embeddings": FAMILY_ORIGINAL_CONTEXT},
}  # fmt: skip

#: The decoder families people deploy, each as a transformers config class and its overrides; the
#: shared shape is two layers, hidden 64, 4 query heads of 16, 2 KV heads, FFN 128.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    **{
        f"llama-rope-{kind}": (
            "LlamaConfig",
            {
                "rope_parameters": {"rope_theta": 10000.0, **scaling},
                # dynamic scaling grows past max_position_embeddings itself (its original context);
                # the others' context: the original one times the factor (what YaRN reads it from)
                "max_position_embeddings": FAMILY_ORIGINAL_CONTEXT * (1 if kind == "dynamic" else 8),
            },
        )
        for kind, scaling in _ROPE_SCALINGS.items()
    },
    "mistral": ("MistralConfig", {"sliding_window": FAMILY_WINDOW}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "phi3": ("Phi3Config", {"rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
    "gemma2": (
        "Gemma2Config",
        {
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 24,
            "sliding_window": FAMILY_WINDOW,
            "attn_logit_softcapping": 0.5,  # small enough to bite on a tiny random model
            "final_logit_softcapping": 3.0,
        },
    ),  # fmt: skip
    "olmo2": ("Olmo2Config", {}),
    "gpt-neox": (
        "GPTNeoXConfig",
        {"hidden_act": "gelu", "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    ),  # fmt: skip
}


def tiny_family(name: str, seed: int = 0) -> Any:
    """A two-layer random model of family ``name`` (:data:`FAMILIES`), norm weights and biases randomised.

    Randomised so that a dropped norm or bias changes the logits: every norm weight moves by
    N(0, 0.5) from its initial value (1, or Gemma's 0 in ``1 + w``), every bias is N(0, 0.2).
    """
    torch = require("torch", "export", "building tiny test models")
    transformers = require("transformers", "export", "building tiny test models")
    if name not in FAMILIES:
        raise UserError("model family", f"'{name}'", f"one of {sorted(FAMILIES)}")
    cls_name, overrides = FAMILIES[name]
    kwargs: dict[str, Any] = {
        **_BASE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": False,
        **overrides,
    }
    if cls_name == "GPTNeoXConfig":  # no GQA, no head_dim or RMSNorm settings
        for key in ("num_key_value_heads", "head_dim", "rms_norm_eps"):
            kwargs.pop(key)
    cfg = getattr(transformers, cls_name)(**kwargs)
    if cls_name == "Gemma2Config":
        cfg.layer_types = ["sliding_attention", "full_attention"]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.2)
            elif "norm" in pname or "layernorm" in pname:
                p.add_(torch.randn_like(p) * 0.5)
    return model
