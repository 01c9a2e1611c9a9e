"""The package stage of a build: the dense engine's weights beside its graph, the build record,
the requirements (ONNX opsets, ONNX Runtime version, target) and the bundle written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENGINE_FILE = "engines/dense.onnx"


def onnx_header(src: Path | bytes) -> tuple[dict[str, int], list[str]]:
    """``(opsets, external-data locations)`` of one ONNX file or serialized model (weights not loaded)."""
    import onnx

    from cscompile.bundle.loader import onnx_tensors

    model = (
        onnx.load_from_string(src)
        if isinstance(src, bytes)
        else onnx.load(str(src), load_external_data=False)
    )
    opsets: dict[str, int] = {}
    for imp in model.opset_import:
        domain = "" if imp.domain in ("", "ai.onnx") else imp.domain
        opsets[domain] = max(opsets.get(domain, 0), int(imp.version))
    locations = {e.value for t in onnx_tensors(model) for e in t.external_data if e.key == "location"}
    return opsets, sorted(locations)


def merge_opsets(headers: Sequence[dict[str, int]]) -> dict[str, int]:
    """The highest version of every operator domain over several models."""
    out: dict[str, int] = {}
    for opsets in headers:
        for domain, version in opsets.items():
            out[domain] = max(out.get(domain, 0), version)
    return out


def _version_prefix(version: str) -> str:
    """``1.32.0.dev20250101`` -> ``1.32.0`` (the manifest accepts numeric versions only)."""
    from cscompile.bundle.format import version_tuple

    parts = version_tuple(version)
    return ".".join(map(str, parts)) if parts else "0"


def package(ctx: Any, out: Path, archive: bool, parts: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
    """Write the bundle ``out`` from the build context and the steps' parts; returns
    ``(BundleInfo, build record)``. The dense engine's weights go beside its graph
    (``engines/dense.bin``): opening a bundle parses every graph to check it, and inline
    weights made that parse a large transient (BENCHMARKS.md).
    """
    import onnx_ir as ir
    import onnxruntime

    from cscompile import __version__
    from cscompile.bundle import write_bundle
    from cscompile.bundle.parts import merge_parts
    from cscompile.cache import sha256_file
    from cscompile.compiler.intake import TOKENIZER_PREFIX, model_name
    from cscompile.passes.precision import precision_plan

    c, report, grid = ctx.config, ctx.report, ctx.grid
    split_dir = ctx.work / "engine-split"
    split_dir.mkdir()
    ir.save(ir.load(str(ctx.engine_path)), str(split_dir / "dense.onnx"), external_data="dense.bin")
    files: dict[str, Path | bytes] = {ENGINE_FILE: split_dir / "dense.onnx"}
    headers = {ENGINE_FILE: onnx_header(split_dir / "dense.onnx")}
    for loc in headers[ENGINE_FILE][1]:
        files["engines/" + loc] = split_dir / loc
    files.update(ctx.tok_files)
    sections: dict[str, str] = {"build": "build.json", "unit_map": "unit_map.json"}
    if (ctx.base / "config.json").is_file():
        files["config.json"] = ctx.base / "config.json"
        sections["config"] = "config.json"
    engine_params = {
        "precision": c.precision,
        "plan": precision_plan(c.precision).describe(),
        "grid": "gguf-exact" if grid else ("rtn" if c.precision != "fp32" else None),
        "attention": "gqa" if ctx.fused else "plain",
        "accuracy_level": report.get("accuracy_level") if c.precision != "fp32" else None,
    }
    engines: list[dict[str, Any]] = [
        {"name": "dense", "file": ENGINE_FILE, "kind": "dense", "params": engine_params, "profile": {}}
    ]
    labels = ctx.labels
    build_info: dict[str, Any] = {
        "cscompile": __version__,
        "precision": c.precision,
        "target": c.target,
        "block_size": ctx.block,
        "seed": c.seed,
        "max_engines": c.max_engines,
        "calib_sha256": sha256_file(Path(c.calib).expanduser()) if c.calib is not None else None,
        "motifs": {"m": c.motif_m, "banks": c.motif_banks} if c.motifs else None,
        "pareto": {"latency_table": "pinned" if c.latency_table else "measured"} if c.pareto else None,
        "prompt_scorer": {"layers": c.scorer_layers} if c.prompt_scorer else None,
        "task": c.task,
        "trt": {"precision": c.trt_precision, "context": c.trt_context} if c.target == "trt" else None,
        "classify": (
            {
                "labels": labels,
                "train_sha256": sha256_file(Path(c.train)),
                "teacher": c.teacher,
                "max_loss": c.max_loss,
                "exit_layers": c.exit_layers,
            }
            if c.task == "classify" and c.train is not None
            else None
        ),  # fmt: skip
        "gate": ctx.gate,  # the correctness gate's measured errors (cscompile.compiler.gate)
        "source": {"name": model_name(ctx.onnx_path, ctx.base), "sha256": report["source_sha256"]},
        "quantize": {
            "plan": report.get("plan"),
            "grid": Path(grid).name if grid else None,
            "accuracy_level": report.get("accuracy_level"),
            "projections": report.get("projections"),
            "attention": report.get("attention"),
        },
    }
    files["build.json"] = (json.dumps(build_info, indent=2, sort_keys=True) + "\n").encode()
    # compact: at block size 1 the unit list is most of the map (SmolLM2: 13.7 MB vs 25.8 MB indented)
    files["unit_map.json"] = (
        json.dumps(ctx.unit_map.to_dict(), sort_keys=True, separators=(",", ":")) + "\n"
    ).encode()
    merge_parts(files, engines, sections, parts)
    requires = {
        "onnxruntime_min": _version_prefix(str(onnxruntime.__version__)),
        "opsets": merge_opsets(
            [
                (headers[rel] if rel in headers else onnx_header(files[rel]))[0]
                for rel in sorted(files)
                if rel.endswith(".onnx")
            ]
        ),  # fmt: skip
        "target": c.target,
    }
    info = write_bundle(
        out, files=files, engines=engines, source=dict(build_info["source"]), requires=requires,
        tokenizer=TOKENIZER_PREFIX, sections=sections, archive=archive,
    )  # fmt: skip
    return info, build_info
