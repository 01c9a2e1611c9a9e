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

``--orthogonal``: also builds the same classifier on the fp32 engine and runs full, layer-wise and
2D exit on it in the same interleaved loop, so the exit speedups and the int4 speedup are measured
side by side and their product can be compared with the combination (exits on the int4 engine).
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
    from cscompile.steps.base import Lines

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", choices=["short", "long"], default="long")
    ap.add_argument("--classes", type=int, choices=[2, 3], default=2)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--bundle", type=Path, default=None, help="default out/exits/cls-{length}-{classes}.csb")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/exits"))
    ap.add_argument("--orthogonal", action="store_true", help="also run on the fp32 engine (see above)")
    args = ap.parse_args()
    labels = list(LABELS[args.classes])
    bundle = args.bundle or Path(f"out/exits/cls-{args.length}-{args.classes}.csb")

    def ensure(path: Path, precision: str) -> None:
        if not path.exists():
            t0 = time.time()
            build_bundle(fetch("smollm2", progress=print).directory, path, precision=precision, task="classify",
                         labels=labels, train=shipped_file("train", args.classes, args.length),
                         progress=Lines(lambda m: print(m, flush=True)))  # fmt: skip
            print(f"built {path} in {time.time() - t0:.0f} s", flush=True)

    ensure(bundle, "int4")
    fp32 = None
    if args.orthogonal:
        fp32_path = bundle.with_name(bundle.stem + "-fp32.csb")
        ensure(fp32_path, "fp32")
        fp32 = load(fp32_path, threads=args.threads)
    test = [
        json.loads(line) for line in shipped_file("test", args.classes, args.length).read_text().splitlines()
    ][: args.n_test]

    model = load(bundle, threads=args.threads)
    clf = model.classifier
    rows = []
    for r in test:  # policies interleaved per text: machine drift hits all of them alike
        runs = [(model, p, p) for p in ("full", "layer", "sentence", "2d")]
        if fp32 is not None:
            runs += [(fp32, p, f"{p} (fp32)") for p in ("full", "layer", "2d")]
        for m_, policy, name in runs:
            c = m_.classify(r["text"], policy)
            rows.append({"policy": name, "label": c.label, "y": r["label"], "ms": c.ms,
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
    ortho = orthogonality(rows) if fp32 is not None else None
    by = {s["policy"]: s for s in summary}
    for s in summary:
        s["speedup_vs_full"] = by["full"]["ms"] / s["ms"]
        s["speedup_vs_layer"] = by["layer"]["ms"] / s["ms"]
    # per-call cost: ms ≈ a·calls + b·layer_tokens over the real runs (least squares)
    fit = call_cost_fit([x for x in rows if x["policy"] in ("full", "layer", "sentence", "2d")])
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
    if ortho is not None:
        text += "\n" + ortho["markdown"] + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"exits-{args.length}-{args.classes}"
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {
                "summary": summary,
                "calibration": rep,
                "call_cost_fit": fit,
                "foreign": foreign,
                "orthogonality": ortho and ortho["table"],
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    (args.out / f"{stem}.md").write_text(text)
    plot(summary, args.out / f"{stem}.png", f"early exit, {args.length} {args.classes}-class sentiment")
    print(text)


def orthogonality(rows: list[dict]) -> dict:
    """Exits × engine precision, all against the fp32 full model measured in the same loop."""

    def stats(name: str) -> tuple[float, float]:
        rs = [x for x in rows if x["policy"] == name]
        return float(np.mean([x["ms"] for x in rs])), float(np.mean([x["label"] == x["y"] for x in rs]))

    base, _ = stats("full (fp32)")
    table = {}
    for policy in ("full", "layer", "2d"):
        for prec, name in (("fp32", f"{policy} (fp32)"), ("int4", policy)):
            ms, acc = stats(name)
            table[f"{policy}/{prec}"] = {"ms": ms, "accuracy": acc, "speedup_vs_fp32_full": base / ms}
    md = ["| policy | fp32 engine: ms (accuracy) | int4 engine: ms (accuracy) | exit alone (fp32) | int4 alone | "
          "both, measured | product of the two |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    int4_alone = table["full/int4"]["speedup_vs_fp32_full"]
    for policy in ("full", "layer", "2d"):
        f, q = table[f"{policy}/fp32"], table[f"{policy}/int4"]
        md.append(f"| {policy} | {f['ms']:.1f} ({f['accuracy']:.1%}) | {q['ms']:.1f} ({q['accuracy']:.1%}) | "
                  f"{f['speedup_vs_fp32_full']:.2f}× | {int4_alone:.2f}× | {q['speedup_vs_fp32_full']:.2f}× | "
                  f"{f['speedup_vs_fp32_full'] * int4_alone:.2f}× |")  # fmt: skip
    return {"table": table, "markdown": "\n".join(md)}


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
