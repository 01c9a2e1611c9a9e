"""Two-dimensional early exit on the project's sentiment sets (issue 10): all policies, one harness.

    python tools/exp_early_exit.py [--length long] [--classes 2] [--n-test 300]

Builds (or reuses) a classification bundle exactly as users do — ``cscompile build smollm2
--precision int4 --task classify --labels ... --train <shipped train split>`` — then runs every
policy for real on the shipped test split through ``BundleModel.classify``: full model (all
sentences, all layers), prompting the LM for the label (the ``--teacher``), layer-wise exit,
sentence-wise exit, 2D exit. Thresholds are the bundle's (calibrated at build time on a fifth of
the training rows to lose at most 1 point against the full model). Also fits the per-call cost
(``CALL_COST``) from the measured times. Writes
``benchmarks/results/exits/exits-{length}-{classes}.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

POLICIES = ("full", "prompt", "layer", "sentence", "2d")
#: reviews in languages the adapters never saw: the outlier test should send them to the full model
FOREIGN = [
    "Das Essen war köstlich. Der Kellner war sehr freundlich und schnell.",  # de
    "Der Film war langweilig und viel zu lang.",  # de
    "Het eten was heerlijk en het personeel was vriendelijk.",  # nl
    "Le film était ennuyeux et beaucoup trop long.",  # fr
    "La comida estaba deliciosa y el personal fue muy amable.",  # es
    "Il cibo era delizioso e il personale gentile.",  # it
    "食物很好吃，服务员也很友好。",  # zh
]


def main() -> None:
    from cscompile.compiler.build import build_bundle
    from cscompile.evaluation.sentiment import LABELS, shipped_file
    from cscompile.exits.classifier import teacher_labels
    from cscompile.models.zoo import fetch
    from cscompile.runtime import load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", choices=["short", "long"], default="long")
    ap.add_argument("--classes", type=int, choices=[2, 3], default=2)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--bundle", type=Path, default=None, help="default out/exits/cls-{length}-{classes}.csb")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/exits"))
    args = ap.parse_args()
    labels = list(LABELS[args.classes])
    bundle = args.bundle or Path(f"out/exits/cls-{args.length}-{args.classes}.csb")
    if not bundle.exists():
        t0 = time.time()
        build_bundle(fetch("smollm2", progress=print).directory, bundle, precision="int4", task="classify",
                     labels=labels, train=shipped_file("train", args.classes, args.length),
                     classify_say=lambda m: print(m, flush=True))  # fmt: skip
        print(f"built {bundle} in {time.time() - t0:.0f} s", flush=True)
    test = [
        json.loads(line) for line in shipped_file("test", args.classes, args.length).read_text().splitlines()
    ][: args.n_test]

    model = load(bundle, threads=args.threads)
    clf = model.classifier
    rows = []
    for r in test:  # policies interleaved per text: machine drift hits all of them alike
        for policy in ("full", "layer", "sentence", "2d"):
            c = model.classify(r["text"], policy)
            rows.append({"policy": policy, "label": c.label, "y": r["label"], "ms": c.ms,
                         "layer_tokens": c.layer_tokens, "depth": c.exit_layer, "sentences": c.sentences_read,
                         "n_sentences": c.sentences, "tokens": c.tokens_read, "all_tokens": c.tokens,
                         "in_distribution": c.in_distribution, "calls": c.block_calls})  # fmt: skip
        t = time.perf_counter()
        (lab,) = teacher_labels(model.engine.path, model.tokenizer, [r["text"]], labels, args.threads)
        rows.append({"policy": "prompt", "label": labels[lab], "y": r["label"], "ms": (time.perf_counter() - t) * 1e3,
                     "layer_tokens": None, "depth": 30, "sentences": 1, "n_sentences": 1, "tokens": None,
                     "all_tokens": None, "in_distribution": True, "calls": None})  # fmt: skip
    from cscompile.exits.classifier import sentence_ids

    foreign = []
    for t in FOREIGN:
        first = clf.stack.features(sentence_ids(model.tokenizer, t)[:1])[0, 0]
        foreign.append({"text": t, "flagged": not model.classify(t).in_distribution,
                        "distance_over_threshold": float(clf.outliers.distance(first) / clf.outliers.threshold)})  # fmt: skip
    full = [x["label"] for x in rows if x["policy"] == "full"]
    summary = []
    for policy in POLICIES:
        rs = [x for x in rows if x["policy"] == policy]
        lt = [x["layer_tokens"] for x in rs if x["layer_tokens"] is not None]
        th = clf.thresholds.get(policy, {})
        summary.append({
            "policy": policy, "tau": th.get("tau"), "sigma": th.get("sigma"),
            "accuracy": float(np.mean([x["label"] == x["y"] for x in rs])),
            "agreement_with_full": float(np.mean([x["label"] == f for x, f in zip(rs, full)])),
            "ms": float(np.mean([x["ms"] for x in rs])),
            "mean_exit_layer": float(np.mean([x["depth"] for x in rs])),
            "tokens_read": float(np.mean([1.0 if x["tokens"] is None else x["tokens"] / x["all_tokens"] for x in rs])),
            "layer_tokens": float(np.mean(lt)) if lt else None,
            "flagged_out_of_distribution": int(sum(not x["in_distribution"] for x in rs)),
        })  # fmt: skip
    by = {s["policy"]: s for s in summary}
    for s in summary:
        s["speedup_vs_full"] = by["full"]["ms"] / s["ms"]
        s["speedup_vs_layer"] = by["layer"]["ms"] / s["ms"]
    # per-call cost: ms ≈ a·calls + b·layer_tokens over the real runs (least squares)
    fit = call_cost_fit([x for x in rows if x["policy"] != "prompt"])
    md = ["| policy | τ | σ | accuracy | agreement with full | mean exit layer | tokens read | layer·tokens | "
          "ms/example | speedup vs full | vs layer-wise |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary:
        lt = f"{s['layer_tokens']:.0f}" if s["layer_tokens"] is not None else "–"
        md.append(f"| {s['policy']} | {s['tau']} | {s['sigma']} | {s['accuracy']:.1%} | {s['agreement_with_full']:.1%} | "
                  f"{s['mean_exit_layer']:.1f} | {s['tokens_read']:.0%} | {lt} | {s['ms']:.1f} | "
                  f"{s['speedup_vs_full']:.2f}× | {s['speedup_vs_layer']:.2f}× |")  # fmt: skip
    rep = clf.report
    text = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.length} reviews, {args.classes} classes; "
            f"{len(test)} test reviews; bundle {bundle} (calibration: {rep.get('calibration_rows')} rows, full accuracy "
            f"{rep.get('full_accuracy', 0):.1%}, allowed loss {rep.get('max_loss', 0):.0%}); "
            f"{args.threads} threads\n\n" + "\n".join(md) + "\n\n"
            f"Per-call cost fit: {fit['call_ms']:.3f} ms per block call + {fit['lt_ms']:.4f} ms per layer·token "
            f"→ one call ≈ {fit['call_ms'] / fit['lt_ms']:.0f} layer·tokens (CALL_COST in the build).\n\n"
            f"Outlier test: {sum(f['flagged'] for f in foreign)}/{len(foreign)} foreign-language reviews flagged "
            f"(distance / threshold {min(f['distance_over_threshold'] for f in foreign):.2f}–"
            f"{max(f['distance_over_threshold'] for f in foreign):.2f}); test reviews flagged: "
            f"{by['2d']['flagged_out_of_distribution']}/{len(test)}.\n")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"exits-{args.length}-{args.classes}"
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {"summary": summary, "calibration": rep, "call_cost_fit": fit, "foreign": foreign, "rows": rows},
            indent=1,
        )
        + "\n"
    )
    (args.out / f"{stem}.md").write_text(text)
    plot(summary, args.out / f"{stem}.png", f"early exit, {args.length} {args.classes}-class sentiment")
    print(text)


def call_cost_fit(rows: list[dict]) -> dict[str, float]:
    """Least squares ``ms = a·calls + b·layer_tokens`` over the real runs."""
    a = np.array([[x["calls"] for x in rows], [x["layer_tokens"] for x in rows]], np.float64).T
    (call_ms, lt_ms), *_ = np.linalg.lstsq(a, np.array([x["ms"] for x in rows]), rcond=None)
    return {"call_ms": float(call_ms), "lt_ms": float(lt_ms)}


def plot(summary, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summary:
        ax.scatter(s["speedup_vs_full"], s["accuracy"], s=60)
        ax.annotate(
            s["policy"], (s["speedup_vs_full"], s["accuracy"]), textcoords="offset points", xytext=(5, 4)
        )
    ax.set_xscale("log")
    ax.set_xlabel("speedup over the full model (wall time per review, log)")
    ax.set_ylabel("accuracy (test)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
