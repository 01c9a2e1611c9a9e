"""Prompt retention × engine under one end-to-end budget: prompt-only, model-only, sequential, joint.

    python tools/exp_prompt_joint.py [--front out/smollm2-front.csb] [--prompt out/smollm2-prompt.csb]

Engines come from a ``--pareto`` bundle (dense + front points), the scorer from a
``--prompt-scorer`` bundle of the same model (its dense engine is the same build). Costs are
measured here (prefill fits per engine, decode ms/token, scorer fit); quality is calibrated
on the ``calib`` split (accuracy and first-token KL to dense for every pair); the four
policies then choose per example for budgets of 90 … 35% of that example's predicted dense
time, and each choice is run on the ``eval`` split. Writes ``benchmarks/results/prompt/joint.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np


class Runner:
    """Cached :func:`~cscompile.prompt.allocate.run_pair` per (example, ratio, engine)."""

    def __init__(self, models: dict[str, Any], compressor: Any, order: str, new_tokens: int) -> None:
        self.models, self.compressor, self.order, self.new_tokens = models, compressor, order, new_tokens
        self.cache: dict[tuple[str, float, str], Any] = {}

    def run(self, ex: Any, r: float, engine: str) -> Any:
        from cscompile.prompt.allocate import run_pair

        key = (ex.id, r, engine)
        if key not in self.cache:
            self.cache[key] = run_pair(
                self.models[engine], self.compressor, ex, r, self.order, self.new_tokens
            )
        return self.cache[key]


def main() -> None:
    from cscompile.data.longctx import long_context_set
    from cscompile.prompt import layout
    from cscompile.prompt.allocate import POLICIES, allocate, calibrate_grid, measure_costs
    from cscompile.runtime import load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--front", type=Path, default=Path("out/smollm2-front.csb"))
    ap.add_argument("--prompt", type=Path, default=Path("out/smollm2-prompt.csb"))
    ap.add_argument("--n", type=int, default=12, help="evaluation examples per family")
    ap.add_argument("--n-calib", type=int, default=8, help="calibration examples per family")
    ap.add_argument("--ratios", default="1,0.5,0.3,0.2,0.1")
    ap.add_argument("--budgets", default="0.9,0.75,0.6,0.5,0.42,0.35", help="fractions of the dense time")
    ap.add_argument("--order", default="relevance")
    ap.add_argument("--lam", type=float, default=0.25, help="weight of the KL faithfulness term")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prompt"))
    ap.add_argument(
        "--render", type=Path, default=None, help="only re-render tables and plot from a joint.json"
    )
    args = ap.parse_args()
    if args.render is not None:
        write(json.loads(args.render.read_text()), args.out)
        return
    ratios = [float(r) for r in args.ratios.split(",")]
    fams = ("retrieval", "qa")

    prompt_bm = load(args.prompt, threads=2, spinning=False)
    compressor = prompt_bm.compressor
    from cscompile.bundle import open_bundle

    with open_bundle(args.front) as b:
        names = [e.name for e in b.engines if e.kind == "dense"]
    bms = {n: load(args.front, threads=2, engine=n, spinning=False) for n in names}
    models = {n: bm.text_model for n, bm in bms.items()}
    say = lambda m: print(m, flush=True)  # noqa: E731
    costs = measure_costs(models, compressor.scorer, say=say)
    runner = Runner(models, compressor, args.order, new_tokens=32)

    # -- calibration: every pair on the calib split -----------------------------------------
    calib = [ex for f in fams for ex in long_context_set(f, args.n_calib, split="calib")]
    grid, new_tokens = calibrate_grid(models, compressor, calib, ratios, args.order, 32, args.lam, say=say)

    # -- evaluation: each policy's choice per example and budget ------------------------------
    evals = [ex for f in fams for ex in long_context_set(f, args.n)]
    rows = []
    for ex in evals:
        lay = layout(compressor.tokenizer, ex.context, ex.question, ex.instruction)
        n_prompt = len(lay.ids)
        n_prot = int(lay.protected.sum())
        dense = runner.run(ex, 1.0, "dense")
        full_pred = costs.e2e("dense", n_prompt, n_prompt, new_tokens)
        for frac in [float(b) for b in args.budgets.split(",")]:
            for pol in POLICIES:
                ch = allocate(pol, frac * full_pred, costs, grid, n_prompt, n_prot, new_tokens)
                res = runner.run(ex, ch.ratio, ch.engine)
                rows.append({"id": ex.id, "budget": frac, "policy": pol, "ratio": ch.ratio, "engine": ch.engine,
                             "pred_ms": ch.predicted_ms, "ms": res.ms, "dense_ms": dense.ms,
                             "correct": bool(res.correct), "dense_correct": bool(dense.correct),
                             "feasible": not ch.notes})  # fmt: skip
        print(f"eval {ex.id} done", flush=True)

    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or platform.machine(),
           "costs": costs.to_dict(), "grid": grid.to_dict(), "new_tokens_plan": new_tokens, "order": args.order,
           "rows": rows}  # fmt: skip
    write(doc, args.out)


def write(doc: dict[str, Any], out: Path) -> None:
    """Summarize ``doc``'s rows per budget and policy; write joint.{json,md,png}."""
    from cscompile.prompt.allocate import POLICIES, CostModel, QualityGrid

    rows, costs, grid = doc["rows"], CostModel.from_dict(doc["costs"]), QualityGrid.from_dict(doc["grid"])
    summary = []
    for frac in dict.fromkeys(r["budget"] for r in rows):
        for pol in POLICIES:
            rs = [r for r in rows if r["budget"] == frac and r["policy"] == pol]
            picks = sorted({(r["ratio"], r["engine"]) for r in rs})
            summary.append({
                "budget": frac, "policy": pol, "accuracy": float(np.mean([r["correct"] for r in rs])),
                "dense_accuracy": float(np.mean([r["dense_correct"] for r in rs])),
                "ms": float(np.mean([r["ms"] for r in rs])), "pred_ms": float(np.mean([r["pred_ms"] for r in rs])),
                "speedup": float(sum(r["dense_ms"] for r in rs) / sum(r["ms"] for r in rs)),
                "feasible": float(np.mean([r["feasible"] for r in rs])),
                "within_budget": float(np.mean([r["ms"] <= r["budget"] * r["dense_ms"] for r in rs])),
                "picks": [f"r={a:g}/{b}" for a, b in picks],
            })  # fmt: skip
    md = ["| budget (of dense) | policy | accuracy | dense accuracy | predicted to fit | measured within | "
          "measured ms | predicted ms | speedup | picks |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary:
        md.append(f"| {s['budget']:.0%} | {s['policy']} | {s['accuracy']:.0%} | {s['dense_accuracy']:.0%} | "
                  f"{s['feasible']:.0%} | {s['within_budget']:.0%} | {s['ms']:.0f} | {s['pred_ms']:.0f} | "
                  f"{s['speedup']:.2f}× | {', '.join(s['picks'])} |")  # fmt: skip
    names = grid.engines
    grid_md = ["| ratio | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in grid.ratios:
        grid_md.append(f"| {r:g} | " + " | ".join(f"{grid.accuracy[(r, e)]:.0%} (KL {grid.kl[(r, e)]:.2f})"
                                                    for e in names) + " |")  # fmt: skip
    cost_md = [f"| {e} | {costs.prefill[e][0]:.1f} + {costs.prefill[e][1]:.3f}·n + {costs.prefill[e][2] * 1e6:.1f}e-6·n² | "
               f"{costs.decode[e]:.2f} |" for e in names]  # fmt: skip
    text = (
        f"{doc['date']}, {doc['machine']}; sentence order {doc['order']}; decode planned at "
        f"{doc['new_tokens_plan']} tokens; objective accuracy − {grid.lam:g}·KL.\n\n"
        "Calibration grid (accuracy on the calib split, first-token KL to dense):\n\n" + "\n".join(grid_md)
        + "\n\nCosts (ms): scorer " + f"{costs.scorer[0]:.1f} + {costs.scorer[1]:.3f}·n\n\n"
        + "| engine | prefill ms | decode ms/token |\n|---|---|---|\n" + "\n".join(cost_md)
        + "\n\nPolicies on the eval split (a policy with no pair predicted to fit runs its fastest pair):\n\n"
        + "\n".join(md) + "\n"
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    doc = {**doc, "summary": summary}
    (out / "joint.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "joint.md").write_text(text)
    plot(summary, out / "joint.png")
    print(text)


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {
        "prompt-only": ("o", "--"),
        "model-only": ("s", "-"),
        "sequential": ("^", "-"),
        "joint": ("D", "-"),
    }
    for pol in dict.fromkeys(s["policy"] for s in summary):
        ss = sorted((s for s in summary if s["policy"] == pol), key=lambda s: s["budget"])
        marker, line = styles.get(pol, ("o", "-"))
        axes[0].plot(
            [s["budget"] for s in ss], [s["accuracy"] for s in ss], line, marker=marker, label=pol, alpha=0.8
        )
        for ax_s in ss:  # hollow: the policy had no pair predicted to fit and ran its fastest
            if ax_s["feasible"] < 0.5:
                axes[0].plot(ax_s["budget"], ax_s["accuracy"], marker, mfc="white", color="black", ms=9)
        axes[1].plot(
            [s["ms"] for s in ss], [s["accuracy"] for s in ss], line, marker=marker, label=pol, alpha=0.8
        )
    for ax in axes:
        ax.axhline(summary[0]["dense_accuracy"], color="gray", ls=":", label="dense")
        ax.set_ylabel("exact match (retrieval + QA)")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("latency budget (fraction of the dense prediction); hollow = cannot fit")
    axes[0].invert_xaxis()
    axes[1].set_xlabel("measured end-to-end ms (mean)")
    axes[0].legend(fontsize=8)
    fig.suptitle("one budget, two levers: prompt retention × engine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
