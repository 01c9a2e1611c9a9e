"""Prompt compression benchmark: dense vs compressed prompts, side by side, on the long-context sets.

For every example the dense prompt and each retention ratio run back to back in one process
(same engine, same threads), so the ratios are measured under the same machine noise.
End-to-end latency = scorer + prefill + decode (greedy, stop at EOS), timed around the
runtime call a user makes (:meth:`BundleModel.generate`). Quality: exact match of the answer
(retrieval, QA) and agreement with the dense model's output (ROUGE-L F1; for the exact-match
families also whether both are right or both wrong).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.data.longctx import FAMILIES, long_context_set, rouge_l

NEW_TOKENS = {"retrieval": 32, "qa": 32, "summarize": 64}


def _run(
    bm: Any, ex: Any, ratio: float | None, keep: tuple[str, ...], order: str = "original", fine: float = 0.0
) -> dict[str, Any]:
    from cscompile.prompt import PromptBudget
    from cscompile.runtime import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS[ex.family])
    t0 = time.perf_counter()
    if ratio is None:
        res = bm.generate(ex.prompt(), cfg, chat=True)
    else:
        budget = PromptBudget(ratio=ratio, keep=keep, order=order, fine=fine)
        res = bm.generate(ex.context, cfg, chat=True, prompt_budget=budget, question=ex.question,
                          instruction=ex.instruction)  # fmt: skip
    wall = (time.perf_counter() - t0) * 1e3
    st = res.stats
    return {
        "text": res.text,
        "e2e_ms": wall,
        "scorer_ms": st.compress_ms,
        "prefill_ms": st.prefill_ms,
        "decode_ms": float(sum(st.decode_ms)),
        "prompt_tokens": st.prompt_tokens,
        "original_tokens": st.prompt_tokens_original or st.prompt_tokens,
        "new_tokens": st.new_tokens,
        "correct": ex.correct(res.text),
    }


def run_prompt_bench(bundle: Path | str, *, families: Sequence[str] = FAMILIES, n: int = 12, tokens: int = 1000,
                     ratios: Sequence[float] = (0.5, 0.3, 0.2, 0.1), threads: int | None = 2,
                     orders: Sequence[str] = ("original", "relevance"),
                     keep: tuple[str, ...] = (), fine: float = 0.0,
                     say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:  # fmt: skip
    """Run every example of ``families`` dense and at each ratio; returns rows and per-setting summaries."""
    from cscompile.runtime import load

    rows: list[dict[str, Any]] = []
    with load(bundle, threads=threads) as bm:
        _ = bm.compressor  # load the scorer before timing anything
        warm = long_context_set("retrieval", 1, tokens, split="calib")[0]
        _run(bm, warm, None, keep)
        _run(bm, warm, ratios[0], keep, fine=fine)
        for fam in families:
            for i, ex in enumerate(long_context_set(fam, n, tokens)):
                dense = _run(bm, ex, None, keep)
                rows.append(
                    {"family": fam, "id": ex.id, "setting": "dense", **dense, "agree": 1.0, "same": True}
                )
                for order, r in [(o, r) for o in orders for r in ratios]:
                    out = _run(bm, ex, r, keep, order, fine)
                    same = out["correct"] == dense["correct"] if ex.answer is not None else None
                    agree = rouge_l(dense["text"], out["text"])
                    rows.append(
                        {
                            "family": fam,
                            "id": ex.id,
                            "setting": f"r={r:g}" + ("" if order == "original" else f" {order}"),
                            **out,
                            "agree": agree,
                            "same": same,
                        }
                    )
                say(f"{fam} {i + 1}/{n}")
    return {"rows": rows, "summary": summarize(rows), "n": n, "tokens": tokens, "ratios": list(ratios),
            "threads": threads, "keep": list(keep), "orders": list(orders), "fine": fine}  # fmt: skip


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        fr = [r for r in rows if r["family"] == fam]
        dense_ms = {r["id"]: r["e2e_ms"] for r in fr if r["setting"] == "dense"}
        dense_acc = None
        for setting in dict.fromkeys(r["setting"] for r in fr):
            sr = [r for r in fr if r["setting"] == setting]
            correct = [r["correct"] for r in sr if r["correct"] is not None]
            acc = float(np.mean(correct)) if correct else None
            if setting == "dense":
                dense_acc = acc
            speed = [dense_ms[r["id"]] / r["e2e_ms"] for r in sr]
            out.append({
                "family": fam,
                "setting": setting,
                "examples": len(sr),
                "accuracy": acc,
                "accuracy_vs_dense": (acc / dense_acc) if acc is not None and dense_acc else None,
                "agree_rouge_l": float(np.mean([r["agree"] for r in sr])),
                "prompt_tokens": float(np.mean([r["prompt_tokens"] for r in sr])),
                "retention": float(np.mean([r["prompt_tokens"] / r["original_tokens"] for r in sr])),
                "e2e_ms": float(np.mean([r["e2e_ms"] for r in sr])),
                "scorer_ms": float(np.mean([r["scorer_ms"] for r in sr])),
                "prefill_ms": float(np.mean([r["prefill_ms"] for r in sr])),
                "decode_ms": float(np.mean([r["decode_ms"] for r in sr])),
                # ratio of summed times: the end-to-end speedup a user sees over the set
                "speedup": float(sum(dense_ms[r["id"]] for r in sr) / sum(r["e2e_ms"] for r in sr)),
                "speedup_median": float(np.median(speed)),
            })  # fmt: skip
    return out


def to_markdown(report: dict[str, Any]) -> str:
    head = (
        "| family | setting | accuracy | vs dense | agreement (ROUGE-L) | prompt tok | retention | "
        "scorer ms | prefill ms | decode ms | end-to-end ms | speedup |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for s in report["summary"]:
        acc = f"{s['accuracy']:.0%}" if s["accuracy"] is not None else "–"
        rel = f"{s['accuracy_vs_dense']:.0%}" if s["accuracy_vs_dense"] is not None else "–"
        lines.append(
            f"| {s['family']} | {s['setting']} | {acc} | {rel} | {s['agree_rouge_l']:.2f} | {s['prompt_tokens']:.0f} | "
            f"{s['retention']:.0%} | {s['scorer_ms']:.0f} | {s['prefill_ms']:.0f} | {s['decode_ms']:.0f} | "
            f"{s['e2e_ms']:.0f} | {s['speedup']:.2f}× |"
        )
    return head + "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    """Quality vs end-to-end latency, one panel per family (accuracy, or agreement for summaries)."""
    from cscompile.evaluation.plotting import pyplot

    plt = pyplot()

    fams = list(dict.fromkeys(s["family"] for s in report["summary"]))
    fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams), 3.6), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        ss = [s for s in report["summary"] if s["family"] == fam]
        exact = ss[0]["accuracy"] is not None

        def q(s: dict[str, Any], exact: bool = exact) -> float:
            return float(s["accuracy"] if exact else s["agree_rouge_l"])

        dense = next(s for s in ss if s["setting"] == "dense")
        for order in report.get("orders", ["original"]):
            suffix = "" if order == "original" else f" {order}"
            pts = [dense] + [s for s in ss if s["setting"].startswith("r=") and s["setting"].endswith(suffix)
                             and (suffix or " " not in s["setting"])]  # fmt: skip
            ax.plot([s["e2e_ms"] for s in pts], [q(s) for s in pts], "o-", label=f"{order} order")
            for s in pts[1:]:
                ax.annotate(s["setting"].split()[0], (s["e2e_ms"], q(s)), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)  # fmt: skip
        ax.annotate(
            "dense", (dense["e2e_ms"], q(dense)), textcoords="offset points", xytext=(-30, -12), fontsize=8
        )
        ax.set_title(fam)
        ax.set_xlabel("end-to-end ms (scorer + prefill + decode)")
        ax.set_ylabel("exact match" if exact else "ROUGE-L vs dense")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"prompt compression, {report['tokens']}-token contexts, {report['threads']} threads")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
