"""The correctness gate: every engine a build ships, compared with the source ONNX before packaging.

Each engine runs the same calibration sequences as the source model through ONNX Runtime: a
prefill of :data:`PREFILL` tokens, then :data:`STEPS` cached decode steps, teacher-forced (the
engine is fed the sequence's next id, not its own choice, so one early difference cannot hide
or multiply the later ones). At every position of the decode steps and the prefill's last
position the logits are compared:

1. ``max_rel``: ``max |engine - source|`` over all compared logits, over the source's logit
   scale (``max |source|``). An fp32 engine passes at ``≤`` :data:`FP32_REL` (an honest one
   measures 1e-7 to 1e-6; a dropped QK-norm, sliding window or RoPE scaling is of order 1).
2. ``mean_kl``: the mean KL(source ‖ engine) in nats, and ``top1``: the fraction of *decided*
   positions (source margin top-1 minus top-2 ≥ :data:`DECIDED`) where the engine's argmax is
   the source's. A quantized engine passes at ``mean_kl ≤`` :data:`QUANT_KL` and
   ``top1 ≥`` :data:`QUANT_TOP1` (from :data:`MIN_DECIDED` decided positions); a loose bound: gross breakage only.
3. The native engine (block-quantized weights) must also be at least as faithful as the dense
   ORT engine of the same build: ``mean_kl ≤ NATIVE_RATIO × dense mean_kl +`` :data:`NATIVE_SLACK`.

What fails: the dense engine → :class:`~cscompile.errors.UserError` naming the engine, the
sequence/position and the error vs tolerance (a fused-attention dense engine is first rebuilt
without fusion when the build can, and the fusion is dropped with a warning if that passes);
the native engine → dropped from the bundle with a one-line warning.

Motif engines drop FFN channels on purpose: they are gated against the source with the same
channels removed (:mod:`cscompile.compiler.gate_units`); a disagreeing one drops the motif family
with a one-line warning. Other engines (pareto points, classifier, TensorRT) are not gated here
(docs/design.md "Correctness gate").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.errors import UserError

#: tokens of each calibration prompt's prefill: long enough that the decode steps run at positions
#: where a RoPE scaling (Llama-3: wavelengths over 2048 stretched 8x) moves angles by tenths of a radian
PREFILL = 112
STEPS = 20  #: cached decode steps after it (≥ 16: a dropped 16-token sliding window shows)
FP32_REL = 1e-4  #: fp32 engines: max |Δlogit| / max |source logit|
QUANT_KL = 1.0  #: quantized engines: mean KL(source ‖ engine), nats
QUANT_TOP1 = 0.8  #: quantized engines: top-1 agreement on decided positions
DECIDED = 1.0  #: a position is decided when the source's top-2 margin is at least this (logits)
#: the top-1 criterion applies from this many decided positions (fewer say little: a tiny random
#: model int4 on text had 3, of which 1 agreed, at a mean KL of 0.2)
MIN_DECIDED = 10
NATIVE_RATIO = 1.5
NATIVE_SLACK = 1e-3  #: nats; an honest native engine measures below the dense one (int8 activations)
#: calibration text (encoded by the bundle's tokenizer) — code and prose, as the shipped prompts
TEXTS = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])",
    "The quick brown fox jumps over the lazy dog. A sentence that uses every letter of the alphabet "
    "is called a pangram, and such sentences are used to test typewriters and fonts.",
)

#: ``run(ids) -> logits [n_compared, V]`` for one calibration sequence
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class Measure:
    """One engine's errors against the source over all calibration sequences."""

    max_abs: float
    max_rel: float
    mean_kl: float
    top1: float
    worst: tuple[int, int]  # (sequence, position) of the largest |Δlogit|
    decided: int = 0  # positions the top-1 agreement counts

    def record(self) -> dict[str, Any]:
        """2 significant digits (so that the bundle's hash does not follow the last bits of one CPU's
        kernels); a non-finite value (only a failed engine has one) as ``None``.
        """

        def num(x: float) -> float | None:
            return float(f"{x:.2g}") if np.isfinite(x) else None

        return {"max_abs": num(self.max_abs), "max_rel": num(self.max_rel), "mean_kl": num(self.mean_kl),
                "top1": num(self.top1)}  # fmt: skip


def calibration_ids(tokenizer: Any | None, vocab: int) -> list[np.ndarray]:
    """``PREFILL + STEPS`` ids per sequence: the tokenizer's encodings of :data:`TEXTS` (or fixed ids)."""
    n = PREFILL + STEPS
    out = []
    for i in range(len(TEXTS)):
        texts = TEXTS[i:] + TEXTS[:i]  # each sequence starts with another text, then cycles through them
        ids = (
            np.concatenate([np.asarray(tokenizer.encode(t), np.int64) for t in texts])
            if tokenizer is not None
            else np.zeros(0, np.int64)
        )
        if len(ids) < 16:  # no (usable) tokenizer: fixed ids, valid in any vocabulary
            ids = (np.arange(n, dtype=np.int64) * (37 + i) % 97 + 3) % vocab
        out.append(np.resize(ids, n))
    return out


def _teacher_forced(forward: Callable[[np.ndarray], np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Logits of the prefill's last position and of every decode step: ``[1 + STEPS - 1, V]``."""
    rows = [forward(ids[:PREFILL])[-1]]
    for t in range(PREFILL, len(ids) - 1):
        rows.append(forward(ids[t : t + 1])[-1])
    return np.stack(rows).astype(np.float64)


def onnx_runner(path: Path, threads: int | None = None) -> Runner:
    """A runner over an ONNX decoder through :class:`~cscompile.decode.session.DecoderSession`."""
    from cscompile.decode.session import DecoderSession

    sess = DecoderSession(path, threads=threads)

    def run(ids: np.ndarray) -> np.ndarray:
        st = sess.new_state()
        return _teacher_forced(lambda x: sess.forward(x[None], st)[0], ids)

    return run


def native_runner(weights: Any, threads: int | None = None) -> Runner:
    """A runner over native weights (:class:`~cscompile.native.engine.NativeDecoder`)."""
    from cscompile.native.engine import NativeDecoder

    dec = NativeDecoder(weights, threads=threads or 2, max_ctx=max(64, PREFILL + STEPS))

    def run(ids: np.ndarray) -> np.ndarray:
        dec.reset()
        return _teacher_forced(lambda x: dec.forward(x, all_logits=True), ids)

    return run


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def measure(source: Sequence[np.ndarray], engine: Sequence[np.ndarray]) -> Measure:
    """Compare an engine's logits with the source's (one ``[n, V]`` array per sequence)."""
    max_abs, scale, worst = 0.0, 0.0, (0, 0)
    kls, agree, decided = [], 0, 0
    for i, (s, e) in enumerate(zip(source, engine)):
        if s.shape != e.shape:
            raise UserError(
                "correctness gate", f"engine logits of shape {e.shape}", f"{s.shape} (the source's)"
            )
        d = np.abs(e - s)
        if not np.all(np.isfinite(e)):
            d = np.where(np.isfinite(d), d, np.inf)
        if i == 0 or d.max() > max_abs:
            j = int(np.unravel_index(int(np.argmax(d)), d.shape)[0])
            max_abs, worst = float(d.max()), (i, PREFILL - 1 + j)
        scale = max(scale, float(np.abs(s).max()))
        ls, le = _log_softmax(s), _log_softmax(e)
        kls.append((np.exp(ls) * (ls - le)).sum(axis=-1))
        top2 = np.sort(s, axis=-1)[:, -2:]
        dec = (top2[:, 1] - top2[:, 0]) >= DECIDED
        decided += int(dec.sum())
        agree += int((np.argmax(s, axis=-1) == np.argmax(e, axis=-1))[dec].sum())
    kl = float(np.mean(np.concatenate(kls)))
    return Measure(
        max_abs=max_abs,
        max_rel=max_abs / max(scale, 1e-6),
        mean_kl=kl if np.isfinite(kl) else float("inf"),
        top1=agree / decided if decided else 1.0,
        worst=worst,
        decided=decided,
    )


def verdict(m: Measure, precision: str, dense: Measure | None = None) -> str | None:
    """Why ``m`` fails its tolerance (one phrase), or ``None`` when it passes."""
    at = f"worst at sequence {m.worst[0]} position {m.worst[1]}"
    if precision == "fp32":
        if not m.max_rel <= FP32_REL:
            return f"max |Δlogit| {m.max_abs:.3g} = {m.max_rel:.2g} of the logit scale ({at}), tolerance {FP32_REL:g}"
        return None
    if not m.mean_kl <= QUANT_KL:
        return f"mean KL {m.mean_kl:.3g} nats, tolerance {QUANT_KL:g} (max |Δlogit| {m.max_abs:.3g}, {at})"
    if m.decided >= MIN_DECIDED and not m.top1 >= QUANT_TOP1:
        return f"top-1 agreement {m.top1:.0%} on decided positions, tolerance {QUANT_TOP1:.0%} ({at})"
    if dense is not None:
        bound = NATIVE_RATIO * dense.mean_kl + NATIVE_SLACK
        if not m.mean_kl <= bound:
            return (
                f"mean KL {m.mean_kl:.3g} nats vs the dense engine's {dense.mean_kl:.3g} "
                f"(tolerance {bound:.3g}; max |Δlogit| {m.max_abs:.3g}, {at})"
            )
    return None


@dataclass
class GateResult:
    """What the gate decided: the dense engine to ship, whether the native engine stays, the record."""

    engine_path: Path
    fused: bool
    keep_native: bool
    record: dict[str, Any]
    warnings: list[str]
    keep_motifs: bool = True
    dropped_points: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class UnitNames:
    """Where the source's units are, for the references of engines that drop them."""

    acts: list[str]  # per layer: the FFN activation (the down projection's input)
    contexts: list[str]  # per layer: the attention's O-projection input
    widths: list[int]  # per layer: the FFN width
    work: Path  # where the reference graph is written


def run_gate(
    source: Path,
    engine_path: Path,
    precision: str,
    *,
    fused: bool = False,
    native_weights: Any = None,
    tokenizer: Any = None,
    rebuild_unfused: Callable[[], Path] | None = None,
    threads: int | None = None,
    units: UnitNames | None = None,
    motif_files: Mapping[str, Path | bytes] | None = None,
    points: Sequence[tuple[str, Path, Mapping[str, Any]]] = (),
) -> GateResult:
    """Compare the dense engine (and the native weights, if any) with ``source`` through ORT.

    ``rebuild_unfused``: makes the dense engine again without attention fusion (returns its
    path); called once if the fused engine fails. Raises :class:`UserError` when the dense
    engine (after that) still disagrees; drops a disagreeing native engine with a warning.
    ``units``: where the source's FFN activations and attention contexts are (the reference for
    engines that drop units, :mod:`cscompile.compiler.gate_units`). ``motif_files``: a motif
    part's files; its engines are gated against the source with the same FFN channels removed,
    and one that disagrees drops the whole family (its motifs share one engine and one
    controller) with a warning. ``points``: ``(name, onnx path, search config)`` of depth-dropped
    ORT Pareto points, each gated against the source with the same layers and FFNs removed; one
    that disagrees is dropped (``GateResult.dropped_points``) with a warning.
    """
    src_run = onnx_runner(source, threads)
    seqs: list[np.ndarray] = []
    src_logits: list[np.ndarray] = []
    for ids in calibration_ids(tokenizer, _vocab(source)):
        seqs.append(ids)
        src_logits.append(src_run(ids))
    warnings: list[str] = []
    tol: dict[str, Any] = (
        {"max_rel": FP32_REL}
        if precision == "fp32"
        else {"mean_kl": QUANT_KL, "top1": QUANT_TOP1, "decided_margin": DECIDED}
    )
    record: dict[str, Any] = {"sequences": len(seqs), "prefill": PREFILL, "steps": STEPS, "engines": {}}

    def dense_measure(path: Path) -> Measure:
        run = onnx_runner(path, threads)
        return measure(src_logits, [run(ids) for ids in seqs])

    dm = dense_measure(engine_path)
    why = verdict(dm, precision)
    if why is not None and fused and rebuild_unfused is not None:
        unfused = rebuild_unfused()
        um = dense_measure(unfused)
        if verdict(um, precision) is None:
            warnings.append(
                f"attention fusion dropped: the fused dense engine disagrees with the source ({why})"
            )
            engine_path, fused, dm, why = unfused, False, um, None
    if why is not None:
        raise UserError(
            f"correctness gate: the dense {precision} engine" + (" (fused attention)" if fused else ""),
            f"disagrees with the source ONNX: {why}",
            "an engine that computes the source model (report this model to cscompile)",
        )
    record["engines"]["dense"] = {**dm.record(), "tolerance": tol}

    keep_native = native_weights is not None
    if native_weights is not None:
        run = native_runner(native_weights, threads)
        nm = measure(src_logits, [run(ids) for ids in seqs])
        why = verdict(nm, precision, dense=dm)
        entry = {
            **nm.record(),
            "tolerance": {**tol, "vs_dense": f"mean_kl <= {NATIVE_RATIO:g} x dense + {NATIVE_SLACK:g}"},
        }
        if why is not None:
            keep_native = False
            warnings.append(f"native engine dropped: it disagrees with the source ONNX ({why})")
            entry["dropped"] = True
        record["engines"]["native"] = entry
    keep_motifs, dropped_points = True, []
    if units is not None and (motif_files is not None or points):
        from cscompile.compiler.gate_units import motif_runs, point_runs

        ffn_tol = {"max_rel": FP32_REL}
        quant_tol = {**tol, "vs_dense": f"mean_kl <= {NATIVE_RATIO:g} x dense + {NATIVE_SLACK:g}"}
        if motif_files is not None:
            try:
                runs = motif_runs(motif_files, source, units.acts, units.contexts, seqs, src_logits,
                                  units.work, PREFILL, threads)  # fmt: skip
            except KeyError as exc:  # the unit map names a value the source graph does not have
                runs = []
                keep_motifs = False
                warnings.append(
                    f"motif engines dropped: the gate cannot remove units from the source (no value {exc})"
                )
            failure = None
            for r in runs:
                mm = measure(r.reference, r.engine)
                fp32 = r.precision == "fp32"
                why = r.miscount or verdict(mm, "fp32" if fp32 else "int8", dense=None if fp32 else dm)
                record["engines"][r.name] = {
                    **mm.record(),
                    "tolerance": ffn_tol if fp32 else quant_tol,
                    "reference": "source with the FFN channels the engine did not run zeroed"
                    if r.sparse
                    else "source",
                }
                if why is not None and failure is None:
                    failure = f"{r.name}: {why}"
            if failure is not None:  # the whole family: its motifs share one engine and one controller
                keep_motifs = False
                warnings.append(f"motif engines dropped: {failure}")
                for r in runs:
                    record["engines"][r.name]["dropped"] = True
        if points:
            try:
                prs = point_runs(points, source, units.acts, units.contexts, units.widths, seqs, units.work,
                                 lambda p: onnx_runner(p, threads), PREFILL, threads)  # fmt: skip
            except KeyError as exc:
                prs = []
                dropped_points = [name for name, _, _ in points]
                warnings.append(
                    f"pareto points dropped: the gate cannot remove units from the source (no value {exc})"
                )
            for name, eng, ref in prs:
                pm = measure(ref, eng)
                why = verdict(pm, precision if precision != "fp32" else "int8", dense=dm)
                entry = {**pm.record(), "tolerance": quant_tol,
                         "reference": "source with the point's dropped layers and FFNs removed"}  # fmt: skip
                if why is not None:
                    dropped_points.append(name)
                    warnings.append(f"pareto point {name} dropped: it disagrees with its reference ({why})")
                    entry["dropped"] = True
                record["engines"][name] = entry
    return GateResult(engine_path, fused, keep_native, record, warnings, keep_motifs, dropped_points)


def gate_stage(ctx: Any, parts: Sequence[Any]) -> list[Any]:
    """The build's gate stage over a :class:`~cscompile.steps.base.BuildContext` and the steps' parts.

    Sets ``ctx.gate`` (the record for ``build.json``), may swap ``ctx.engine_path``/``ctx.fused``
    for an unfused rebuild, and returns ``parts`` without the native engine's when it failed
    (its Pareto points go with it: they run the same weights).
    """
    from cscompile.passes.precision import precision_plan, quantize_model

    c = ctx.config

    def unfused() -> Path:
        quantize_model(
            ctx.onnx_path, ctx.work / "unfused", precision_plan(c.precision), "auto", fuse_attention="off"
        )
        return ctx.work / "unfused" / "model.onnx"

    # the prompt scorer and the classifier were made from the fused engine: no unfused fallback then
    from_dense = c.prompt_scorer or c.task == "classify"
    motif_part = next((p for p in parts if any(e.get("kind") == "motif" for e in p.engines)), None)
    if motif_part is not None and "motifs/engine.json" not in motif_part.files:
        name = next(e.get("name") for e in motif_part.engines if e.get("kind") == "motif")
        raise UserError(
            "build part",
            f"motif engine '{name}' without its motif family (no motifs/engine.json)",
            "a motif family the correctness gate can run (an engine it cannot compare is not shipped)",
        )
    point_part = next((p for p in parts if "pareto" in p.sections), None)
    point_files = point_part.files if point_part is not None else {}
    points = [
        (e["name"], Path(point_files[e["file"]]), e["params"]["search"])
        for e in (point_part.engines if point_part is not None else [])
        if e.get("kind") == "dense" and isinstance(point_files.get(e["file"]), Path)
    ]
    um = ctx.unit_map
    units = (
        UnitNames(
            [la.mlp_act for la in um.layers],
            [la.attn_context for la in um.layers],
            [la.mlp.intermediate_size for la in um.layers],
            ctx.work,
        )  # fmt: skip
        if um is not None
        else None
    )
    result = run_gate(
        ctx.onnx_path, ctx.engine_path, c.precision, fused=ctx.fused, native_weights=ctx.native_weights,
        tokenizer=ctx.tokenizer(), rebuild_unfused=None if from_dense else unfused, units=units,
        motif_files=motif_part.files if motif_part is not None else None, points=points,
    )  # fmt: skip
    ctx.engine_path, ctx.fused, ctx.gate = result.engine_path, result.fused, result.record
    ctx.warnings.extend(result.warnings)
    kept = list(parts)
    if not result.keep_motifs:  # the whole family: its engines share one engine and one controller
        kept = [p for p in kept if p is not motif_part]
    if result.dropped_points and point_part is not None:
        kept = [p for p in kept if p is not point_part]
        trimmed = without_points(point_part, result.dropped_points)
        if trimmed is not None:
            kept.append(trimmed)
    if result.keep_native:
        return kept
    # the sensed head's section goes with the engine whose head it senses
    return [
        p for p in kept if not any(e.get("kind") == "native" for e in p.engines) and "vocab" not in p.sections
    ]


def without_points(part: Any, names: Sequence[str]) -> Any:
    """``part`` (the ORT front's) without the point engines ``names``: their engines, files and
    section entries; None when no point is left (the part goes whole).
    """
    import dataclasses
    import json

    engines = [e for e in part.engines if e["name"] not in names]
    if not any(e["name"].startswith("pareto-") for e in engines):
        return None
    files = {k: v for k, v in part.files.items() if not any(k == f"engines/{n}.onnx" for n in names)}
    rel = part.sections["pareto"]
    section = json.loads(files[rel])
    section["points"] = [p for p in section.get("points", []) if p.get("engine") not in names]
    files[rel] = (json.dumps(section, indent=2, sort_keys=True) + "\n").encode()
    return dataclasses.replace(part, files=files, engines=engines)


def _vocab(source: Path) -> int:
    """The source's vocabulary size (the logits' last dimension), read from its graph outputs."""
    import onnx

    proto = onnx.load(str(source), load_external_data=False)
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        if out.name == "logits" and dims and dims[-1].HasField("dim_value"):
            return int(dims[-1].dim_value)
    return 97  # fixed ids stay below 100: any real vocabulary holds them


def check_record(build: dict[str, Any] | None, engines: Sequence[dict[str, Any]], label: str) -> str | None:
    """``cscompile verify``'s check of a bundle's gate record (``build.json``'s ``gate``).

    Returns a warning (one line) for a bundle without the record (built before the gate, or not
    by ``cscompile build``); raises :class:`UserError` for a record that does not cover the
    shipped dense/native engines, or whose measured errors exceed their recorded tolerance.
    """
    if not build or "gate" not in build:
        return f"{label} has no correctness-gate record (built before the gate?): rebuild it to have its engines checked"
    rec = build["gate"]
    measured = rec.get("engines") if isinstance(rec, dict) else None
    if not isinstance(measured, dict):
        raise UserError(f"{label} build.json", "a malformed gate record", "gate.engines: {engine: measures}")
    precision = build.get("precision")
    for e in engines:
        kind, name = e.get("kind"), e.get("name")
        key = (
            "dense"
            if (kind == "dense" and name == "dense")
            else "native"
            if (kind, name) == ("native", "native")
            else name
            if kind == "motif" or (kind == "dense" and str(name).startswith("pareto-"))
            else None
        )
        if key is None:
            continue  # native-K points, classifier, TensorRT engines: not gated (docs/design.md)
        m = measured.get(key)
        if not isinstance(m, dict) or m.get("dropped"):
            what = "no gate measurement" if not isinstance(m, dict) else "the gate dropped it"
            raise UserError(
                f"{label} engine '{name}'", f"is shipped but has {what}", "engines the gate passed"
            )
        try:
            mm = Measure(
                float(m["max_abs"]), float(m["max_rel"]), float(m["mean_kl"]), float(m["top1"]), (0, 0)
            )
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"{label} build.json",
                f"a malformed gate entry for '{name}'",
                "max_abs, max_rel, mean_kl, top1",
            ) from None
        tolerance = m.get("tolerance")
        # a motif engine's own precision: fp32 records are held to the fp32 bound whatever the build's
        rule = "fp32" if isinstance(tolerance, dict) and "max_rel" in tolerance else str(precision)
        why = verdict(mm, rule)
        if why is not None:
            raise UserError(
                f"{label} engine '{name}'", f"its recorded gate errors fail: {why}", "errors within tolerance"
            )
    return None
