"""Reports of the joint searches: joint vs sequential at matched measured latency, and the plot
(fronts under the proxy and the latency table; the built points as measured) shared by
``tools/exp_joint_search.py`` (ONNX Runtime engines) and ``tools/exp_native_search.py`` (native).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cscompile.evaluation.plotting import pyplot


def matched_latency(rows: list[dict[str, Any]], baseline: str = "sequential") -> list[dict[str, Any]]:
    """Each joint point against the ``baseline`` front interpolated at the joint point's *measured*
    latency (log-perplexity linear in ms between the two nearest baseline points); the value is
    stored as ``sequential_ppl`` for the sequential baseline, ``<baseline>_ppl`` otherwise.
    """
    key = f"{baseline.replace('-', '_')}_ppl"
    base = sorted((r["decode_ms"], np.log(r["perplexity"])) for r in rows
                  if any(lb.startswith(baseline) for lb in r["labels"]))  # fmt: skip
    # the baseline's front as measured: drop points beaten by a faster one
    front: list[tuple[float, float]] = []
    for ms, lp in base:
        if not front or lp < front[-1][1]:
            front.append((ms, lp))
    out = []
    for r in rows:
        if not any(lb.startswith("joint") for lb in r["labels"]):
            continue
        ms = r["decode_ms"]
        row = {"labels": r["labels"], "decode_ms": ms, "perplexity": r["perplexity"], key: None}
        if front and front[0][0] <= ms <= front[-1][0]:
            xs, ys = zip(*front)
            row[key] = float(np.exp(np.interp(ms, xs, ys)))
        out.append(row)
    return out


def matched_summary(cmp: list[dict[str, Any]], baseline: str = "sequential") -> str:
    """One line: at how many matched latencies joint is better / equal / worse than ``baseline``."""
    key = f"{baseline.replace('-', '_')}_ppl"
    cmp = [c for c in cmp if c.get(key) is not None]
    if not cmp:
        return ""
    wins = sum(c["perplexity"] < c[key] * (1 - 1e-6) for c in cmp)
    ties = sum(abs(c["perplexity"] / c[key] - 1) <= 1e-6 for c in cmp)
    return (
        f"Joint vs {baseline} at matched measured latency ({baseline} interpolated): joint better at "
        f"{wins}/{len(cmp)} points, equal (the same engine) at {ties}, worse at {len(cmp) - wins - ties}: "
        + "; ".join(f"{c['decode_ms']:.2f} ms: {c['perplexity']:.2f} vs {c[key]:.2f}" for c in cmp)
        + "."
    )


COLORS = {"joint": "#2a7", "sequential": "#a72", "depth-only": "#57c"}


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for label, color in COLORS.items():
        pts = report.get(f"front_{label.replace('-', '_')}")
        if not pts:
            continue
        ax.step([p["latency_ms_pred"] for p in pts], [p["delta_nll_pred"] for p in pts], where="post",
                color=color, label=f"{label} (predicted)")  # fmt: skip
    ax.set_xlabel("predicted decode ms/token")
    ax.set_ylabel("predicted Σ per-layer KL (calibration)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("fronts under the proxy and the latency table", fontsize=9)
    ax = axes[1]
    for r in report["points"]:
        color = next((c for k, c in COLORS.items() if any(lb.startswith(k) for lb in r["labels"])), "#777")
        ax.scatter(r["decode_ms"], r["perplexity"], color=color, s=40, zorder=3)
        ax.annotate("; ".join(r["labels"]), (r["decode_ms"], r["perplexity"]), fontsize=6,
                    textcoords="offset points", xytext=(4, 3))  # fmt: skip
    ll = report.get("llama_cpp")
    if ll:
        ax.scatter(
            ll["decode_ms"], ll["perplexity"], color="#a44", marker="s", s=50, zorder=3, label="llama.cpp"
        )
        ax.legend(fontsize=8)
    ax.set_xlabel("measured decode ms/token")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title("built and measured (" + ", ".join(f"{c}: {k}" for k, c in (("green", "joint"), ("orange",
                 "sequential"), ("blue", "depth-only")) if report.get(f"front_{c.replace('-', '_')}")) + ")",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
