"""The price of hardware alignment on SmolLM2: perplexity at equal executed FFN fraction vs block size.

Per token and layer, an oracle keeps the FFN blocks (of b contiguous channels) with the largest
contribution ‖W_downᵀ a_B‖ to the residual stream; b = 1 is single channels. Against it: TEAL-style
magnitude thresholding, static pruning (the blocks with the highest calibration-mean activity,
the same for every token) and random. A second table sweeps the executed fraction for the oracle
at b = 1, TEAL and static. Runs the transformers model under masks (`MaskedExecutor`); scores
held-out text (the first ``--tokens`` of pydoc_data.topics, windows of 512); the static policy is
calibrated on the next ``--calib-tokens``. Writes JSON + PNG to ``benchmarks/results/granularity.*``.

    python tools/exp_granularity.py [--tokens 8192] [--calib-tokens 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cscompile.evaluation.executor import (
    MaskedExecutor,
    block_activity,
    executor_and_text,
    oracle_policy,
    random_policy,
    static_policy,
    teal_policy,
)
from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import machine_info, save_report

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = (1, 4, 8, 16, 64, 128)
FRACTIONS = (0.9, 0.75, 0.5, 0.25)


def calibration_means(ex: MaskedExecutor, ids: np.ndarray, block: int) -> list[np.ndarray]:
    """Mean block activity per layer over calibration text (dense run, a recording policy)."""
    import torch

    sums = [None] * len(ex.layers)
    counts = [0] * len(ex.layers)

    def record(layer, x, a, executor):  # type: ignore[no-untyped-def]
        act = block_activity(torch, a, executor.down_t[layer], block).sum(0).numpy()
        sums[layer] = act if sums[layer] is None else sums[layer] + act  # type: ignore[operator]
        counts[layer] += a.shape[0]
        return torch.ones_like(a, dtype=torch.bool), None

    for start in range(0, len(ids) - 1, 512):
        ex.logits(ids[None, start : start + 512], record)
    return [s / c for s, c in zip(sums, counts)]  # type: ignore[operator]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--model", choices=["smollm2", "gemma3-270m"], default="smollm2", help="a fetched zoo model"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "granularity.json")
    args = ap.parse_args(argv)

    if args.model != "smollm2" and args.out == ap.get_default("out"):  # one result file per model
        args.out = args.out.with_name(f"{args.out.stem}-{args.model}.json")
    ex, ids, calib = executor_and_text(args.model, args.tokens, args.calib_tokens, args.threads)

    def run(name: str, policy, block: int | None, fraction: float) -> dict:  # type: ignore[no-untyped-def]
        r = ex.evaluate(ids, policy, compare_dense=False)
        row = {"policy": name, "block": block, "target_fraction": fraction, "executed_fraction": r.executed_fraction,
               "perplexity": r.perplexity, "tokens_scored": r.tokens_scored}  # fmt: skip
        print(
            f"{name:>22} b={block!s:>4} f={fraction:.2f}: ppl {r.perplexity:9.3f} (executed {r.executed_fraction:.3f})",
            file=sys.stderr,
        )
        return row

    dense = run("dense", None, None, 1.0)
    static_means = {b: calibration_means(ex, calib, b) for b in (1, 128)}
    rows = [dense]
    for b in BLOCKS:
        rows.append(run("oracle", oracle_policy(0.5, b), b, 0.5))
    rows.append(run("TEAL-style", teal_policy(0.5), 1, 0.5))
    rows.append(run("static (calib mean)", static_policy(0.5, 128, static_means[128]), 128, 0.5))
    rows.append(run("static (calib mean)", static_policy(0.5, 1, static_means[1]), 1, 0.5))
    rows.append(run("random", random_policy(0.5), 1, 0.5))
    sweep = []
    for f in FRACTIONS:
        sweep.append(run("oracle", oracle_policy(f, 1), 1, f))
        sweep.append(run("TEAL-style", teal_policy(f), 1, f))
        sweep.append(run("static (calib mean)", static_policy(f, 1, static_means[1]), 1, f))
    for r in rows + sweep:
        r["ppl_vs_dense"] = r["perplexity"] / dense["perplexity"] - 1
    report = {
        "command": "python tools/exp_granularity.py",
        "model": args.model,
        "machine": machine_info(),
        "tokens_scored": dense["tokens_scored"],
        "calibration_tokens": int(len(calib)),
        "at_half": rows,
        "sweep": sweep,
    }
    save_report(report, args.out, to_markdown, lambda p: plot(report, p))
    return 0


def to_markdown(report: dict) -> str:
    lines = [
        "| policy (50% of FFN channels) | block | executed | perplexity | vs dense |",
        "|---|---|---|---|---|",
    ]
    for r in report["at_half"]:
        lines.append(
            f"| {r['policy']} | {r['block'] or '—'} | {r['executed_fraction']:.1%} | {r['perplexity']:.2f} | {r['ppl_vs_dense']:+.1%} |"
        )
    lines += [
        "",
        "| policy (b = 1) | target fraction | executed | perplexity | vs dense |",
        "|---|---|---|---|---|",
    ]
    for r in report["sweep"]:
        lines.append(
            f"| {r['policy']} | {r['target_fraction']:.0%} | {r['executed_fraction']:.1%} | {r['perplexity']:.2f} | {r['ppl_vs_dense']:+.1%} |"
        )
    lines.append(
        f"\n{report['tokens_scored']} tokens scored (windows of 512). {report['machine']['date']}, {report['machine']['processor']}."
    )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    dense = report["at_half"][0]["perplexity"]
    oracle = [r for r in report["at_half"] if r["policy"] == "oracle"]
    axes[0].plot(
        [r["block"] for r in oracle], [r["perplexity"] for r in oracle], "o-", label="oracle, 50% of channels"
    )
    for r in report["at_half"]:
        if r["policy"] not in ("oracle", "dense"):
            axes[0].axhline(r["perplexity"], ls=":", lw=1, color="gray")
            axes[0].annotate(f"{r['policy']} b={r['block']}", (1, r["perplexity"]), fontsize=7, va="bottom")
    axes[0].axhline(dense, color="k", lw=1, label=f"dense {dense:.2f}")
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("FFN block size b (channels)")
    axes[0].set_ylabel("perplexity (log)")
    axes[0].set_title(f"The price of hardware alignment ({report.get('model', 'smollm2')}, 50% executed)")
    axes[0].legend(fontsize=8)
    for name in ("oracle", "TEAL-style", "static (calib mean)"):
        pts = [r for r in report["sweep"] if r["policy"] == name]
        axes[1].plot([r["executed_fraction"] for r in pts], [r["perplexity"] for r in pts], "o-", label=name)
    axes[1].axhline(dense, color="k", lw=1, label="dense")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("executed FFN fraction")
    axes[1].set_ylabel("perplexity (log)")
    axes[1].set_title("Perplexity vs executed fraction (b = 1)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
