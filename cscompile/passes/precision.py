"""Quantize a model directory: the Python API behind ``cscompile quantize``.

Writes a new model directory (``model.onnx`` + tokenizer + config + ``quantize.json``) that
``cscompile run`` / ``runtime.load_text_model`` load like any other. Atomic: a failed run
leaves nothing at the output path.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import onnx_ir as ir

from cscompile import __version__
from cscompile.cache import atomic_dir, atomic_write_json, sha256_file
from cscompile.errors import UserError
from cscompile.model_config import read_context_length
from cscompile.passes.fuse import FuseAttentionPass
from cscompile.passes.pipeline import analyze, run_passes, save_model
from cscompile.passes.quantize import PrecisionPlan, QuantizeWeightsPass
from cscompile.quant.gguf import GGUFGrid


def find_source_gguf(model_dir: Path) -> Path | None:
    """The GGUF a fetched model came from (``source/*.gguf``), if there is exactly one."""
    found = sorted((model_dir / "source").glob("*.gguf")) if (model_dir / "source").is_dir() else []
    return found[0] if len(found) == 1 else None


def quantize_model(
    model: Path,
    out_dir: Path,
    plan: PrecisionPlan,
    grid: str = "auto",
    accuracy_level: int = 4,
    fuse_attention: str = "auto",
    source_layers: list[int] | None = None,
    analyzed: tuple[ir.Model, Any] | None = None,
) -> dict[str, Any]:
    """Quantize ``model`` (a model directory or ``.onnx``) into ``out_dir``; returns the report.

    ``analyzed``: the graph and unit map to quantize instead of analyzing ``model``'s file
    (e.g. after :class:`~cscompile.passes.depth.DropLayersPass`, whose graphs unit discovery
    would refuse); ``model`` still provides the tokenizer, config and source hash.
    ``source_layers`` maps the graph's layers to the source GGUF's (after dropping layers).
    """
    onnx_path = model if model.suffix == ".onnx" else model / "model.onnx"
    base = onnx_path.parent
    if grid == "auto":
        gguf_path = find_source_gguf(base)
    elif grid == "none":
        gguf_path = None
    else:
        gguf_path = Path(grid)
        if not gguf_path.is_file():
            raise UserError(
                "--grid", f"no file at {gguf_path}", "'auto', 'none' or the path of the source GGUF"
            )
    if out_dir.resolve() == base.resolve():
        raise UserError("output directory", f"{out_dir} is the input model's directory", "a new directory")
    graph, um = analyzed if analyzed is not None else analyze(onnx_path)
    fused = False
    if fuse_attention not in ("auto", "on", "off"):
        raise UserError("--fuse-attention", f"'{fuse_attention}'", "auto, on or off")
    a = um.layers[0].attention
    eligible = (
        not um.llama_deviations(rope_table=False) and not a.fused_qkv and a.rope and a.head_dim % 16 == 0
    )
    passes: list[tuple[str, Any]] = []
    if fuse_attention == "on" or (fuse_attention == "auto" and eligible):
        # fusion first, so quantization packs Q/K/V straight into the GQA node
        passes.append(("fuse-attention", FuseAttentionPass(max_positions=read_context_length(base) or 8192)))
        fused = True
    qpass = QuantizeWeightsPass(
        plan, GGUFGrid(gguf_path) if gguf_path else None, accuracy_level, source_layers=source_layers
    )
    graph = run_passes(graph, [*passes, ("quantize-weights", qpass)])
    with atomic_dir(out_dir) as tmp:
        save_model(graph, tmp / "model.onnx")
        for name in ("config.json",):
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        if (base / "tokenizer").is_dir():
            shutil.copytree(base / "tokenizer", tmp / "tokenizer")
        elif (base / "tokenizer.json").is_file():
            for f in base.glob("tokenizer*.json"):
                shutil.copy2(f, tmp / f.name)
        report = {
            "cscompile": __version__,
            "source_model": str(onnx_path),
            "source_sha256": sha256_file(onnx_path),
            "plan": plan.describe(),
            # the source GGUF when a projection kept its grid (every block type is kept: quantize.py
            # rule 2); None for a GGUF of floats only (all weights round-to-nearest)
            "grid": str(gguf_path) if gguf_path and any(k.endswith("-grid") for k in qpass.report) else None,
            "accuracy_level": accuracy_level,
            "projections": qpass.report,
            "embedding": qpass.embedding,
            "attention": "GroupQueryAttention (unpadded sequences only)" if fused else "plain",
        }
        atomic_write_json(tmp / "quantize.json", report)
    return report


PRECISIONS = ("fp32", "int8", "int4")


def precision_plan(precision: str) -> Any:
    """The :class:`~cscompile.passes.quantize.PrecisionPlan` behind each ``--precision``."""
    from cscompile.passes.quantize import PrecisionPlan

    if precision == "fp32":
        return PrecisionPlan(attn="fp32", ffn="fp32", lm_head="fp32")
    if precision == "int8":
        return PrecisionPlan(attn="int8", ffn="int8", lm_head="int8")
    if precision == "int4":
        return PrecisionPlan(attn="int4", ffn="int4", lm_head="int8")  # a 4-bit LM head hurts quality
    raise UserError("--precision", f"'{precision}'", f"one of {', '.join(PRECISIONS)}")
