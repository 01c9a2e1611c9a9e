"""The sensed vocabulary head (issue 24): the preview of the LM head, its calibrated margin, the
head plan chosen at build time, and the bundle section that carries them (``native/vocab.json``
and ``native/vocab.bin``). The C side is ``cs_dec_forward_sensed`` (csrc/qdecode.c); the decoder
side :meth:`~cscompile.native.engine.NativeDecoder.step_greedy`. docs/design.md "Sensed vocabulary
head" says why each choice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.errors import UserError
from cscompile.limits import is_int32
from cscompile.native.engine import (
    PLANES,
    PREFIX,
    NativeDecoder,
    NativeSession,
    NativeWeights,
    PackedMatrix,
    SensedHead,
    _rows,
    head_as_planes,
    pack,
    rtn_grid,
    unpack,
)
from cscompile.quant.gguf import QK

PREVIEW_BITS = (4,)
#: the candidate counts the build's head plan measures
PLAN_KS = (16, 32, 64, 128, 256)
#: tau = SAFETY x the largest preview error seen on the calibration tokens (in units of e_n |x|)
SAFETY = 1.25
#: temperatures at which the replay measures the sampling distribution's total-variation distance
TV_TEMPS = (1.0, 0.7)
VOCAB_JSON = PREFIX + "vocab.json"
VOCAB_BIN = PREFIX + "vocab.bin"
#: 2: the preview is the head's high bit plane (vocab.bin holds e_n only); 1 carried a Q4_1 copy
FORMAT_VERSION = 2
#: where the bit-plane preview centres each code c = 16 h + l: d (16 h + PLANE_CENTRE), the middle
#: of the low nibble's range [0, 15] (qdecode.c qgemv_planes)
PLANE_CENTRE = 7.5


def build_preview(head: PackedMatrix, bits: int = 4) -> PackedMatrix:
    """A low-bit copy of the LM head for the sensed head's preview scores: the head's values
    re-rounded to ``bits`` (4: Q4_1, round-to-nearest per block of 32), same row-group layout.
    """
    if bits not in PREVIEW_BITS:
        raise UserError("sensed head preview", f"{bits!r} bits", f"one of {list(PREVIEW_BITS)}")
    return pack(rtn_grid(unpack(head).dequantize(), "Q4_1"))


def plane_preview(head: PackedMatrix) -> np.ndarray:
    """The bit-plane preview's values, ``[n, k]``: d (16 h + 7.5) for each code c = 16 h + l
    (what qdecode.c's preview computes, up to the activations' quantization).
    """
    g = unpack(head)
    if g.kind != "Q8_0":
        raise UserError("bit-plane preview", f"a {g.kind} head", "a Q8_0 head")
    h = (g.q.astype(np.int8) >> 4).astype(np.float32)
    return (np.repeat(g.scale, QK, axis=1) * (16 * h + PLANE_CENTRE)).astype(np.float32)


def preview_errors(head: PackedMatrix, preview: PackedMatrix | None = None, chunk: int = 4096) -> np.ndarray:
    """e_n = |W_n - P_n| for every (padded) row, floored at 1e-3 of the median so that a row the
    preview holds exactly still has a scale for the two kernels' different rounding. ``preview``
    None: the head's high bit plane, W_n - P_n = d (l - 7.5) per code.
    """
    w = unpack(head)
    n = w.q.shape[0]
    out = np.zeros(head.n_padded, np.float32)  # padding rows: the floor
    for r0 in range(0, n, chunk):
        rows = np.arange(r0, min(r0 + chunk, n))
        if preview is None:
            wr = _rows(w, rows)
            lo = (wr.q.astype(np.int8) & 15).astype(np.float32) - np.float32(PLANE_CENTRE)
            d = np.repeat(wr.scale, QK, axis=1) * lo
        else:
            d = _rows(w, rows).dequantize() - _rows(unpack(preview), rows).dequantize()
        out[rows] = np.linalg.norm(d, axis=1)
    med = float(np.median(out[:n]))
    return np.maximum(out, np.float32(1e-3 * med if med > 0 else 1e-12))


def _probe(
    decoder: NativeDecoder, preview: PackedMatrix | None, rowerr: np.ndarray, ids: Sequence[int] | np.ndarray
):  # type: ignore[no-untyped-def]
    """Teacher-forced from position 0: per position the full logits z, the preview scores p, |x|,
    and the checked row error norms e over the vocabulary (the same array every position).
    """
    probe = SensedHead(preview, 1, float("inf"), rowerr)
    e = probe.rowerr[: decoder.vocab]
    decoder.reset()
    for t in np.asarray(ids).reshape(-1):
        st = decoder.step_greedy(int(t), probe)
        assert decoder._preview is not None  # made by the step
        yield decoder._logits[: decoder.vocab], decoder._preview[: decoder.vocab], st.xnorm, e


def calibrate_tau(
    decoder: NativeDecoder, preview: PackedMatrix | None, ids: Sequence[int] | np.ndarray, rowerr: np.ndarray,
    safety: float = SAFETY,
) -> tuple[float, np.ndarray]:  # fmt: skip
    """The margin: ``safety`` x the largest preview error in units of its scale,
    ``|z_n - p_n| / (e_n |x|)``, over every vocabulary row at each teacher-forced position of
    ``ids`` (from position 0); also the per-position maxima.
    """
    worst = [
        float(np.max(np.abs(z - p) / e)) / max(x, 1e-30)
        for z, p, x, e in _probe(decoder, preview, rowerr, ids)
    ]
    return safety * max(worst), np.array(worst)


def replay(
    decoder: NativeDecoder, preview: PackedMatrix | None, rowerr: np.ndarray, ids: Sequence[int] | np.ndarray,
    tau: float, ks: Sequence[int],
) -> dict[str, Any]:  # fmt: skip
    """The C step's selection replayed in numpy on held-out ``ids`` for each K (one probe pass;
    tests/unit/test_sensed_head.py checks the C selection equals it): per K the fallback rate,
    agreement with the full head's argmax, the argmax inside the candidates, and the misses the
    rule let through (must be 0), the mean total-variation distance of the sampling distribution
    (exact candidates, preview elsewhere) to the full one at each of ``TV_TEMPS`` (0 where the
    rule fell back: the full head); plus the largest error seen, over tau.
    """
    acc = {k: {"agree": 0, "fallback": 0, "in_topk": 0, "misses_passed": 0, **{f"tv_t{t}": 0.0 for t in TV_TEMPS}}
           for k in ks}  # fmt: skip
    worst, n, kmax = 0.0, 0, max(ks)
    for z, p, x, e in _probe(decoder, preview, rowerr, ids):
        n += 1
        worst = max(worst, float(np.max(np.abs(z - p) / e)) / max(x, 1e-30))
        top = int(np.argmax(z))
        u = p + np.float32(tau) * e * np.float32(x)  # each row's upper bound
        order = np.argpartition(-u, kmax)[: kmax + 1] if kmax < len(u) else np.arange(len(u))
        order = order[np.lexsort((order, -u[order]))]  # by bound, then index
        for k in ks:
            cand = order[:k]
            zc = z[cand]
            best = int(min(cand[zc == zc.max()]))  # lowest index on ties, as the C step
            passed = k < len(order) and bool(zc.max() > u[order[k]])
            a = acc[k]
            a["in_topk"] += top in set(cand.tolist())
            a["fallback"] += not passed
            a["agree"] += (best == top) if passed else 1
            a["misses_passed"] += passed and best != top
            if passed:  # sampling from the candidates' exact logits and the preview elsewhere
                zh = p.astype(np.float64)
                zh[cand] = zc
                for t in TV_TEMPS:
                    a[f"tv_t{t}"] += _tv(z.astype(np.float64) / t, zh / t)
    rates = {
        k: {m: (v / max(n, 1) if m != "misses_passed" else v) for m, v in a.items()} for k, a in acc.items()
    }
    return {"tokens": n, "worst_over_tau": worst / tau if tau > 0 else float("inf"), "by_k": rates}


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance between softmax(a) and softmax(b)."""
    pa, pb = np.exp(a - a.max()), np.exp(b - b.max())
    return 0.5 * float(np.abs(pa / pa.sum() - pb / pb.sum()).sum())


@dataclass
class HeadPlan:
    """What the build chose for the sensed head, and what it measured."""

    sensed: SensedHead | None  # None: not shipped (``why`` says why)
    bits: int
    tau: float
    k: int
    calib_tokens: int
    heldout_tokens: int
    heldout_worst_over_tau: float
    table: list[dict[str, Any]]
    head_bytes: int = 0
    why: str = ""


def plane_ready(head: PackedMatrix) -> bool:
    """Whether ``head`` is (or can be laid out as) bit planes: Q8_0 with fp16 scales."""
    return head.bits == PLANES or (head.bits == 8 and head.fmt == 0 and head.m is None)


def plan_head(
    weights: NativeWeights, calib: Sequence[int] | np.ndarray, heldout: Sequence[int] | np.ndarray,
    threads: int = 1, bits: int = 4, ks: Sequence[int] = PLAN_KS,
) -> HeadPlan:  # fmt: skip
    """Calibrate tau on ``calib``, replay every K on ``heldout``, and pick the K with the fewest
    bytes expected per token (preview + the candidates' row groups + the fallback rate x the
    full head) among those that let no miss through; ship nothing when tau did not hold on the
    held-out tokens (an error beyond tau) or a miss passed at every K. The preview is the high bit
    plane of the head (the bundle stores the head as planes: no extra bytes).
    """
    if bits not in PREVIEW_BITS:
        raise UserError("sensed head preview", f"{bits!r} bits", f"one of {list(PREVIEW_BITS)}")
    if not plane_ready(weights.head):
        return HeadPlan(None, bits, float("nan"), 0, len(calib), 0, float("nan"), [], weights.head.nbytes,
                        f"the head is {weights.head.bits}-bit with scale format {weights.head.fmt} (the preview "
                        "is the high bit plane of a Q8_0 head with fp16 scales)")  # fmt: skip
    weights = head_as_planes(weights)
    head, preview = weights.head, None
    rowerr = preview_errors(head)
    vocab = int(weights.config["vocab"])
    ks = [k for k in ks if k < vocab] or [max(1, vocab - 1)]
    dec = NativeDecoder(weights, threads, max_ctx=max(16, len(calib), len(heldout)))
    tau, _ = calibrate_tau(dec, preview, calib, rowerr)
    rep = replay(dec, preview, rowerr, heldout, tau, ks)
    group = head.nbytes / max(1, head.n_padded // 16)
    table = []
    for k in ks:
        r = rep["by_k"][k]
        expected = plane_bytes(head) + min(k, head.n_padded // 16) * group + r["fallback"] * head.nbytes
        table.append({"k": k, **r, "expected_bytes_per_token": int(expected)})
    safe = [t for t in table if t["misses_passed"] == 0]
    plan = HeadPlan(None, bits, tau, 0, len(calib), int(rep["tokens"]), float(rep["worst_over_tau"]), table,
                    head.nbytes)  # fmt: skip
    if not np.isfinite(tau) or tau <= 0:
        plan.why = f"the calibrated margin is {tau}"
    elif plan.heldout_worst_over_tau > 1.0:
        plan.why = (
            f"a held-out preview error reached {plan.heldout_worst_over_tau:.2f} x the calibrated margin"
        )
    elif not safe:
        plan.why = "the rule let a wrong token through on held-out text at every K"
    else:
        best = min(safe, key=lambda t: t["expected_bytes_per_token"])
        plan.k = int(best["k"])
        plan.sensed = SensedHead(preview, plan.k, tau, rowerr)
    return plan


def plane_bytes(head: PackedMatrix) -> int:
    """Bytes the bit-plane preview reads per token: the high plane and the scales."""
    return int(head.codes.nbytes // 2 + head.d.nbytes)


def vocab_files(plan: HeadPlan, head: PackedMatrix) -> dict[str, bytes]:
    """The bundle section: ``native/vocab.json`` (plan, measurements, array index) and
    ``native/vocab.bin`` (e_n; the preview is the high bit plane of the engine's ``head``).
    """
    from cscompile.bundle.blobs import pack_arrays

    assert plan.sensed is not None and plan.sensed.preview is None
    blob, index = pack_arrays({"rowerr": plan.sensed.rowerr})
    meta = {
        "format_version": FORMAT_VERSION, "bits": plan.bits, "k": plan.k, "tau": plan.tau, "safety": SAFETY,
        "rule": "top K of p_n + tau e_n |x|; accept z* > u_(K+1), else the full head",
        "preview": {"n": head.n, "k": head.k, "bits": 4, "layout": "planes", "bytes": 0,
                    "reads_bytes": plane_bytes(head)},
        "head_bytes": plan.head_bytes,
        "calib_tokens": plan.calib_tokens, "heldout_tokens": plan.heldout_tokens,
        "heldout_worst_over_tau": plan.heldout_worst_over_tau, "table": plan.table, "arrays": index,
    }  # fmt: skip
    return {VOCAB_JSON: (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode(), VOCAB_BIN: blob}


def load_vocab(root: Path, meta: Any, weights: NativeWeights, label: str) -> SensedHead:
    """The sensed head of a verified bundle, checked against its native engine's head (its
    preview is the head's high bit plane: run it on :func:`head_as_planes` of ``weights``).
    """
    from cscompile.bundle import BundleError
    from cscompile.bundle.blobs import array_views

    def fail(got: str, want: str) -> BundleError:
        return BundleError(f"bundle {label}: {VOCAB_JSON}", got, want)

    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise fail(f"has format_version {meta.get('format_version') if isinstance(meta, dict) else None!r}",
                   f"{FORMAT_VERSION} (rebuild the bundle with this cscompile)")  # fmt: skip
    head, vocab = weights.head, int(weights.config["vocab"])
    spec, k, tau = meta.get("preview"), meta.get("k"), meta.get("tau")
    shape = (head.n, head.k, 4, "planes")
    if (
        not isinstance(spec, dict)
        or (spec.get("n"), spec.get("k"), spec.get("bits"), spec.get("layout")) != shape
    ):
        raise fail(f"has a preview of shape {spec!r}",
                   f"the 4-bit high plane of the head's bit planes ({head.n} x {head.k})")  # fmt: skip
    if not plane_ready(head):
        raise fail(f"senses a {head.bits}-bit head (scale format {head.fmt})", "a Q8_0 head with fp16 scales")
    if not isinstance(k, int) or isinstance(k, bool) or not is_int32(k) or not 1 <= k <= vocab:
        raise fail(f"has K = {k!r}", f"an integer in [1, {vocab}]")
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not np.isfinite(tau) or tau < 0:
        raise fail(f"has tau = {tau!r}", "a finite margin >= 0")
    index = meta.get("arrays")
    try:
        views = array_views(root / VOCAB_BIN, index if isinstance(index, dict) else {})
        if set(views) != {"rowerr"}:
            raise fail(f"has arrays {sorted(views)}", "['rowerr'] (the preview is the head's high bit plane)")
        e = views["rowerr"]
        if (e.shape, e.dtype) != ((head.n_padded,), np.float32):
            raise fail(f"has row errors {e.dtype} {e.shape}", f"float32 ({head.n_padded},)")
        return SensedHead(None, int(k), float(tau), np.asarray(e))
    except BundleError:
        raise
    except UserError as exc:
        raise fail(f"{exc.subject}: {exc.received}", exc.expected) from None
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise fail(
            f"is malformed or does not fit vocab.bin ({str(exc)[:120]})", "an untampered bundle"
        ) from None


def sense_head(session: Any, calib_ids: Sequence[int] | np.ndarray, k: int = 64, bits: int = 4) -> SensedHead:
    """Give a :class:`NativeSession` a sensed head calibrated on ``calib_ids`` (teacher-forced from
    position 0) with ``k`` candidates; returns it (bundles carry one from the build instead).
    """
    if not isinstance(session, NativeSession):
        raise UserError("sensed head", f"the {type(session).__name__} engine", "the native engine")
    if bits not in PREVIEW_BITS:
        raise UserError("sensed head preview", f"{bits!r} bits", f"one of {list(PREVIEW_BITS)}")
    session.weights = head_as_planes(session.weights)  # the preview is the head's high bit plane
    rowerr = preview_errors(session.weights.head)
    dec = NativeDecoder(session.weights, session.threads, max_ctx=max(16, len(calib_ids)))
    tau, _ = calibrate_tau(dec, None, calib_ids, rowerr)
    session.sensed = SensedHead(None, int(k), tau, rowerr)
    return session.sensed


# --- Preview choices measured in numpy (tools/bench_vocab.py's sweep; docs/design.md "Sensed
# vocabulary head": the cascade) -------------------------------------------------------------------


def hidden_states(decoder: NativeDecoder, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """The head's input at each teacher-forced position of ``ids`` (from position 0), ``[T, k]``:
    recovered from the full head's logits by least squares (the head has full column rank, so
    this is the activation vector the head's kernels multiply, up to float rounding; the
    relative residual is checked below 1e-4).
    """
    if decoder.w.head.bits != PLANES:
        raise UserError("hidden states from the logits", "a head stored as Q8_0", "head_as_planes(weights)")
    w = unpack(decoder.w.head).dequantize()[: decoder.vocab].astype(np.float64)
    gram = w.T @ w
    probe = SensedHead(None, 1, float("inf"), np.ones(decoder.w.head.n_padded, np.float32))  # the full head
    decoder.reset()
    z = []
    for t in np.asarray(ids).reshape(-1):
        decoder.step_greedy(int(t), probe)
        z.append(decoder._logits[: decoder.vocab].astype(np.float64))
    if not z:
        return np.zeros((0, w.shape[1]), np.float32)
    zs = np.stack(z)
    x = np.linalg.solve(gram, w.T @ zs.T).T
    rel = float(np.linalg.norm(x @ w.T - zs)) / max(float(np.linalg.norm(zs)), 1e-30)
    if rel > 1e-4:
        raise UserError("hidden states from the logits", f"a relative residual of {rel:.2e}", "below 1e-4")
    return x.astype(np.float32)


def top_bits(head: PackedMatrix, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The preview made of the top ``bits`` bits of each Q8_0 code c (``[vocab-or-n, k]`` values
    d (2^s (c >> s) + (2^s - 1) / 2), s = 8 - bits: the centre of the codes that share them) and
    its row error norms e_n = |d ((c & (2^s - 1)) - (2^s - 1) / 2)| floored as
    :func:`preview_errors` (``bits`` 4: exactly the high plane's preview and errors).
    """
    if not 1 <= bits <= 7:
        raise UserError("preview bits", f"{bits!r}", "1 to 7")
    g = unpack(head)
    if g.kind != "Q8_0":
        raise UserError("bit-plane preview", f"a {g.kind} head", "a Q8_0 head")
    s = 8 - bits
    step, centre = float(2**s), (2**s - 1) / 2
    c = g.q.astype(np.int8)
    d = np.repeat(g.scale, QK, axis=1).astype(np.float32)
    p = (d * (step * (c >> s) + centre)).astype(np.float32)
    e = np.linalg.norm(d * ((c & (2**s - 1)).astype(np.float32) - centre), axis=1).astype(np.float32)
    med = float(np.median(e))
    return p, np.maximum(e, np.float32(1e-3 * med if med > 0 else 1e-12))


@dataclass
class PreviewChoice:
    """One way to preview the head: a single stage of the top ``bits`` bits with K candidates, or
    a cascade: the top ``bits`` bits over every row, the K1 best bounds kept, the 4-bit preview
    (the high plane) of those, the K best, exact rows.
    """

    bits: int
    k: int
    k1: int = 0  # 0: one stage

    @property
    def name(self) -> str:
        return f"{self.bits}-bit" if not self.k1 else f"{self.bits}-bit K1={self.k1} -> 4-bit"


def choice_bytes(head: PackedMatrix, ch: PreviewChoice, fallback: float) -> int:
    """Bytes expected per token: the first stage's plane over every row + the scales, a cascade's
    second plane for its K1 rows (rows stored contiguously), K candidate row groups (both
    planes, at most every group), the fallback rate x the full head.
    """
    n, k = head.n_padded, head.k
    scales = n * (k // QK) * 2
    group = head.nbytes / max(1, n // 16)
    out = n * k * ch.bits // 8 + scales + min(ch.k, n // 16) * group + fallback * head.nbytes
    if ch.k1:
        out += ch.k1 * k * (4 - ch.bits) // 8
    return int(out)


def sweep_previews(
    head: PackedMatrix, vocab: int, x_calib: np.ndarray, x_held: np.ndarray, choices: Sequence[PreviewChoice],
    safety: float = SAFETY, chunk: int = 64,
) -> dict[str, Any]:  # fmt: skip
    """Each preview choice's rule replayed in numpy on the held-out hidden states ``x_held``
    (tau per bit width: ``safety`` x the largest |z_n - p_n| / (e_n |x|) on ``x_calib``, as
    :func:`calibrate_tau`): per choice the fallback rate, the argmax inside the candidates, the
    misses the rule let through (must be 0) and the bytes expected per token. A cascade accepts
    z* iff it beats both the best 4-bit bound among the K1 kept rows left out of the K and the
    best first-stage bound left out of the K1 (no row left out at either stage can beat z*).
    Tiered (``fallback_full_tiered``, ``expected_bytes_tiered``): a failed cascade runs the
    one-stage 4-bit rule over every row (the rest of the 4-bit plane) before the full head.
    ``chunk`` positions at a time (a [chunk, vocab] array per bit width).
    """
    w = unpack(head).dequantize()[:vocab]
    bits = sorted({c.bits for c in choices} | {4})
    prev = {b: top_bits(head, b) for b in bits}
    prev = {b: (p[:vocab], e[:vocab]) for b, (p, e) in prev.items()}

    def ratios(x: np.ndarray, b: int) -> np.ndarray:  # per position: max_n |z_n - p_n| / (e_n |x|)
        out = []
        for i in range(0, len(x), chunk):
            xc = x[i : i + chunk]
            err = np.abs(xc @ w.T - xc @ prev[b][0].T) / prev[b][1]
            out.append(err.max(axis=1) / np.maximum(np.linalg.norm(xc, axis=1), 1e-30))
        return np.concatenate(out) if out else np.zeros(0)

    taus = {b: float(safety * ratios(x_calib, b).max()) if len(x_calib) else float("inf") for b in bits}
    worst = {b: float(ratios(x_held, b).max() / taus[b]) if len(x_held) else 0.0 for b in bits}
    need = {b: 1 + max([c.k1 or c.k for c in choices if c.bits == b] or [0]) for b in bits}
    need[4] = max(need[4], 1 + max(c.k for c in choices))  # a failed cascade's 4-bit stage over every row
    acc = {
        i: {"fallback": 0, "fallback_full": 0, "in_topk": 0, "misses_passed": 0} for i in range(len(choices))
    }
    T = len(x_held)
    for i0 in range(0, T, chunk):
        xc = x_held[i0 : i0 + chunk]
        zh = xc @ w.T
        xn = np.linalg.norm(xc, axis=1).astype(np.float32)
        bounds = {
            b: xc @ prev[b][0].T + np.float32(taus[b]) * prev[b][1][None, :] * xn[:, None] for b in bits
        }
        for t in range(len(xc)):
            z = zh[t]
            top = int(np.argmax(z))
            order = {b: _ranked(bounds[b][t], need[b]) for b in bits}
            stage2: dict[tuple[int, int], np.ndarray] = {}
            for i, ch in enumerate(choices):
                u1 = bounds[ch.bits][t]
                if ch.k1:
                    kept = order[ch.bits][: ch.k1]
                    thr1 = u1[order[ch.bits][ch.k1]] if ch.k1 < vocab else -np.inf
                    u4 = bounds[4][t]
                    if (ch.bits, ch.k1) not in stage2:  # the kept rows by 4-bit bound, then index
                        stage2[(ch.bits, ch.k1)] = kept[np.lexsort((kept, -u4[kept]))]
                    ranked = stage2[(ch.bits, ch.k1)]
                    cand = ranked[: ch.k]
                    thr = max(thr1, u4[ranked[ch.k]] if ch.k < len(ranked) else -np.inf)
                else:
                    cand = order[ch.bits][: ch.k]
                    thr = u1[order[ch.bits][ch.k]] if ch.k < vocab else -np.inf
                zc = z[cand]
                best = int(min(cand[zc == zc.max()]))
                passed = bool(zc.max() > thr)
                a = acc[i]
                a["in_topk"] += top in set(cand.tolist())
                a["fallback"] += not passed
                a["misses_passed"] += passed and best != top
                if not passed and ch.k1:  # tiered: the 4-bit stage over every row before the full head
                    u4, o4 = bounds[4][t], order[4]
                    c4 = o4[: ch.k]
                    z4 = z[c4]
                    ok4 = bool(z4.max() > u4[o4[ch.k]])
                    a["misses_passed"] += ok4 and int(min(c4[z4 == z4.max()])) != top
                    passed = ok4
                a["fallback_full"] += not passed
    rows = []
    for i, ch in enumerate(choices):
        a = acc[i]
        f, ff = a["fallback"] / max(T, 1), a["fallback_full"] / max(T, 1)
        tiered = choice_bytes(head, ch, ff)
        if ch.k1:  # a failed cascade reads the rest of the 4-bit plane and K row groups again
            n, k = head.n_padded, head.k
            tiered += int(
                f * (n * k * (4 - ch.bits) // 8 + min(ch.k, n // 16) * head.nbytes / max(1, n // 16))
            )
        rows.append({
            "preview": ch.name, "bits": ch.bits, "k1": ch.k1, "k": ch.k, "tau": taus[ch.bits],
            "heldout_worst_over_tau": worst[ch.bits], "fallback": f, "fallback_full_tiered": ff,
            "in_topk": a["in_topk"] / max(T, 1), "misses_passed": int(a["misses_passed"]),
            "expected_bytes_per_token": choice_bytes(head, ch, f), "expected_bytes_tiered": tiered,
        })  # fmt: skip
    return {"tokens": T, "taus": taus, "rows": rows, "full_head_bytes": head.nbytes}


def _ranked(u: np.ndarray, n: int) -> np.ndarray:
    """The indices of the ``n`` largest of ``u``, by value then index (all of them when n >= len)."""
    idx = np.argpartition(-u, n - 1)[:n] if n < len(u) else np.arange(len(u))
    return idx[np.lexsort((idx, -u[idx]))]
