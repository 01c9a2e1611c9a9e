"""Loading a TensorRT bundle's engines (``trt/``) on a GPU: what the runtime reads.

The build side (lowering, building and comparing the engines) is :mod:`cscompile.trt.artifact`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cscompile.errors import UserError
from cscompile.trt.spec import EngineSpec, TargetRecord

PREFIX = "trt/"


TRT_JSON = PREFIX + "trt.json"


FORMAT_VERSION = 1


def read_record(root: Path) -> tuple[dict[str, Any], TargetRecord]:
    meta = json.loads((root / TRT_JSON).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError("TensorRT part", f"format {meta.get('format_version')!r}", f"format {FORMAT_VERSION}")
    t = meta["target"]
    record = TargetRecord(
        t["tensorrt"],
        t["gpu"],
        t["compute_capability"],
        t["precision"],
        [EngineSpec.from_dict(e) for e in t["engines"]],
    )
    return meta, record


def load_trt(root: Path, rebuild: str) -> Any:
    """The :class:`~cscompile.trt.runner.TrtEngine` of a verified bundle directory (GPU only)."""
    from cscompile.trt.engine import check_target, current_target, load_engine, require_gpu
    from cscompile.trt.runner import TrtEngine

    meta, record = read_record(root)
    require_gpu("TensorRT bundle")
    check_target(record, current_target(record.precision), rebuild)
    base = root / PREFIX
    engines = {
        spec.name: load_engine(
            (base / f"{spec.name}.plan").read_bytes(), base / spec.onnx, spec.strip_weights
        )
        for spec in record.engines
    }
    return TrtEngine(
        engines["dense"],
        engines.get("sparse"),
        {k: list(v) for k, v in meta["counts"].items()},
        int(meta["block"]),
        [int(k) for k in meta["topk"]],
        int(meta["intermediate_size"]),
        int(meta["num_layers"]),
        [tuple(p) for p in meta["past"]],
        [tuple(p) for p in meta["present"]],
        int(meta["context"]),
    )


def rebuild_command(build: Mapping[str, Any], out: str) -> str:
    """The command that rebuilds a TensorRT bundle from its recorded build parameters."""
    trt = build.get("trt") or {}
    parts = ["cscompile build", str(build.get("source", {}).get("name", "MODEL")), "--target trt"]
    parts += [f"--trt-precision {trt.get('precision', 'fp16')}", f"--trt-context {trt.get('context', 2048)}"]
    if build.get("motifs"):
        parts.append(f"--motifs --motif-m {build['motifs'].get('m', 256)}")
    parts.append(f"-o {out}")
    return " ".join(parts)


def trt_session(root: Path, build: Mapping[str, Any], out: str, switching: bool) -> Any:
    """The runtime session of a TensorRT bundle: the engines alone (dense), or the switching
    controller over the family with the TensorRT engines underneath (GPU only).
    """
    engine = load_trt(root, rebuild_command(build, out))
    if not switching:
        return engine
    from cscompile.motifs.build import load_family, switching_session
    from cscompile.motifs.load import has_motifs

    if not has_motifs(root):
        raise UserError("TensorRT bundle", "has no motif family", "a bundle built with --target trt --motifs")
    family, preds, controller = load_family(root)
    return switching_session(engine, family, preds, controller)
