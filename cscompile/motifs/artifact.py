"""A compiled motif engine as bundle files, and loading it back by memory-mapping.

Files (all under ``motifs/``; no pickle):

- ``seg00.onnx`` … ``head.onnx`` — the segments; every large initializer is external data in
  ``weights.bin`` (a real, listed file: the bundle loader checks each reference stays inside);
- ``weights.bin`` — every segment weight, 64-byte aligned, little-endian;
- ``ffn.bin`` — the kernel's channel-major records per layer, 64-byte aligned;
- ``engine.json`` — segment interfaces, the weight and record index (offset, shape, dtype);
- ``family.json`` and ``predictors.npz`` (see :mod:`cscompile.motifs.build`).

Loading maps ``weights.bin`` and ``ffn.bin`` read-only (``np.memmap``) and hands the views to
ORT (``add_external_initializers``) and to the kernel: nothing is copied at load, and processes
that load the same bundle share the pages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from cscompile.bundle.blobs import pack_arrays
from cscompile.motifs.build import (
    FAMILY_FILE,
    FamilyBuild,
)
from cscompile.motifs.engine import LayeredEngine
from cscompile.motifs.load import (
    ENGINE_JSON,
    FFN_BIN,
    FORMAT_VERSION,
    PREFIX,
    WEIGHTS_BIN,
)
from cscompile.motifs.segments import Segment, SegmentPlan


def point_to_blob(t: onnx.TensorProto, entry: Mapping[str, Any], location: str) -> None:
    """Make initializer ``t`` external data at ``entry`` (a ``pack_arrays`` index entry) of ``location``."""
    nbytes = int(np.prod(entry["shape"])) * np.dtype(entry["dtype"]).itemsize
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    for key, val in (("location", location), ("offset", str(entry["offset"])), ("length", str(nbytes))):
        t.external_data.add(key=key, value=val)


def engine_files(engine: LayeredEngine, plan: SegmentPlan, fb: FamilyBuild) -> dict[str, bytes]:
    """Bundle files of ``engine`` (built from ``plan``) and its family."""
    weights, w_index = pack_arrays(plan.store)
    records = {f"L{i:03d}": f.w for i, f in enumerate(engine.ffn)}
    ffn, f_index = pack_arrays(records)
    files: dict[str, bytes] = {PREFIX + WEIGHTS_BIN: weights, PREFIX + FFN_BIN: ffn}

    def entry(seg: Segment) -> dict[str, Any]:
        model = onnx.load_from_string(seg.model)
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                point_to_blob(t, w_index[t.name], WEIGHTS_BIN)
        rel = f"{seg.name}.onnx"
        files[PREFIX + rel] = model.SerializeToString(deterministic=True)
        return {
            "name": seg.name,
            "file": rel,
            "inputs": seg.inputs,
            "outputs": seg.outputs,
            "weights": seg.weights,
        }

    segs = [entry(seg) for seg in plan.segments]
    kv_segs = [None if seg is None else entry(seg) for seg in plan.kv_segments]
    meta = {
        "format_version": FORMAT_VERSION,
        "segments": segs,
        "kv_segments": kv_segs,
        "shared": plan.shared,
        "past": [list(p) for p in plan.past],
        "present": [list(p) for p in plan.present],
        "hidden_size": plan.hidden_size,
        "intermediate_size": engine.intermediate,
        "ffn_format": engine.ffn_format,
        "weights": w_index,
        "ffn": f_index,
    }
    files[ENGINE_JSON] = (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()
    files.update(fb.files())
    return files


def calibration_prompts(tokenizer_dir: Path, calib: Path | None, max_tokens: int = 2048) -> list[np.ndarray]:
    """Token ids per calibration prompt: ``calib`` (plain text: one prompt; a prompts ``.jsonl``: one
    per row), else the shipped prompt set (all five task families).
    """
    from cscompile.data.prompts import load_prompts
    from cscompile.decode.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_dir)
    if calib is not None and calib.suffix != ".jsonl":
        texts = [calib.read_text(errors="replace")]
        max_tokens = 1 << 30
    else:
        texts = ["\n\n".join(m["content"] for m in p.messages) for p in load_prompts(calib)]
    return [np.array(tok.encode(t), np.int64)[:max_tokens] for t in texts if t.strip()]


def motif_part(
    onnx_path: Path,
    tokenizer_dir: Path,
    calib: Path | None = None,
    *,
    m: int = 256,
    targets: tuple[float, ...] = (0.9, 0.75, 0.5),
    max_engines: int = 4,
    seed: int = 0,
    ffn_format: str = "f32",
    threads: int | None = None,
    say: Callable[[str], None] | None = None,
    banks: int = 1,
) -> Any:
    """The bundle part (files, engines, section) of ``onnx_path``'s motif family.

    Built from the source graph's fp32 weights whatever the dense engine's precision; SwiGLU
    decoders only (others get a clear error).
    """
    from cscompile.bundle.parts import BundlePart
    from cscompile.motifs.build import build_family
    from cscompile.motifs.segments import plan_segments
    from cscompile.passes.pipeline import analyze

    prompts = calibration_prompts(tokenizer_dir, calib)
    ids = np.concatenate(prompts)
    model, um = analyze(onnx_path)
    plan = plan_segments(model, um)
    del model
    engine = LayeredEngine(plan, threads, ffn_format=ffn_format)
    quality = min(1024, max(128, len(ids) // 6))
    fb = build_family(
        engine, ids, m=m, targets=targets, max_engines=max_engines, seed=seed,
        quality_tokens=quality, sens_tokens=max(64, quality // 2), progress=say, prompts=prompts, banks=banks,
    )  # fmt: skip
    files = engine_files(engine, plan, fb)
    engines = [
        {
            "name": f"motif-{mb.name}",
            "file": ENGINE_JSON,
            "kind": "motif",
            "params": {
                "densities": mb.densities,
                "ffn_fraction": float(np.mean(mb.densities)),
                "m": m,
                "ffn_format": ffn_format,
                "banks": banks,
            },
            # deterministic measurements only: latency varies run to run and would change the hash
            "profile": {"perplexity_calibration": mb.perplexity},
        }
        for mb in fb.family.members
    ]
    sections = {"motifs": FAMILY_FILE, "motif_engine": ENGINE_JSON}
    return BundlePart(files=dict(files), engines=engines, sections=sections)
