"""Reports of the joint searches: joint vs sequential at matched measured latency, and the plot
(fronts under the proxy and the latency table; the built points as measured) shared by
``tools/exp_joint_search.py`` (ONNX Runtime engines) and ``tools/exp_native_search.py`` (native).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cscompile.evaluation.plotting import pyplot


def matched_latency(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each joint point against the sequential front interpolated at the joint point's *measured*
    latency (log-perplexity linear in ms between the two nearest sequential points).
    """
    seq = sorted((r["decode_ms"], np.log(r["perplexity"])) for r in rows
                 if any(lb.startswith("sequential") for lb in r["labels"]))  # fmt: skip
    # the sequential front as measured: drop points beaten by a faster one
    front: list[tuple[float, float]] = []
    for ms, lp in seq:
        if not front or lp < front[-1][1]:
            front.append((ms, lp))
    out = []
    for r in rows:
        if not any(lb.startswith("joint") for lb in r["labels"]):
            continue
        ms = r["decode_ms"]
        if not front or not front[0][0] <= ms <= front[-1][0]:
            out.append(
                {
                    "labels": r["labels"],
                    "decode_ms": ms,
                    "perplexity": r["perplexity"],
                    "sequential_ppl": None,
                }
            )
            continue
        xs, ys = zip(*front)
        out.append({"labels": r["labels"], "decode_ms": ms, "perplexity": r["perplexity"],
                    "sequential_ppl": float(np.exp(np.interp(ms, xs, ys)))})  # fmt: skip
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for key, color, label in (("front_joint", "#2a7", "joint"), ("front_sequential", "#a72", "sequential")):
        pts = report[key]
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
        color = "#2a7" if any(lb.startswith("joint") for lb in r["labels"]) else "#a72"
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
    ax.set_title("built and measured (green joint, orange sequential)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
