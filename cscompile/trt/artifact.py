"""TensorRT engines as bundle files: prepare (any machine), compile (GPU), load (GPU).

Files (all under ``trt/``; no pickle, nothing executable but TensorRT plans):

- ``dense.onnx``, ``sparse.onnx`` — the graphs the engines were built from (fp32, stock ops and
  the ``cscompile::SparseFFN`` plugin node); their weights are external data in
- ``weights.bin`` — every initializer of both graphs once (64-byte aligned). Weight-stripped
  engines are refitted from these graphs at load, so the weights are stored once, not per engine;
- ``dense.plan``, ``sparse.plan`` — serialized, weight-stripped TensorRT engines;
- ``trt.json`` — the TensorRT version, GPU and compute capability the plans were built for, the
  engine specs (precision, profiles), the lowering (block, TopK sizes, counts per motif) and
  the Polygraphy comparison of each engine with ONNX Runtime, tolerances included.

:func:`prepare` (lowering, profiles, files) runs and is tested on CPU; :func:`compile_part`
needs a GPU (it calls the builder); :func:`load_trt` checks the recorded TensorRT version and
compute capability against this machine before touching a plan.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from cscompile.errors import UserError
from cscompile.trt.load import (
    FORMAT_VERSION,
    PREFIX,
    TRT_JSON,
)
from cscompile.trt.lower import LoweredFamily, check_trt_ops, lower_family, sparse_motifs
from cscompile.trt.plugin_ffn import PLUGIN_NAME
from cscompile.trt.spec import EngineSpec, engine_specs, past_inputs

WEIGHTS_BIN = "weights.bin"
#: initializers up to this size stay inside the graph (shape constants and scalars)
INLINE_BYTES = 1024


@dataclass
class TrtPlan:
    """Everything before the TensorRT builder: graphs, weights, engine specs, lowering facts."""

    files: dict[str, bytes]  # name under trt/ -> bytes
    specs: list[EngineSpec]
    lowered: LoweredFamily | None
    meta: dict[str, Any]


def _externalize(models: list[onnx.ModelProto]) -> bytes:
    """Move every large initializer of ``models`` into one blob (each name once); the graphs
    then reference it as external data. Returns the blob.
    """
    from cscompile.bundle.blobs import pack_arrays
    from cscompile.motifs.artifact import point_to_blob

    arrays: dict[str, np.ndarray] = {}
    for model in models:
        for t in model.graph.initializer:
            arr = numpy_helper.to_array(t)
            if arr.nbytes <= INLINE_BYTES:
                continue
            prev = arrays.get(t.name)
            if prev is not None and (prev.shape != arr.shape or prev.dtype != arr.dtype):
                raise UserError(
                    "TensorRT graphs", f"two initializers named {t.name} differ", "shared weight names"
                )
            arrays.setdefault(t.name, arr)
    blob, index = pack_arrays(arrays)
    for model in models:
        for t in model.graph.initializer:
            if t.name not in index:
                continue
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(f)  # type: ignore[arg-type]
            point_to_blob(t, index[t.name], WEIGHTS_BIN)
    return blob


def motifs_from_files(files: Mapping[str, Path | bytes], intermediate: int) -> list[Any]:
    """The family's motifs (with predictors) from a motif bundle part's files."""
    import io

    from cscompile.motifs.build import FAMILY_FILE, PREDICTORS_FILE
    from cscompile.motifs.family import Family, predictors_from_arrays

    def data(rel: str) -> bytes:
        v = files[rel]
        return v.read_bytes() if isinstance(v, Path) else v

    family = Family.from_json(data(FAMILY_FILE).decode())
    with np.load(io.BytesIO(data(PREDICTORS_FILE)), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    preds = predictors_from_arrays(arrays)
    return [mb.motif(intermediate, preds) for mb in family.members]


def _graphs(
    model: ir.Model, um: Any, motifs: list[Any], block: int, precision: str, max_prompt: int, context: int
) -> tuple[onnx.ModelProto, LoweredFamily | None, list[EngineSpec]]:
    """The dense graph (serialized first), the sparse graph (``model`` lowered in place) and the
    engine specs — the one lowering path of :func:`prepare` and :func:`readiness`.
    """
    dense = ir.serde.serialize_model(model)
    check_trt_ops(dense, "dense graph")
    sparse = sparse_motifs(motifs, um.intermediate_size)
    lowered = lower_family(model, um, sparse, block) if sparse else None
    specs = engine_specs(
        dense, lowered.model if lowered else None, past_inputs(um), precision, max_prompt, context
    )
    return dense, lowered, specs


def prepare(
    onnx_path: Path,
    motifs: list[Any] | None,
    block: int,
    precision: str = "fp16",
    max_prompt: int = 1024,
    context: int = 2048,
) -> TrtPlan:
    """Lower ``onnx_path`` (and the sparse ``motifs``, if any) for TensorRT; no GPU needed."""
    from cscompile.passes.pipeline import analyze

    model, um = analyze(onnx_path)
    dense, lowered, specs = _graphs(model, um, motifs or [], block, precision, max_prompt, context)
    del model
    graphs = [dense] + ([lowered.model] if lowered else [])
    blob = _externalize(graphs)
    files = {"dense.onnx": dense.SerializeToString(deterministic=True), WEIGHTS_BIN: blob}
    if lowered is not None:
        files["sparse.onnx"] = lowered.model.SerializeToString(deterministic=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "vocab": um.vocab_size,
        "block": block,
        "context": context,
        "max_prompt": max_prompt,
        "intermediate_size": um.intermediate_size,
        "num_layers": um.num_layers,
        "past": [[lay.attention.past_key, lay.attention.past_value] for lay in um.layers],
        "present": [[lay.attention.present_key, lay.attention.present_value] for lay in um.layers],
        "topk": lowered.topk if lowered else [],
        "counts": lowered.counts if lowered else {},
        "residual_outputs": lowered.residual_outputs if lowered else [],
        "motifs": [m.name for m in motifs or []],
    }
    return TrtPlan(files, specs, lowered, meta)


def comparison_feeds(spec: EngineSpec, meta: Mapping[str, Any]) -> list[tuple[int, dict[str, np.ndarray]]]:
    """``(profile index, feed)`` pairs that exercise every profile (and every sparse motif)."""
    from cscompile.trt.compare import decoder_feeds

    vocab = int(meta["vocab"])
    out = []
    for i, prof in enumerate(spec.profiles):
        tokens = 8 if prof.name == "prefill" else 1
        if spec.name == "sparse":
            for j, counts in enumerate(meta["counts"].values()):
                out.append(
                    (i, decoder_feeds(prof.shapes, tokens, 16, vocab, seed=j, counts=np.asarray(counts)))
                )
        else:
            out.append((i, decoder_feeds(prof.shapes, tokens, 0 if tokens > 1 else 16, vocab, seed=i)))
    return out


def compile_part(plan: TrtPlan, work: Path, say: Callable[[str], None] | None = None) -> Any:
    """Build, refit and check every engine of ``plan`` on this GPU; the bundle part (GPU only)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import TrtRunner

    from cscompile.bundle.parts import BundlePart
    from cscompile.cache import cache_root, ensure_writable_dir
    from cscompile.trt.compare import TOLERANCES, compare
    from cscompile.trt.engine import build_engine, current_target, load_engine
    from cscompile.trt.plugin_ffn import with_reference

    log = say or (lambda msg: None)
    here = current_target(plan.specs[0].precision)
    work.mkdir(parents=True, exist_ok=True)
    for name, data in plan.files.items():
        (work / name).write_bytes(data)
    cache_dir = ensure_writable_dir(cache_root() / "trt")
    timing = cache_dir / f"timing-{here.compute_capability}-trt{here.tensorrt}.cache"
    atol, rtol = TOLERANCES[plan.specs[0].precision]
    comparisons = []
    files: dict[str, Path | bytes] = {PREFIX + n: work / n for n in plan.files}
    engines = []
    for spec in plan.specs:
        log(f"building the {spec.name} engine ({spec.precision}, profiles {[p.name for p in spec.profiles]})")
        blob = build_engine(work / spec.onnx, spec, timing)
        (work / f"{spec.name}.plan").write_bytes(blob)
        files[f"{PREFIX}{spec.name}.plan"] = work / f"{spec.name}.plan"
        engine = load_engine(blob, work / spec.onnx, spec.strip_weights)
        ref_graph = onnx.load(str(work / spec.onnx), load_external_data=False)
        ref_path = work / f"{spec.name}.reference.onnx"  # beside weights.bin; never part of the bundle
        ref_path.write_bytes(with_reference(ref_graph).SerializeToString())
        log(f"comparing the {spec.name} engine with ONNX Runtime (Polygraphy)")
        for profile, feed in comparison_feeds(spec, plan.meta):
            ref = OnnxrtRunner(SessionFromOnnx(str(ref_path)), name=f"ort-{spec.name}")
            cand = TrtRunner(
                engine, name=f"trt-{spec.name}-{spec.profiles[profile].name}", optimization_profile=profile
            )
            res = compare(ref, cand, [feed], atol, rtol, ["logits"])
            comparisons.append(res.to_dict())
            if not res.passed:
                worst = res.outputs[0]
                raise UserError(
                    f"TensorRT {spec.name} engine ({spec.profiles[profile].name})",
                    f"logits differ from ONNX Runtime by {worst.max_abs:.3g} abs / {worst.max_rel:.3g} rel",
                    f"within atol {atol:g} / rtol {rtol:g} (try --trt-precision fp32)",
                )
        engines.append(
            {
                "name": f"trt-{spec.name}",
                "file": f"{PREFIX}{spec.name}.plan",
                "kind": "trt",
                "params": {"precision": spec.precision, "stripped": spec.strip_weights},
                "profile": {},
            }  # fmt: skip
        )
    here.engines = plan.specs
    record = dict(plan.meta, target=asdict(here), comparisons=comparisons)
    files[TRT_JSON] = (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
    return BundlePart(files=files, engines=engines, sections={"trt": TRT_JSON})


def readiness(onnx_path: Path, block: int, context: int = 2048) -> dict[str, Any]:
    """What ``build --target trt`` would lower, checked on any machine (CI without a GPU).

    The dense graph through the op check and the profiles; the sparse graph lowered with
    stand-in predictors (random Φ and decoders: structure only) for a 50% motif. Raises the
    build's one-line error when something would not lower.
    """
    from cscompile.motifs.engine import LayerPredictor, Motif
    from cscompile.passes.pipeline import analyze

    model, um = analyze(onnx_path, block, "trt")
    inter, n, h = um.intermediate_size, um.num_layers, um.hidden_size
    rng = np.random.default_rng(0)
    pred = LayerPredictor(
        rng.standard_normal((16, h)).astype(np.float32), rng.standard_normal((inter, 16)).astype(np.float32)
    )
    half = Motif("half", [inter // 2] * n, [pred] * n)
    dense, lowered, specs = _graphs(model, um, [half], block, "fp16", min(1024, context), context)
    assert lowered is not None  # a 50% motif is sparse
    plugins = sum(nd.op_type == PLUGIN_NAME for nd in lowered.model.graph.node)
    return {
        "dense_nodes": len(dense.graph.node),
        "dense_ops": sorted({nd.op_type for nd in dense.graph.node}),
        "sparse_plugin_nodes": plugins,
        "block": block,
        "topk_max": max(lowered.topk),
        "profiles": {s.name: [p.name for p in s.profiles] for s in specs},
        "context": context,
    }
