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


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


class Runner:
    """Cached runs of (example, ratio, engine): answer, first-token log-probs, measured ms."""

    def __init__(self, models: dict[str, Any], compressor: Any, order: str, new_tokens: int) -> None:
        self.models, self.compressor, self.order, self.new_tokens = models, compressor, order, new_tokens
        self.cache: dict[tuple[str, float, str], dict[str, Any]] = {}
        self.prompts: dict[tuple[str, float], tuple[list[int], float]] = {}

    def prompt(self, ex: Any, r: float) -> tuple[list[int], float]:
        from cscompile.prompt import PromptBudget, layout

        key = (ex.id, r)
        if key not in self.prompts:
            if r >= 1.0:
                ids = layout(self.compressor.tokenizer, ex.context, ex.question, ex.instruction).ids
                self.prompts[key] = (ids, 0.0)
            else:
                c = self.compressor.compress(ex.context, ex.question, PromptBudget(ratio=r, order=self.order),
                                             instruction=ex.instruction)  # fmt: skip
                self.prompts[key] = (c.ids, c.scorer_ms)
        return self.prompts[key]

    def run(self, ex: Any, r: float, engine: str) -> dict[str, Any]:
        key = (ex.id, r, engine)
        if key in self.cache:
            return self.cache[key]
        tm = self.models[engine].text_model
        ids, scorer_ms = self.prompt(ex, r)
        if r < 1.0:  # re-time the scorer next to this run (same machine state), not the cached one
            t = time.perf_counter()
            self.compressor.scorer.run(self.prompt(ex, 1.0)[0])
            scorer_ms = (time.perf_counter() - t) * 1e3
        state = tm.session.new_state()
        t0 = time.perf_counter()
        logits = tm.prefill(ids, state)
        first = log_softmax(logits)
        out: list[int] = []
        for _ in range(self.new_tokens):
            tok = int(np.argmax(logits))
            if tok in tm.tokenizer.eos_token_ids:
                break
            out.append(tok)
            logits = tm.decode_one_token(tok, state)
        ms = (time.perf_counter() - t0) * 1e3 + scorer_ms
        text = tm.tokenizer.decode(out)
        res = {"ms": ms, "correct": bool(ex.correct(text)), "first": first, "new": len(out), "text": text,
               "n_prompt": len(self.prompt(ex, 1.0)[0]), "n_kept": len(ids)}  # fmt: skip
        self.cache[key] = res
        return res


def measure_costs(models: dict[str, Any], scorer: Any, lengths=(128, 384, 768, 1152)) -> Any:
    from cscompile.prompt.allocate import CostModel

    rng = np.random.default_rng(0)
    prefill, decode = {}, {}
    for name, bm in models.items():
        tm = bm.text_model
        ms = []
        for n in lengths:
            ids = rng.integers(1000, 40000, n).tolist()
            reps = []
            for _ in range(3):
                st = tm.session.new_state()
                t = time.perf_counter()
                tm.prefill(ids, st)
                reps.append((time.perf_counter() - t) * 1e3)
            ms.append(float(np.median(reps)))
        prefill[name] = CostModel.fit_prefill(lengths, ms)
        st = tm.session.new_state()
        tm.prefill(rng.integers(1000, 40000, 512).tolist(), st)
        steps = []
        for _ in range(24):
            t = time.perf_counter()
            tm.decode_one_token(int(rng.integers(1000, 40000)), st)
            steps.append((time.perf_counter() - t) * 1e3)
        decode[name] = float(np.median(steps))
        print(
            f"cost {name}: prefill {dict(zip(lengths, np.round(ms, 1)))} ms, decode {decode[name]:.2f} ms/token",
            flush=True,
        )
    sc = []
    for n in lengths:
        ids = rng.integers(1000, 40000, n).tolist()
        reps = []
        for _ in range(3):
            t = time.perf_counter()
            scorer.run(ids)
            reps.append((time.perf_counter() - t) * 1e3)
        sc.append(float(np.median(reps)))
    print(f"cost scorer: {dict(zip(lengths, np.round(sc, 1)))} ms", flush=True)
    return CostModel(CostModel.fit_linear(lengths, sc), prefill, decode)


def main() -> None:
    from cscompile.evaluation.longctx import long_context_set
    from cscompile.prompt import layout
    from cscompile.prompt.allocate import POLICIES, QualityGrid, allocate
    from cscompile.runtime import load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--front", type=Path, default=Path("out/smollm2-front.csb"))
    ap.add_argument("--prompt", type=Path, default=Path("out/smollm2-prompt.csb"))
    ap.add_argument("--n", type=int, default=12, help="evaluation examples per family")
    ap.add_argument("--n-calib", type=int, default=8, help="calibration examples per family")
    ap.add_argument("--ratios", default="1,0.5,0.3,0.2,0.1")
    ap.add_argument("--budgets", default="0.9,0.75,0.6,0.5,0.42,0.35", help="fractions of the dense time")
    ap.add_argument("--order", default="relevance")
    ap.add_argument("--lam", type=float, default=0.1, help="weight of the KL faithfulness term")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prompt"))
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    fams = ("retrieval", "qa")

    prompt_bm = load(args.prompt, threads=2, spinning=False)
    compressor = prompt_bm.compressor
    from cscompile.bundle import open_bundle

    with open_bundle(args.front) as b:
        names = [e.name for e in b.engines if e.kind == "dense"]
    models = {n: load(args.front, threads=2, engine=n, spinning=False) for n in names}
    costs = measure_costs(models, compressor.scorer)
    runner = Runner(models, compressor, args.order, new_tokens=32)

    # -- calibration: every pair on the calib split -----------------------------------------
    calib = [ex for f in fams for ex in long_context_set(f, args.n_calib, split="calib")]
    acc, kl = {}, {}
    for r in ratios:
        for e in names:
            cs, ks = [], []
            for ex in calib:
                ref = runner.run(ex, 1.0, "dense")["first"]
                res = runner.run(ex, r, e)
                cs.append(res["correct"])
                ks.append(float(np.sum(np.exp(ref) * (ref - res["first"]))))
            acc[(r, e)], kl[(r, e)] = float(np.mean(cs)), float(np.mean(ks))
            print(f"calib r={r:g} {e}: accuracy {acc[(r, e)]:.0%}, KL {kl[(r, e)]:.3f}", flush=True)
    grid = QualityGrid(ratios, names, acc, kl, lam=args.lam)
    new_tokens = int(round(np.mean([runner.run(ex, 1.0, "dense")["new"] for ex in calib])))

    # -- evaluation: each policy's choice per example and budget ------------------------------
    evals = [ex for f in fams for ex in long_context_set(f, args.n)]
    rows = []
    for ex in evals:
        n_prompt = len(runner.prompt(ex, 1.0)[0])
        lay = layout(compressor.tokenizer, ex.context, ex.question, ex.instruction)
        n_prot = int(lay.protected.sum())
        dense = runner.run(ex, 1.0, "dense")
        full_pred = costs.e2e("dense", n_prompt, n_prompt, new_tokens)
        for frac in [float(b) for b in args.budgets.split(",")]:
            for pol in POLICIES:
                ch = allocate(pol, frac * full_pred, costs, grid, n_prompt, n_prot, new_tokens)
                res = runner.run(ex, ch.ratio, ch.engine)
                rows.append({"id": ex.id, "budget": frac, "policy": pol, "ratio": ch.ratio, "engine": ch.engine,
                             "pred_ms": ch.predicted_ms, "ms": res["ms"], "dense_ms": dense["ms"],
                             "correct": res["correct"], "dense_correct": dense["correct"],
                             "feasible": not ch.notes})  # fmt: skip
        print(f"eval {ex.id} done", flush=True)

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
                "within_budget": float(np.mean([r["ms"] <= r["budget"] * r["dense_ms"] * 1.0 for r in rs])),
                "picks": [f"r={a:g}/{b}" for a, b in picks],
            })  # fmt: skip
    md = ["| budget (of dense) | policy | accuracy | dense accuracy | measured ms | predicted ms | speedup | picks |",
          "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary:
        md.append(f"| {s['budget']:.0%} | {s['policy']} | {s['accuracy']:.0%} | {s['dense_accuracy']:.0%} | "
                  f"{s['ms']:.0f} | {s['pred_ms']:.0f} | {s['speedup']:.2f}× | {', '.join(s['picks'])} |")  # fmt: skip
    grid_md = ["| ratio | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in ratios:
        grid_md.append(
            f"| {r:g} | " + " | ".join(f"{acc[(r, e)]:.0%} (KL {kl[(r, e)]:.2f})" for e in names) + " |"
        )
    cost_md = [f"| {e} | {costs.prefill[e][0]:.1f} + {costs.prefill[e][1]:.3f}·n + {costs.prefill[e][2] * 1e6:.1f}e-6·n² | "
               f"{costs.decode[e]:.2f} |" for e in names]  # fmt: skip
    text = (
        "Calibration grid (accuracy on the calib split, first-token KL to dense):\n\n" + "\n".join(grid_md)
        + "\n\nCosts (ms): scorer " + f"{costs.scorer[0]:.1f} + {costs.scorer[1]:.3f}·n\n\n"
        + "| engine | prefill ms | decode ms/token |\n|---|---|---|\n" + "\n".join(cost_md)
        + "\n\nPolicies on the eval split:\n\n" + "\n".join(md) + "\n"
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or platform.machine(),
           "costs": costs.to_dict(), "grid": grid.to_dict(), "new_tokens_plan": new_tokens, "order": args.order,
           "summary": summary, "rows": rows}  # fmt: skip
    (args.out / "joint.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "joint.md").write_text(text)
    plot(summary, args.out / "joint.png")
    print(text)


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for pol in dict.fromkeys(s["policy"] for s in summary):
        ss = sorted((s for s in summary if s["policy"] == pol), key=lambda s: s["ms"])
        ax.plot([s["ms"] for s in ss], [s["accuracy"] for s in ss], "o-", label=pol)
    ax.axhline(summary[0]["dense_accuracy"], color="gray", ls=":", label="dense")
    ax.set_xlabel("measured end-to-end ms (mean)")
    ax.set_ylabel("exact match (retrieval + QA)")
    ax.set_title("one budget, two levers: prompt retention × engine")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
