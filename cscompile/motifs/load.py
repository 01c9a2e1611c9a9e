"""Loading a bundle's motif engine and switching runtime (``motifs/``): what the runtime reads.

The build side (compiling the family and writing these files) is :mod:`cscompile.motifs.artifact`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from cscompile.bundle.blobs import array_views
from cscompile.motifs.build import (
    FAMILY_FILE,
    PREDICTORS_FILE,
    load_banks,
    load_family,
    predictor_arrays,
    switching_session,
)
from cscompile.motifs.engine import LayeredEngine
from cscompile.motifs.runtime import SwitchingSession
from cscompile.motifs.segments import SHARED_LOCATION, Segment, SegmentPlan

PREFIX = "motifs/"


ENGINE_JSON = PREFIX + "engine.json"


WEIGHTS_BIN = "weights.bin"


FFN_BIN = "ffn.bin"


FORMAT_VERSION = 1


def load_engine(root: Path, threads: int | None = None) -> LayeredEngine:
    """The layered engine stored under ``root/motifs/`` (``root``: a verified bundle directory)."""
    meta = json.loads((root / ENGINE_JSON).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"motif engine format {meta.get('format_version')!r}; this cscompile reads {FORMAT_VERSION}"
        )
    base = root / PREFIX
    store = array_views(base / WEIGHTS_BIN, meta["weights"])
    recs = array_views(base / FFN_BIN, meta["ffn"])

    def segment(s: Mapping[str, Any]) -> Segment:
        model = onnx.load(str(base / s["file"]), load_external_data=False)
        for t in model.graph.initializer:  # data comes from the mapped store, not from ORT's reader
            if t.data_location == onnx.TensorProto.EXTERNAL:
                for e in t.external_data:
                    if e.key == "location":
                        e.value = SHARED_LOCATION
        return Segment(s["name"], model.SerializeToString(), s["inputs"], s["outputs"], s["weights"])

    segments = [segment(s) for s in meta["segments"]]
    kv_segments = [
        None if s is None else segment(s) for s in meta.get("kv_segments", [])
    ]  # older bundles: none
    plan = SegmentPlan(
        kv_segments=kv_segments,
        segments=segments,
        shared=list(meta["shared"]),
        store=store,
        ffn=[],
        hidden_size=int(meta["hidden_size"]),
        present=[(a, b) for a, b in meta["present"]],
        past=[(a, b) for a, b in meta["past"]],
    )
    records = [recs[name] for name in sorted(recs)]
    return LayeredEngine(plan, threads, ffn_format=meta["ffn_format"], records=records)


def load_switching(
    root: Path, threads: int | None = None, read_npz: Callable[[str], dict[str, np.ndarray]] | None = None
) -> SwitchingSession:
    """Engine + family + controller from a bundle directory: the switching runtime."""
    engine = load_engine(root, threads)
    arrays = predictor_arrays(root, read_npz)  # read once: the universal set and the banks share the file
    family, preds, controller = load_family(root, arrays=arrays)
    return switching_session(engine, family, preds, controller, load_banks(root, arrays=arrays))


def has_motifs(root: Path) -> bool:
    return (
        (root / ENGINE_JSON).is_file()
        and (root / FAMILY_FILE).is_file()
        and (root / PREDICTORS_FILE).is_file()
    )
