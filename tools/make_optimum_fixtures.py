"""Make the optimum-onnx fixtures of tests/unit/test_optimum_fixtures.py (tests/fixtures/optimum/).

optimum-onnx pins transformers < 4.58, which cannot live beside the project's transformers 5, so
its exports are made once, in a second environment outside the repo, and committed as small
fixtures; the tests then need only the project's environment. To remake them::

    python3.11 -m venv /work/optenv
    /work/optenv/bin/pip install torch==2.13.0        # first: the CPU wheel on disk, not a CUDA one
    /work/optenv/bin/pip install optimum-onnx onnxruntime accelerate  # accelerate: optimum dedups the tied head
    /work/optenv/bin/python tools/make_optimum_fixtures.py [family ...]

For each family of :data:`FAMILIES` (two layers, hidden 64, 4 query heads of 16, 2 KV heads,
FFN 96, tied embeddings, the tiny 320-token BPE of :func:`cscompile.models.tiny.tiny_tokenizer`;
seeded; every norm weight moved by N(0, 0.5) and every bias drawn N(0, 0.2), so that a dropped
norm or bias shows) it writes ``tests/fixtures/optimum/<family>/``:

- ``hf/``: the transformers checkpoint (``config.json``, ``model.safetensors``),
- ``model.onnx``: optimum's ``text-generation-with-past`` export (one graph taking the KV cache,
  the way optimum exports decoders now: the empty past serves the prompt),
- ``config.json``, ``tokenizer/`` (``tokenizer.json``, ``tokenizer_config.json``),
- ``versions.json``: the versions of optimum, optimum-onnx, transformers, torch and onnx used.

The fixtures are kept small (each well under 1 MB; the ONNX's weights inline).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "optimum"
WINDOW = 8  # the family matrix's window: the tests' 12 + 16 positions run past it

#: family -> (transformers 4.x config class, overrides of the shared shape)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.5}),
    "gemma2": (
        "Gemma2Config",
        {
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 24,
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 0.5,
            "final_logit_softcapping": 3.0,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {
            "query_pre_attn_scalar": 24,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
        },
    ),
}

SHAPE = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "initializer_range": 0.15,  # peaked logits: greedy argmax is not decided by rounding noise
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny_model(family: str, seed: int = 0):
    import torch
    import transformers

    cls_name, overrides = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**SHAPE, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.2)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model


def versions() -> dict[str, str]:
    names = (
        "optimum",
        "optimum-onnx",
        "transformers",
        "torch",
        "onnx",
        "onnxruntime",
        "tokenizers",
        "accelerate",
    )
    return {n: metadata.version(n) for n in names} | {"python": sys.version.split()[0]}


def make(family: str) -> Path:
    from optimum.exporters.onnx import main_export

    sys.path.insert(0, str(ROOT))
    from cscompile.models.tiny import write_tokenizer

    out = OUT / family
    if out.exists():
        shutil.rmtree(out)
    (out / "hf").mkdir(parents=True)
    model = tiny_model(family)
    model.save_pretrained(str(out / "hf"), safe_serialization=True)
    (out / "hf" / "generation_config.json").unlink(missing_ok=True)
    write_tokenizer(out / "tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        model.save_pretrained(str(src), safe_serialization=True)
        for f in (out / "tokenizer").iterdir():
            shutil.copy2(f, src / f.name)
        main_export(str(src), Path(tmp) / "onnx", task="text-generation-with-past", do_validation=True)
        made = sorted(p.name for p in (Path(tmp) / "onnx").iterdir())
        print(family, "optimum wrote", made)
        onnx_files = [m for m in made if m.endswith(".onnx")]
        if onnx_files != ["model.onnx"]:
            raise SystemExit(f"{family}: optimum wrote {onnx_files}, expected one model.onnx")
        import onnx

        proto = onnx.load(str(Path(tmp) / "onnx" / "model.onnx"))  # external data, if any, inlined
        onnx.save(proto, str(out / "model.onnx"))
        shutil.copy2(Path(tmp) / "onnx" / "config.json", out / "config.json")
    (out / "versions.json").write_text(json.dumps(versions(), indent=2, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{family}: {size / 1e6:.2f} MB")
    return out


def main(argv: list[str]) -> None:
    families = argv or list(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"error: family | {unknown}. Expected some of {list(FAMILIES)}.")
    for f in families:
        make(f)


if __name__ == "__main__":
    main(sys.argv[1:])
