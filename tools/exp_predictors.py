"""Predicted FFN supports on SmolLM2: a ridge sketch decoder from y = Φx (random measurements of the
MLP input) to channel activities, against the oracle and TEAL-style thresholding, at several executed
fractions and sketch sizes m. The support is chosen from x alone, before gate/up run.

Decoders are fitted on ``--calib-tokens`` of pydoc_data.topics after the held-out ``--tokens``
that are scored. Writes JSON + PNG to ``benchmarks/results/predictors.*``.

    python tools/exp_predictors.py [--tokens 8192] [--calib-tokens 8192] [--m 64 128 256]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cscompile.evaluation.executor import executor_and_text, fit_sketch_policy, oracle_policy, teal_policy
from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import machine_info

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.9, 0.75, 0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--m", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--model", choices=["smollm2", "gemma3-270m"], default="smollm2", help="a fetched zoo model"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predictors.json")
    args = ap.parse_args(argv)

    if args.model != "smollm2" and args.out == ap.get_default("out"):  # one result file per model
        args.out = args.out.with_name(f"{args.out.stem}-{args.model}.json")
    ex, ids, calib = executor_and_text(args.model, args.tokens, args.calib_tokens, args.threads)
    rows = []

    def run(name: str, policy, fraction: float, m: int | None = None) -> None:  # type: ignore[no-untyped-def]
        r = ex.evaluate(ids, policy)
        rows.append(
            {
                "policy": name,
                "m": m,
                "target_fraction": fraction,
                "executed_fraction": r.executed_fraction,
                "perplexity": r.perplexity,
            }
        )
        print(f"{name:>28} f={fraction:.2f}: ppl {r.perplexity:9.3f}", file=sys.stderr)

    run("dense", None, 1.0)
    makers = {m: fit_sketch_policy(ex, calib, m) for m in args.m}
    for f in FRACTIONS:
        run("oracle (b=1)", oracle_policy(f, 1), f)
        run("TEAL-style", teal_policy(f), f)
        for m, make in makers.items():
            run(f"sketch decoder m={m}", make(f), f, m)
    dense = rows[0]["perplexity"]
    for r in rows:
        r["ppl_vs_dense"] = r["perplexity"] / dense - 1
    report = {"command": "python tools/exp_predictors.py", "model": args.model, "machine": machine_info(), "tokens": int(len(ids)),
              "calibration_tokens": int(len(calib)), "results": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    lines = ["| policy | target fraction | executed | perplexity | vs dense |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['target_fraction']:.0%} | {r['executed_fraction']:.1%} | {r['perplexity']:.2f} | {r['ppl_vs_dense']:+.1%} |"
        )
    print("\n".join(lines))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in sorted({r["policy"] for r in rows} - {"dense"}):
        pts = [r for r in rows if r["policy"] == name]
        ax.plot([r["executed_fraction"] for r in pts], [r["perplexity"] for r in pts], "o-", label=name)
    ax.axhline(rows[0]["perplexity"], color="k", lw=1, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("executed FFN fraction")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("SmolLM2: predicted vs oracle FFN supports (b = 1)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
