"""Per-token switching among native motifs against the static native front, on SmolLM2.

The motifs are the points of a native front (``cscompile build --pareto``), derived with their
K/V kept so one cache serves them all. Each policy runs teacher-forced, one token per step, over
``--tokens`` tokens of ``pydoc_data.topics`` in windows of 512 (the first token of a window runs
dense, as a prompt does): perplexity over every predicted token and the mean wall time of a step
(controller included). Policies: the dense engine, each point alone (the static front), and per
token switching between the dense engine and one point, the point taking the steps whose previous
next-token entropy is below the ``q``-quantile of the dense model's entropy on calibration text
(tokens 8,192 + ``--calib-tokens``, disjoint from the scored ones), for each ``--fractions`` q.
Switching is compared with the static front at matched measured latency (the front's perplexity
interpolated between its points at the switching policy's ms/token). Writes
``benchmarks/results/native_switch.{json,png}``.

    python tools/exp_native_switch.py --bundle out/smol-nfront.csb [--tokens 4096] [--fractions 0.25,0.5,0.75]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import machine_info, save_report
from cscompile.metrics import reference_corpus
from cscompile.models.zoo import fetch
from cscompile.motifs.runtime import ControllerConfig, SwitchStats
from cscompile.native.switch import NativeSwitchingSession, calibrate_entropy, stepped_perplexity
from cscompile.runtime import Tokenizer
from cscompile.search.artifact import increase_at

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 512


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def front_motifs(
    bundle_path: Path, threads: int = 2
) -> tuple[Any, list[tuple[str, Any, dict[str, Any], bool]], Any, Path]:
    """The bundle's native weights and its front points as (name, weights, params, K/V kept), each
    point twice: as the static front ships it and with its K/V kept (as a motif)."""
    from cscompile.bundle import open_bundle
    from cscompile.native.engine import load_weights
    from cscompile.runtime.front import load_point

    b = open_bundle(bundle_path)
    native = next(e for e in b.engines if e.kind == "native" and "search" not in e.params)
    base = load_weights(b.root, b.read_json(native.file), str(b.source))
    section = b.read_json(b.sections["pareto"])
    points = [
        (e.name, load_point(base, e.params, section, str(b.source), b.root, keep_kv=kv), e.params, kv)
        for e in b.engines
        if e.kind == "native" and "search" in e.params
        for kv in (False, True)
    ]
    dense = next(e for e in b.engines if e.kind == "dense")
    ort = OrtDense(dense.path, threads)  # loaded while the bundle is open
    return base, points, ort, fetch("smollm2", progress=say).tokenizer_dir


class OrtDense:
    """The bundle's fused dense ORT graph (int4, exact grid) behind the interface
    ``stepped_perplexity`` steps: the reference issue 5's target names."""

    def __init__(self, path: Path, threads: int) -> None:
        from cscompile.runtime import DecoderSession

        self.session = DecoderSession(path, threads=threads)

    def new_state(self) -> Any:
        st = self.session.new_state()
        st.stats = SwitchStats()
        return st

    def forward_last(self, ids: np.ndarray, st: Any) -> np.ndarray:
        return self.session.forward(np.asarray(ids, np.int64), st)[0, -1]


def resident_bytes(motifs: list[Any]) -> int:
    """Weight bytes a policy keeps in memory: every distinct matrix of its motifs once (derive
    shares what a motif leaves untouched)."""
    seen: dict[int, int] = {}
    for w in motifs:
        for m in [*w.qkv, *w.o, *w.gu, *w.down, w.head, w.emb]:
            if m is not None:
                seen[id(m)] = m.nbytes
    return sum(seen.values())


def combine(parts: list[Any]) -> dict[str, Any]:
    """One policy's windows (SteppedResult each) as one row: token-weighted perplexity, step-weighted times."""
    n = sum(r.tokens_scored for r in parts)
    steps = [max(1, sum(r.histogram.values())) for r in parts]
    hist: dict[str, int] = {}
    for r in parts:
        for k, v in r.histogram.items():
            hist[k] = hist.get(k, 0) + v
    return {
        "perplexity": float(np.exp(sum(r.tokens_scored * np.log(r.perplexity) for r in parts) / n)),
        "tokens_scored": n,
        "ms_per_step": float(np.average([r.ms_per_step for r in parts], weights=steps)),
        "ms_per_step_median_of_windows": float(np.median([r.ms_per_step_median for r in parts])),
        "control_ms_per_step": float(np.average([r.control_ms_per_step for r in parts], weights=steps)),
        "motif_histogram": hist,
    }


def matched(static: list[dict[str, Any]], ms: float) -> float | None:
    """The static points' perplexity at ``ms``, interpolated as the build's ship rule does
    (:func:`cscompile.search.artifact.increase_at`); None faster than all of them."""
    ref = static[0]["perplexity"]  # dense
    at = increase_at([(r["ms_per_step"], r["perplexity"] / ref - 1) for r in static], ms)
    return None if at is None else ref * (1 + at)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle built with --pareto (native front)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--fractions", default="0.25,0.5,0.75")
    ap.add_argument("--hold", type=int, default=0, help="controller hysteresis (steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/native_switch.json")
    ap.add_argument(
        "--render", action="store_true", help="recompute the derived columns of --out and re-plot"
    )
    args = ap.parse_args()
    if args.render:
        import json

        report = json.loads(args.out.read_text())
        finish(report["rows"])
        save_report(report, args.out, to_markdown, lambda p: plot(report, p))
        return
    base, points, ort, tok_dir = front_motifs(args.bundle, args.threads)
    ids = np.asarray(Tokenizer(tok_dir).encode(reference_corpus()), np.int64)
    scored = ids[: args.tokens + 1]
    calib = ids[8192 : 8192 + args.calib_tokens]
    fractions = [float(q) for q in args.fractions.split(",")]
    policies: list[tuple[dict[str, Any], Any]] = []
    dense_bytes = resident_bytes([base])

    def add(name: str, motifs: list[Any], names: list[str], thresholds: list[float], **extra: Any) -> None:
        cfg = ControllerConfig(thresholds, hold=args.hold)
        row = {"policy": name, "weights_vs_dense": resident_bytes(motifs) / dense_bytes, **extra}
        policies.append((row, NativeSwitchingSession(motifs, names, cfg, args.threads, WINDOW + 8)))

    add("dense", [base], ["native"], [], kind="static")
    policies.append(({"policy": "ORT int4 (fused dense graph)", "kind": "ort"}, ort))
    for name, w, params, kv in points:  # alone: static, and as a motif (the same logits, K/V written)
        add(name + (" (K/V kept)" if kv else ""), [w], [name], [], kind="motif" if kv else "static",
            search=params["search"])  # fmt: skip
    for q in fractions:
        thr = calibrate_entropy(base, calib, [q], args.threads)
        for name, w, _, kv in points:
            if kv:
                add(f"native ↔ {name} @ q={q}", [base, w], ["native", name], thr, kind="switching", point=name,
                    fraction=q, threshold=thr[0])  # fmt: skip
    for _, sess in policies:  # warm up: every motif's weights paged in before anything is timed
        stepped_perplexity(sess, scored[:9], 8)
    # windows outer, policies inner: every policy sees the machine in the same state, side by side
    parts: list[list[Any]] = [[] for _ in policies]
    for w0 in range(0, len(scored) - 1, WINDOW):
        for i, (_, sess) in enumerate(policies):
            parts[i].append(stepped_perplexity(sess, scored[w0 : w0 + WINDOW + 1], WINDOW))
        say(f"window {w0 // WINDOW + 1}/{-(-(len(scored) - 1) // WINDOW)} done")
    rows = [{**row, **combine(p)} for (row, _), p in zip(policies, parts)]
    for r in rows:
        say(
            f"{r['policy']}: ppl {r['perplexity']:.3f}, {r['ms_per_step']:.3f} ms/step, {r['motif_histogram']}"
        )
    finish(rows)
    report = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    save_report(report, args.out, to_markdown, lambda p: plot(report, p))


def finish(rows: list[dict[str, Any]]) -> None:
    """The derived columns: against dense, the same shares without routing, the static front."""
    static = [r for r in rows if r["kind"] == "static"]
    dense = static[0]
    alone = {r["policy"].removesuffix(" (K/V kept)"): r for r in rows if r["kind"] == "motif"}
    ort = next((r for r in rows if r["kind"] == "ort"), None)
    for r in rows:
        r["ppl_increase"] = r["perplexity"] / dense["perplexity"] - 1
        r["speedup"] = dense["ms_per_step"] / r["ms_per_step"]
        if ort is not None:
            r["vs_ort"] = ort["ms_per_step"] / r["ms_per_step"]
        if r["kind"] == "switching":
            share = r["motif_histogram"].get(r["point"], 0) / max(1, sum(r["motif_histogram"].values()))
            p = alone[r["point"]]
            r["share"] = share
            # the same shares of steps without routing (no entropy): log-perplexities mix linearly
            r["time_shared_ppl"] = float(
                np.exp((1 - share) * np.log(dense["perplexity"]) + share * np.log(p["perplexity"]))
            )
            r["expected_ms"] = (1 - share) * dense["ms_per_step"] + share * p["ms_per_step"]
            r["static_ppl_at_same_ms"] = matched(static, r["ms_per_step"])


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "| policy | steps on the point | perplexity | vs dense | same shares, no routing | ms/step | vs dense "
        "| vs ORT int4 | expected from the motifs alone | static front at that ms | weights vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        m = r.get("static_ppl_at_same_ms")
        sw = (
            [f"{r['share']:.0%}", f"{r['time_shared_ppl']:.3f}", f"{r['expected_ms']:.3f}"]
            if r["kind"] == "switching"
            else ["", "", ""]
        )
        lines.append(
            f"| {r['policy']} | {sw[0]} | {r['perplexity']:.3f} | {r['ppl_increase']:+.1%} | {sw[1]} | "
            f"{r['ms_per_step']:.3f} | {r['speedup']:.3f}× | {r.get('vs_ort', float('nan')):.2f}× | {sw[2]} | "
            f"{'—' if m is None else f'{m:.3f}'} | {r.get('weights_vs_dense', float('nan')):.2f}× |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    rows = report["rows"]
    static = sorted((r for r in rows if r["kind"] == "static"), key=lambda r: r["ms_per_step"])
    ax.plot(
        [r["ms_per_step"] for r in static], [r["perplexity"] for r in static], "ko-", label="static points"
    )
    for r in static:
        ax.annotate(r["policy"], (r["ms_per_step"], r["perplexity"]), fontsize=7)
    for r in rows:
        if r["kind"] == "ort":
            ax.plot([r["ms_per_step"]], [r["perplexity"]], "r^", label=r["policy"])
    points = sorted({r["point"] for r in rows if r["kind"] == "switching"})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, point in enumerate(points):
        rs = sorted((r for r in rows if r.get("point") == point), key=lambda r: r["share"])
        c = colors[i % len(colors)]
        ax.plot([r["ms_per_step"] for r in rs], [r["perplexity"] for r in rs], "s--", color=c,
                label=f"native ↔ {point}")  # fmt: skip
        dense = static[-1]["perplexity"] if static[-1]["policy"] == "dense" else rows[0]["perplexity"]
        alone = next(r["perplexity"] for r in rows if r["policy"] == point)
        bx.plot([0] + [r["share"] for r in rs] + [1], [dense] + [r["perplexity"] for r in rs] + [alone], "s-",
                color=c, label=f"{point}: routed by entropy")  # fmt: skip
        bx.plot([0, 1], [dense, alone], ":", color=c)
    ax.set_xlabel("ms per decode step (measured, teacher-forced)")
    ax.set_ylabel("perplexity (pydoc topics)")
    ax.set_yscale("log")
    ax.set_title("Per-token switching vs the static points")
    ax.legend(fontsize=7)
    bx.set_xlabel("share of steps on the cheaper motif")
    bx.set_ylabel("perplexity")
    bx.set_yscale("log")
    bx.set_title("Routed by entropy (solid) vs the same shares blindly (dotted)")
    bx.legend(fontsize=6)
    fig.suptitle("Native motifs switched per token, SmolLM2, 2 threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
