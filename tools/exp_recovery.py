"""Support recovery on SmolLM2's real FFN traces: the phase transition, diversity and drift.

Traces: the FFN input ``x`` and channel activity ``s = |a|·‖down_i‖`` of several layers, from
dense prefill (the motif engine's recorder) over calibration text (fit) and held-out text (test).

1. **Phase transition** — support F1 against the oracle top-k, versus the number of
   measurements m, for each solver: OMP / CoSaMP / group FISTA on ``y − c = D s`` with a
   dictionary ``D`` (m × I) fitted by least squares on the fit tokens, and the ridge sketch
   decoder (y → s). Gaussian Φ; k = 5%, 10%, 25% of the channels (OMP/CoSaMP only where k ≤ m/2).
2. **Diversity across task families** — Jaccard between the per-family supports (the top 50%
   channels by how often each is in a token's oracle top 50%), on the shipped prompt set.
3. **Drift across positions** — Jaccard between consecutive tokens' oracle supports (random
   50% sets: 1/3).

    python tools/exp_recovery.py          # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cscompile.data.prompts import load_prompts
from cscompile.decode.tokenizer import Tokenizer
from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import machine_info, save_report
from cscompile.metrics import reference_corpus
from cscompile.models.zoo import fetch
from cscompile.motifs.engine import LayeredEngine
from cscompile.motifs.segments import plan_segments
from cscompile.passes.pipeline import analyze
from cscompile.recovery.operators import MeasurementOperator
from cscompile.recovery.solvers import SketchDecoder, cosamp, fista_group, omp
from cscompile.recovery.supports import support_f1, topk_support

ROOT = Path(__file__).resolve().parents[1]


def traces(eng: LayeredEngine, ids: np.ndarray, layers: list[int], window: int = 512) -> dict[int, tuple]:
    """``{layer: (x [T, H], s [T, I])}`` from dense prefill over ``ids`` in windows."""
    norms = {li: np.linalg.norm(eng.ffn[li].dense_weights()[:, 2, :], axis=1) for li in layers}
    xs: dict[int, list] = {li: [] for li in layers}
    ss: dict[int, list] = {li: [] for li in layers}

    def rec(li: int, x: np.ndarray, a: np.ndarray) -> None:
        if li in xs:
            xs[li].append(x.astype(np.float32))
            ss[li].append((np.abs(a) * norms[li]).astype(np.float32))

    eng.recorder = rec
    try:
        for b in range(0, len(ids) - 1, window):
            eng.forward(np.asarray(ids)[None, b : b + window], eng.new_state())
    finally:
        eng.recorder = None
    return {li: (np.concatenate(xs[li]), np.concatenate(ss[li])) for li in layers}


def phase_transition(fit, test, ms, fracs, solvers, test_tokens, seed=0) -> list[dict]:  # type: ignore[no-untyped-def]
    rows = []
    for m in ms:
        for frac in fracs:
            f1s: dict[str, list[float]] = {s: [] for s in solvers}
            for li in fit:
                xf, sf = fit[li]
                xt, st = test[li]
                inter = sf.shape[1]
                k = max(1, round(frac * inter))
                phi = MeasurementOperator("gaussian", m, xf.shape[1], seed + li).matrix
                yf, yt = xf @ phi.T, xt[:test_tokens] @ phi.T
                # dictionary: y ≈ D s + c (least squares over the fit tokens)
                sm, ym = sf.mean(0), yf.mean(0)
                sc = (sf - sm).astype(np.float64)
                gram = sc.T @ sc + 1e-3 * len(sc) * np.eye(inter)
                dict_t = np.linalg.solve(gram, sc.T @ (yf - ym))  # [I, m] = Dᵀ
                dmat = dict_t.T
                sketch = SketchDecoder(1e-3).fit(yf, sf)
                groups = np.arange(inter)
                for t in range(len(yt)):
                    truth = topk_support(st[t], k)
                    r = yt[t] - ym - dmat @ sm  # measurements of the deviation s − mean(s)
                    for name in solvers:
                        if name in ("omp", "cosamp") and k > m // 2:
                            continue  # greedy pursuit needs k well below m (and costs O(k) solves)
                        if name == "sketch":
                            est = sketch.predict(yt[t : t + 1])[0]
                        elif name == "omp":
                            est = omp(dmat, r, min(k, m)) + sm
                        elif name == "cosamp":
                            est = cosamp(dmat, r, min(k, m // 3 or 1), iters=10) + sm
                        else:
                            lam = 0.05 * float(np.abs(dmat.T @ r).max())
                            est = fista_group(dmat, r, groups, lam, iters=50) + sm
                        f1s[name].append(support_f1(topk_support(est, k), truth))
            for name in solvers:
                if not f1s[name]:
                    continue
                rows.append({"m": m, "fraction": frac, "solver": name, "f1": float(np.mean(f1s[name]))})
                print(f"m={m} k={frac:.0%} {name}: F1 {rows[-1]['f1']:.3f}", file=sys.stderr)
    return rows


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    ap.add_argument("--m", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--fracs", type=float, nargs="+", default=[0.05, 0.10, 0.25])
    ap.add_argument("--fit-tokens", type=int, default=3072)
    ap.add_argument("--test-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recovery.json")
    args = ap.parse_args(argv)

    art = fetch(args.model)
    tok = Tokenizer(art.tokenizer_dir)
    ids = np.array(tok.encode(reference_corpus()), np.int64)
    model, um = analyze(art.directory / "model.onnx")
    eng = LayeredEngine(plan_segments(model, um), args.threads)
    del model
    test_ids, fit_ids = ids[:512], ids[4096 : 4096 + args.fit_tokens]
    fit, test = traces(eng, fit_ids, args.layers), traces(eng, test_ids, args.layers)
    solvers = ["sketch", "fista", "omp", "cosamp"]
    rows = phase_transition(fit, test, args.m, args.fracs, solvers, args.test_tokens)

    # diversity across families and drift across positions (oracle supports at 50%)
    fams: dict[str, np.ndarray] = {}
    drift: list[float] = []
    inter = eng.intermediate
    for fam in ("code", "math", "summarization", "dialogue", "retrieval"):
        text = "\n\n".join(m["content"] for p in load_prompts(families=[fam]) for m in p.messages)
        tr = traces(eng, np.array(tok.encode(text), np.int64)[:2048], args.layers)
        freq = []
        for _, s in tr.values():
            masks = topk_support(s, inter // 2)
            freq.append(masks.mean(0))
            drift += [jaccard(masks[t], masks[t + 1]) for t in range(len(masks) - 1)]
        fams[fam] = np.concatenate([topk_support(f, inter // 2) for f in freq])
    names = list(fams)
    jac = [[jaccard(fams[a], fams[b]) for b in names] for a in names]
    report = {
        "command": "python tools/exp_recovery.py",
        "machine": machine_info(),
        "layers": args.layers,
        "fit_tokens": args.fit_tokens,
        "test_tokens_per_layer": args.test_tokens,
        "phase_transition": rows,
        "family_jaccard": {"families": names, "matrix": jac},
        "drift_consecutive_jaccard": float(np.mean(drift)),
        "drift_random_baseline": 1 / 3,
    }
    save_report(report, args.out, to_markdown, lambda p: plot(report, p))
    return 0


def to_markdown(report: dict) -> str:
    rows = report["phase_transition"]
    ms = sorted({r["m"] for r in rows})
    lines = ["| solver | k | " + " | ".join(f"m={m}" for m in ms) + " |", "|---|---|" + "---|" * len(ms)]
    for solver in dict.fromkeys(r["solver"] for r in rows):
        for frac in sorted({r["fraction"] for r in rows}):
            vals = {r["m"]: r["f1"] for r in rows if r["solver"] == solver and r["fraction"] == frac}
            lines.append(
                f"| {solver} | {frac:.0%} | "
                + " | ".join(f"{vals[m]:.2f}" if m in vals else "—" for m in ms)
                + " |"
            )
    fj = report["family_jaccard"]
    off = [
        fj["matrix"][i][j] for i in range(len(fj["families"])) for j in range(len(fj["families"])) if i != j
    ]
    lines.append(
        f"\nSupport F1 vs the oracle top-k on held-out tokens, layers {report['layers']}, "
        f"{report['fit_tokens']} fit tokens. Family supports (top 50%): Jaccard between families "
        f"{min(off):.2f}–{max(off):.2f}. Consecutive-token Jaccard of oracle 50% supports: "
        f"{report['drift_consecutive_jaccard']:.2f} (random sets: 0.33). {report['machine']['date']}, "
        f"{report['machine']['processor']}."
    )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    rows = report["phase_transition"]
    fracs = sorted({r["fraction"] for r in rows})
    fig, axes = plt.subplots(1, len(fracs) + 1, figsize=(4.2 * (len(fracs) + 1), 3.6))
    for ax, frac in zip(axes, fracs):
        for solver in dict.fromkeys(r["solver"] for r in rows):
            pts = sorted((r["m"], r["f1"]) for r in rows if r["solver"] == solver and r["fraction"] == frac)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=solver)
        ax.axhline(frac, ls=":", c="gray", label="random")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("measurements m")
        ax.set_ylabel("support F1")
        ax.set_title(f"k = {frac:.0%} of channels")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fj = report["family_jaccard"]
    im = axes[-1].imshow(fj["matrix"], vmin=0, vmax=1, cmap="viridis")
    axes[-1].set_xticks(range(len(fj["families"])), fj["families"], rotation=45, fontsize=7)
    axes[-1].set_yticks(range(len(fj["families"])), fj["families"], fontsize=7)
    axes[-1].set_title("family supports (Jaccard)")
    fig.colorbar(im, ax=axes[-1])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
