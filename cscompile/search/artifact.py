"""The Pareto front as bundle engines (``cscompile build --pareto``) and picking a point at load.

With the native engine in the bundle the front is the native engine's
(:func:`native_pareto_part`): points are configurations over its one weights file. Without it
(the rest of this docstring), each chosen front point is a dense ONNX engine
(``engines/pareto-K.onnx``, kind ``dense``).
Points share most tensors (the embedding, every exactly-kept projection), so their weights go
into one content-deduplicated file, ``engines/pareto.bin``, that all of them reference as
external data: a five-point front costs little more than its largest point.

Each engine's ``params`` hold its configuration and the latency the build's table predicts
for it on the build machine (``latency_ms_pred``, with the dense engine's prediction beside
it); its ``profile`` holds its perplexity increase over the dense engine on held-out
calibration tokens (deterministic). The latency table is a measurement: a ``--pareto`` build
is bit-reproducible only with a pinned table (``latency_table=``, ``--latency-table FILE``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.bundle.blobs import ALIGN
from cscompile.errors import UserError
from cscompile.runtime.front import NATIVE_HEAD_BIN
from cscompile.search.joint import (
    EXACT,
    Config,
    LatencyTable,
    Option,
    assemble,
    pareto_front,
    probe_configs,
)

SHARED_BIN = "pareto.bin"
SECTION_FILE = "pareto.json"
BUDGETS = (0.9, 0.8, 0.7, 0.6)
#: perplexity increases the shipped front covers (the fastest point within each; see _choose)
QUALITY_BOUNDS = (0.02, 0.05, 0.10)
#: the share of decode steps a switching point's cheaper motif is calibrated to take
SWITCH_FRACTIONS = (0.25, 0.5, 0.75)


def share_weights(models: dict[str, Path], out_dir: Path, min_bytes: int = 1024) -> dict[str, Path]:
    """Rewrite ``models`` (name → .onnx with inline weights) to reference one deduplicated file.

    Returns name → the rewritten ``out_dir/<name>.onnx``; the weights are in ``out_dir/pareto.bin``.
    """
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    seen: dict[str, tuple[int, int]] = {}
    out: dict[str, Path] = {}
    with (out_dir / SHARED_BIN).open("wb") as f:
        for name, path in models.items():
            proto = onnx.load(str(path))
            for t in proto.graph.initializer:
                data = t.raw_data
                if len(data) < min_bytes:
                    continue
                key = hashlib.sha256(data).hexdigest() + f":{t.data_type}"
                if key not in seen:
                    pad = (-f.tell()) % ALIGN
                    f.write(b"\0" * pad)
                    seen[key] = (f.tell(), len(data))
                    f.write(data)
                offset, length = seen[key]
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", SHARED_BIN), ("offset", str(offset)), ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
            out[name] = out_dir / f"{name}.onnx"
            onnx.save(proto, str(out[name]))
    return out


def measure_latencies(engines: dict[str, Any], threads: int | None, rounds: int = 3, steps: int = 24,
                      prompt: int = 48) -> dict[str, float]:  # fmt: skip
    """Median decode ms/token of each engine (an ONNX path, or a session), rounds interleaved (order flips)."""
    from cscompile.decode.session import DecoderSession, decode_step_seconds

    sessions = {
        n: DecoderSession(p, threads=threads) if isinstance(p, Path) else p for n, p in engines.items()
    }
    times: dict[str, list[float]] = {n: [] for n in sessions}
    names = list(sessions)
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            times[n] += decode_step_seconds(sessions[n], prompt, steps)
    return {n: float(np.median(v)) * 1e3 for n, v in times.items()}


def held_out_ppl(path: Path, ids: np.ndarray, threads: int | None, window: int = 512) -> float:
    from cscompile.decode.session import DecoderSession
    from cscompile.metrics import onnx_scorer, perplexity

    return perplexity(onnx_scorer(DecoderSession(path, threads=threads)), ids, window, window).perplexity


def pareto_part(
    model_dir: Path,
    calib_ids: np.ndarray,
    work: Path,
    *,
    gguf: Path | None,
    threads: int | None = None,
    latency_table: Path | None = None,
    budgets: tuple[float, ...] = BUDGETS,
    say: Callable[[str], None] = lambda m: None,
) -> Any:
    """Search the front of ``model_dir`` (ONNX Runtime engines: builds without the native engine)
    and return the bundle part with its points as engines.
    """
    from cscompile.bundle.parts import BundlePart
    from cscompile.search.joint import TorchVariants, quality_table

    hf = model_dir / "hf"
    if not (hf / "config.json").is_file():
        raise UserError("--pareto", f"no transformers checkpoint in {hf}",
                        "a fetched model (cscompile model fetch) with its hf/ directory")  # fmt: skip
    n_half = len(calib_ids) // 2
    proxy_ids, held_ids = calib_ids[:n_half], calib_ids[n_half:]
    if n_half < 128:
        raise UserError("--pareto calibration", f"{len(calib_ids)} tokens", "at least 256 tokens")
    from cscompile.metrics import scoring_window

    window = scoring_window(model_dir)
    n = int(json.loads((hf / "config.json").read_text())["num_hidden_layers"])
    # the latency table first: the probes are timed before PyTorch is loaded into this process
    if latency_table is not None:
        table = _read_table(latency_table)
    else:
        probes = probe_configs(n)
        paths = {}
        for k, cfg in enumerate(probes):
            say(f"pareto: probe engine {k + 1}/{len(probes)}")
            assemble(model_dir, cfg, work / f"probe-{k}", gguf)
            paths[f"probe-{k}"] = work / f"probe-{k}" / "model.onnx"
        say("pareto: measuring the probe engines")
        ms = measure_latencies(paths, threads)
        table = LatencyTable.fit(probes, [ms[f"probe-{k}"] for k in range(len(probes))])
        for k in range(len(probes)):
            shutil.rmtree(work / f"probe-{k}", ignore_errors=True)
    say(f"pareto: quality proxy on {len(proxy_ids)} calibration tokens (PyTorch)")
    tv = TorchVariants(
        hf, proxy_ids, threads=threads or 2, window=window
    )  # loaded once: proxy and refinement
    quality = quality_table(tv)
    front = pareto_front(quality, table, n)
    dense = Config((Option("keep", EXACT, EXACT),) * n)
    dense_ms = table.predict(dense)
    say("pareto: evaluating the best predicted points of each budget whole (PyTorch)")
    chosen = _choose(front, dense, dense_ms, budgets, tv)
    del tv  # the PyTorch model is not needed for building and timing
    built: dict[str, Path] = {}
    for k, p in enumerate(chosen):
        say(f"pareto: building point {k + 1}/{len(chosen)} (predicted {p.latency_ms:.2f} ms/token)")
        assemble(model_dir, p.config, work / f"point-{k}", gguf)
        built[f"pareto-{k}"] = work / f"point-{k}" / "model.onnx"
    dense_engine = work / "dense-ref"
    assemble(model_dir, dense, dense_engine, gguf)
    say("pareto: perplexity of each point on held-out calibration tokens")
    base_ppl = held_out_ppl(dense_engine / "model.onnx", held_ids, threads, window)
    ppl = {name: held_out_ppl(path, held_ids, threads, window) for name, path in built.items()}
    shared = share_weights(built, work / "shared")
    files: dict[str, Path | bytes] = {f"engines/{n}.onnx": p for n, p in shared.items()}
    if shared:
        files[f"engines/{SHARED_BIN}"] = work / "shared" / SHARED_BIN
    engines: list[dict[str, Any]] = []
    for k, p in enumerate(chosen):
        name = f"pareto-{k}"
        engines.append({
            "name": name,
            "file": f"engines/{name}.onnx",
            "kind": "dense",
            "params": {"search": p.config.describe(), "latency_ms_pred": _ms(p.latency_ms),
                       "dense_latency_ms_pred": _ms(dense_ms), "delta_nll_pred": p.delta_nll,
                       "kl_calibration": p.measured_kl},
            "profile": {"ppl_increase": ppl[name] / base_ppl - 1.0},
        })  # fmt: skip
    section = {
        "latency_table": table.to_dict(),
        "dense": {"latency_ms_pred": dense_ms, "perplexity_held_out": base_ppl},
        "points": _section_points(engines),
        "held_out_tokens": int(len(held_ids)),
        "proxy_tokens": int(len(proxy_ids)),
        "quality_proxy": quality.to_dict(),
    }
    files[SECTION_FILE] = (json.dumps(section, indent=2, sort_keys=True) + "\n").encode()
    return BundlePart(files=files, engines=engines, sections={"pareto": SECTION_FILE})


def _ms(x: float) -> float:
    """A predicted latency as stored: 5 significant digits (tiny models run in hundredths of a ms)."""
    return float(f"{x:.5g}")


#: a shipped point is predicted at least this much faster than dense (less is table noise)
MIN_SAVING = 0.01


def saves_enough(ms: float, dense_ms: float) -> bool:
    """Whether a point predicted at ``ms`` is ``MIN_SAVING`` faster than dense: the rule for every
    point a bundle ships (static and switching).
    """
    return ms < (1 - MIN_SAVING) * dense_ms


def _choose(front: Any, dense: Any, dense_ms: float, budgets: tuple[float, ...], tv: Any,
            bounds: tuple[float, ...] = QUALITY_BOUNDS) -> list[Any]:  # fmt: skip
    """The points a bundle ships, distinct and not dense, fastest last: per quality bound (a
    perplexity increase), the fastest front point whose whole-config KL, measured, stays within
    it (trying up to 6 in order of speed); per latency budget (a fraction of the dense latency),
    the refined best point; only points predicted ``MIN_SAVING`` faster than dense. The bounds
    give the gentle points a user wants (on SmolLM2 every cut past the 4-bit head costs more than
    +5%, which no latency budget of 0.9 or less reaches).
    """
    from cscompile.search.joint import FrontPoint, refine

    chosen: list[Any] = []

    def add(p: Any) -> None:
        if p is not None and p.config != dense and all(p.config != c.config for c in chosen):
            chosen.append(p)

    faster = [p for p in front if saves_enough(p.latency_ms, dense_ms)]
    for bound in bounds:
        limit = float(np.log1p(bound))
        tries = sorted((p for p in faster if p.delta_nll <= limit), key=lambda p: p.latency_ms)[:6]
        for p in tries:
            kl = tv.evaluate(p.config)
            if kl <= limit:
                add(FrontPoint(p.config, p.latency_ms, p.delta_nll, measured_kl=kl))
                break
    for b in budgets:
        add(refine(faster, dense_ms * b, tv, 6))
    return sorted(chosen, key=lambda p: -p.latency_ms)


def _section_points(engines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The front section's summary of its point engines."""
    return [{"engine": e["name"], "latency_ms_pred": e["params"]["latency_ms_pred"],
             "ppl_increase": e["profile"]["ppl_increase"]} for e in engines]  # fmt: skip


def _read_coef(path: Path, terms: tuple[str, ...]) -> dict[str, float]:
    try:
        d = json.loads(path.read_text())
        coef = d.get("coef_ms", d.get("latency_table", {}).get("coef_ms"))
        out = {k: float(v) for k, v in coef.items()}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise UserError(
            "--latency-table", f"{path}: {e}", "a JSON file with coef_ms (as in the bundle's pareto.json)"
        ) from None
    missing = [t for t in terms if t not in out]
    if missing:
        raise UserError(
            "--latency-table", f"{path} lacks the terms {missing}", f"coef_ms with {', '.join(terms)}"
        )
    return out


def _read_table(path: Path) -> LatencyTable:
    from cscompile.search.joint import LAT_TERMS

    return LatencyTable(_read_coef(path, LAT_TERMS), [])


# -- the native engine's front ---------------------------------------------------------------------
NATIVE_SECTION_FILE = "native/front.json"


def native_pareto_part(
    model_dir: Path,
    calib_ids: np.ndarray,
    base: Any,
    *,
    threads: int | None = None,
    latency_table: Path | None = None,
    budgets: tuple[float, ...] = BUDGETS,
    say: Callable[[str], None] = lambda m: None,
) -> Any:
    """The width × depth × precision front of the native engine (:mod:`cscompile.search.native_search`).

    Each chosen point is an engine ``native-K`` of kind ``native`` over the bundle's one native
    weights file: its ``params.search`` names the kept heads/blocks per layer and precisions, and
    the front's section (``native/front.json``) holds the unit ranking that turns it into weights
    at load (:func:`load_point`). No weights are duplicated.
    """
    from cscompile.bundle.parts import BundlePart
    from cscompile.metrics import perplexity, scoring_window
    from cscompile.native.engine import ENGINE_JSON, ENGINE_NAME, NativeSession, pack
    from cscompile.native.points import Ranking, Shape, dense_config, derive_config
    from cscompile.search.native_search import (
        LAT_TERMS,
        NativeLatencyTable,
        NativeVariants,
        pareto_front,
        probe_configs,
        quality_table,
    )

    hf = model_dir / "hf"
    if not (hf / "config.json").is_file():
        raise UserError("--pareto", f"no transformers checkpoint in {hf}",
                        "a fetched model (cscompile model fetch) with its hf/ directory")  # fmt: skip
    n_half = len(calib_ids) // 2
    if n_half < 128:
        raise UserError("--pareto calibration", f"{len(calib_ids)} tokens", "at least 256 tokens")
    proxy_ids, held_ids = calib_ids[:n_half], calib_ids[n_half:]
    window = scoring_window(model_dir)
    shape = Shape.of(base.config)
    ctx = max(1024, window + 8)
    # the latency table first (before PyTorch is loaded); latency depends on counts, not on which
    # heads are kept, so the probes use any ranking
    if latency_table is not None:
        table = NativeLatencyTable(_read_coef(latency_table, LAT_TERMS), [])
    else:
        order = Ranking(
            [list(range(shape.n_heads))] * shape.n_layers, [list(range(shape.ffn_blocks))] * shape.n_layers
        )
        probes = probe_configs(shape)
        say(f"pareto: timing {len(probes)} native probe engines")
        sessions = {
            f"probe-{k}": NativeSession(derive_config(base, c, order), threads, ctx, adaptive=False)
            for k, c in enumerate(probes)
        }
        ms = measure_latencies(sessions, threads)
        del sessions
        table = NativeLatencyTable.fit(probes, [ms[f"probe-{k}"] for k in range(len(probes))])
    say(f"pareto: ranking and quality proxy on {len(proxy_ids)} calibration tokens (PyTorch)")
    tv = NativeVariants(hf, proxy_ids, threads=threads or 2, window=window)
    ranking = tv.ranking
    quality = quality_table(tv)
    front = pareto_front(quality, table)
    dense = dense_config(shape)
    dense_ms = table.predict(dense)
    say("pareto: evaluating the best predicted points of each budget whole (PyTorch)")
    chosen = _choose(front, dense, dense_ms, budgets, tv)
    head = pack(tv.head_grid) if any(p.config.head_bits == 4 for p in chosen) else None
    del tv
    say("pareto: perplexity of each point on held-out calibration tokens (native engine)")

    def ppl_of(w: Any) -> float:
        s = NativeSession(w, threads, context_length=ctx)
        return perplexity(lambda x: s.forward(x, s.new_state()), held_ids, window, window).perplexity

    base_ppl = ppl_of(base)
    engines: list[dict[str, Any]] = []
    for k, p in enumerate(chosen):
        engines.append({
            "name": f"{ENGINE_NAME}-{k}",
            "file": ENGINE_JSON,
            "kind": "native",
            "params": {"search": p.config.describe(), "latency_ms_pred": _ms(p.latency_ms),
                       "dense_latency_ms_pred": _ms(dense_ms), "delta_nll_pred": p.delta_nll,
                       "kl_calibration": p.measured_kl},
            "profile": {"ppl_increase": ppl_of(derive_config(base, p.config, ranking, head)) / base_ppl - 1.0},
        })  # fmt: skip
    say(
        "pareto: per-token switching between the native engine and each point (held-out tokens, native engine)"
    )
    motifs = [(e["name"], derive_config(base, p.config, ranking, head, keep_kv=True), table.predict_motif(p.config))
              for e, p in zip(engines, chosen)]  # fmt: skip
    engines += _switching_engines(base, motifs, engines, dense_ms, proxy_ids, held_ids, threads, ctx)
    section = {
        "engine": "native",
        "reference": ENGINE_NAME,
        "latency_table": table.to_dict(),
        "dense": {"latency_ms_pred": dense_ms, "perplexity_held_out": base_ppl},
        "points": _section_points(engines),
        "ranking": ranking.to_dict(),
        "held_out_tokens": int(len(held_ids)),
        "proxy_tokens": int(len(proxy_ids)),
        "quality_proxy": quality.to_dict(),
    }
    files: dict[str, Path | bytes] = {}
    if head is not None:  # the GPTQ-rounded 4-bit LM head the points with head_bits 4 use
        from cscompile.bundle.blobs import pack_arrays

        assert head.m is not None  # Q4_1
        blob, index = pack_arrays({"head_q4.codes": head.codes, "head_q4.d": head.d, "head_q4.m": head.m})
        files[NATIVE_HEAD_BIN] = blob
        section["head_q4"] = {"n": head.n, "k": head.k, "bits": head.bits, "arrays": index,
                              "rounding": "GPTQ on the proxy tokens"}  # fmt: skip
    files[NATIVE_SECTION_FILE] = (json.dumps(section, indent=1, sort_keys=True) + "\n").encode()
    return BundlePart(files=files, engines=engines, sections={"pareto": NATIVE_SECTION_FILE})


def increase_at(points: list[tuple[float, float]], ms: float) -> float | None:
    """The perplexity increase static ``points`` (ms, increase) reach at ``ms``: log-perplexity
    linear between the neighbouring points of their lower envelope (what alternating the two
    blindly gives); the slowest envelope point's beyond it, None below the fastest point.
    """
    env: list[tuple[float, float]] = []
    for x, q in sorted(points):
        if not env or q < env[-1][1]:  # a slower point with a worse increase is not on the envelope
            env.append((x, q))
    if not env or ms < env[0][0]:
        return None
    for (x0, q0), (x1, q1) in zip(env, env[1:]):
        if x0 <= ms <= x1:
            t = (ms - x0) / (x1 - x0)
            return float(np.expm1((1 - t) * np.log1p(q0) + t * np.log1p(q1)))
    return env[-1][1]


def _switching_engines(
    base: Any,
    motifs: list[tuple[str, Any, float]],
    static: list[dict[str, Any]],
    dense_ms: float,
    calib_ids: np.ndarray,
    held_ids: np.ndarray,
    threads: int | None,
    ctx: int,
    fractions: tuple[float, ...] = SWITCH_FRACTIONS,
) -> list[dict[str, Any]]:
    """Switching points: the native engine and one front point (``motifs``: name, weights with
    K/V kept, predicted ms as a motif), the point running the steps whose previous entropy is
    below the ``q``-quantile of the native engine's on ``calib_ids``. Each candidate runs
    teacher-forced on ``held_ids`` (stepped perplexity against the native engine's, stepped the
    same way); its latency is predicted from the share of steps each motif ran. Shipped: the
    candidates better than the static points around them (log-perplexity interpolated between
    the neighbouring static points at the candidate's latency) and not dominated by another
    candidate. (The static points' increases come from the batched held-out perplexity, the
    candidates' from the stepped one; both are ratios to the native engine on the same tokens.)
    On SmolLM2 (BENCHMARKS.md) routing by entropy beats alternating the same motifs blindly only
    for heavily cut motifs; what ships are points near dense whose edge over the interpolated
    static points is within the noise of the held-out sample.
    """
    from cscompile.motifs.runtime import ControllerConfig
    from cscompile.native.engine import ENGINE_JSON, ENGINE_NAME
    from cscompile.native.switch import NativeSwitchingSession, calibrate_entropy, stepped_perplexity

    window = min(512, len(held_ids) - 1)

    def run(ws: list[Any], names: list[str], thr: list[float]) -> Any:
        sess = NativeSwitchingSession(ws, names, ControllerConfig(thr, hold=0), threads, ctx)
        return stepped_perplexity(sess, held_ids, window)

    dense = run([base], [ENGINE_NAME], [])
    cands: list[dict[str, Any]] = []
    for q in fractions:
        thr = calibrate_entropy(base, calib_ids[:512], [q], threads or 2)
        for name, w, ms in motifs:
            r = run([base, w], [ENGINE_NAME, name], thr)
            share = r.share(name)
            cands.append({
                "name": "", "file": ENGINE_JSON, "kind": "native",
                "params": {"switch": {"motifs": [ENGINE_NAME, name], "entropy_thresholds": thr, "hold": 0},
                           "share_pred": round(share, 4), "calibration_quantile": q,
                           "latency_ms_pred": _ms((1 - share) * dense_ms + share * ms),
                           "dense_latency_ms_pred": _ms(dense_ms)},
                "profile": {"ppl_increase": r.perplexity / dense.perplexity - 1.0},
            })  # fmt: skip

    def point(e: dict[str, Any]) -> tuple[float, float]:
        return float(e["params"]["latency_ms_pred"]), float(e["profile"]["ppl_increase"])

    others = [point(e) for e in static] + [(dense_ms, 0.0)]

    def beats_static(ms: float, q: float) -> bool:
        at = increase_at(others, ms)
        return at is None or q < at  # faster than every static point: nothing to compare with

    # a switching point ships only where it beats the static points around it, not merely fills a gap
    keep = [
        c
        for c in cands
        if saves_enough(point(c)[0], dense_ms)
        and beats_static(*point(c))
        and not any(
            point(d) != point(c) and point(d)[0] <= point(c)[0] and point(d)[1] <= point(c)[1] for d in cands
        )
    ]
    keep.sort(key=lambda e: -point(e)[0])
    for k, e in enumerate(keep):
        e["name"] = f"{ENGINE_NAME}-switch-{k}"
    return keep


# -- picking a point at load ----------------------------------------------------------------
