"""Perplexity against executed FFN fraction for every support policy, in one run (issue 4, item 7/8).

Policies (channel granularity, per token, every layer at the same fraction): dense; oracle top-k
(by ‖W_downᵀ a‖, the unreachable bound); TEAL-style magnitude thresholding (reads the actual
activations); static top-k (calibration mean: static pruning); random; and the two predicted
policies that choose before gate/up run from y = Φx (m measurements): the ridge sketch decoder and
compressed-sensing recovery (calibrated dictionary + group FISTA, fixed iterations). OMP and
CoSaMP are not run: at these fractions k ≥ 384 channels exceeds m/2 (they recover at most ~m/2
atoms; their support F1 is in `tools/exp_recovery.py`).

Scored on ``--tokens`` held-out tokens of the reference text (windows of 512), calibrated on the
next ``--calib-tokens``; the transformers model under per-token FFN masks (``MaskedExecutor``).
Writes ``benchmarks/results/policies.json`` and ``.png``.

    python tools/exp_policies.py        # ~15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from exp_granularity import calibration_means  # tools/ is on sys.path when run as a script

from cscompile.evaluation.executor import (
    executor_and_text,
    fit_fista_policy,
    fit_sketch_policy,
    oracle_policy,
    random_policy,
    static_policy,
    teal_policy,
)
from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import machine_info, save_report

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.9, 0.75, 0.5, 0.25)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--model", choices=["smollm2", "gemma3-270m"], default="smollm2", help="a fetched zoo model"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "policies.json")
    args = ap.parse_args(argv)

    if args.model != "smollm2" and args.out == ap.get_default("out"):  # one result file per model
        args.out = args.out.with_name(f"{args.out.stem}-{args.model}.json")
    ex, ids, calib = executor_and_text(args.model, args.tokens, args.calib_tokens, args.threads)
    t0 = time.time()
    means = calibration_means(ex, calib, 1)
    sketch = fit_sketch_policy(ex, calib, args.m)
    fista = fit_fista_policy(ex, calib, args.m)
    calib_s = time.time() - t0
    rows = []

    def run(name: str, policy, fraction: float) -> None:  # type: ignore[no-untyped-def]
        start = time.time()
        r = ex.evaluate(ids, policy, compare_dense=policy is not None)
        rows.append(
            {
                "policy": name,
                "target_fraction": fraction,
                "executed_fraction": r.executed_fraction,
                "perplexity": r.perplexity,
                "mean_kl": r.mean_kl,
                "top1_agreement": r.top1_agreement,
                "seconds": time.time() - start,
            }
        )
        print(f"{name:>28} f={fraction:.2f}: ppl {r.perplexity:10.3f}", file=sys.stderr)

    run("dense", None, 1.0)
    for f in FRACTIONS:
        run("oracle", oracle_policy(f, 1), f)
        run("TEAL-style", teal_policy(f), f)
        run(f"sketch decoder (m={args.m})", sketch(f), f)
        run(f"CS: group FISTA (m={args.m})", fista(f), f)
        run("static (calibration mean)", static_policy(f, 1, means), f)
        run("random", random_policy(f), f)
    dense = rows[0]["perplexity"]
    for r in rows:
        r["vs_dense"] = r["perplexity"] / dense - 1
    report = {
        "command": "python tools/exp_policies.py",
        "model": args.model,
        "machine": machine_info(),
        "tokens": len(ids),
        "calib_tokens": len(calib),
        "m": args.m,
        "calibration_seconds": calib_s,
        "results": rows,
    }
    save_report(report, args.out, to_markdown, lambda p: plot(report, p))
    return 0


def to_markdown(report: dict) -> str:
    rows = report["results"]
    names = list(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "dense"))
    lines = [
        "| policy | " + " | ".join(f"{f:.0%}" for f in FRACTIONS) + " |",
        "|---|" + "---|" * len(FRACTIONS),
    ]
    for name in names:
        cells = []
        for f in FRACTIONS:
            r = next(r for r in rows if r["policy"] == name and r["target_fraction"] == f)
            cells.append(
                f"{r['perplexity']:.2f} ({r['vs_dense']:+.1%})"
                if r["perplexity"] < 1e4
                else f"{r['perplexity']:.3g}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    d = rows[0]
    lines.append(
        f"\nDense {d['perplexity']:.3f} over {report['tokens']} held-out tokens; m = {report['m']}; calibration "
        f"{report['calib_tokens']} tokens ({report['calibration_seconds']:.0f} s). {report['machine']['date']}, "
        f"{report['machine']['processor']}."
    )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = report["results"]
    dense = rows[0]["perplexity"]
    for name in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "dense"):
        pts = sorted((r["executed_fraction"], r["perplexity"]) for r in rows if r["policy"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.axhline(dense, color="k", linestyle=":", label="dense")
    ax.set_yscale("log")
    ax.set_ylim(dense * 0.95, dense * 20)
    ax.set_xlabel("executed FFN fraction")
    ax.set_ylabel("perplexity (held-out, log scale)")
    ax.set_title(f"{report.get('model', 'smollm2')}: support policies at equal executed fraction")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
