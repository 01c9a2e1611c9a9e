"""Two-dimensional early exit on the project's sentiment sets (issue 10): all policies, one harness.

    python tools/exp_early_exit.py [--bundle out/smollm2-prompt.csb] [--classes 2]

Cuts the bundle's dense engine into layer blocks, trains one exit adapter per block on pooled
hidden states of every sentence prefix (train split minus a calibration part), calibrates each
policy's thresholds on the calibration part to the cheapest setting within 1 point of the full
model's accuracy, then runs every policy for real on the test split: full model (all sentences,
all layers), prompting the LM for the label, layer-wise exit, sentence-wise exit, 2D exit.
Writes ``benchmarks/results/exits/exits-{classes}.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from pathlib import Path

import numpy as np

CUTS = [0, 3, 6, 9, 12, 15, 18, 24, 30]
GRID = [0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999]


def main() -> None:
    from cscompile.bundle import open_bundle
    from cscompile.evaluation.sentiment import LABELS, sentiment_set
    from cscompile.exits.adapters import Adapter
    from cscompile.exits.model import ExitStack, simulate
    from cscompile.exits.ranges import cut_range
    from cscompile.runtime import GenerationConfig, load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("out/smollm2-prompt.csb"))
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=450)
    ap.add_argument("--n-calib", type=int, default=150)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--loss", type=float, default=0.01, help="accuracy loss allowed against the full model")
    ap.add_argument("--cuts", default=",".join(map(str, CUTS)), help="layer block boundaries")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--work", type=Path, default=Path("out/exits"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/exits"))
    args = ap.parse_args()
    cuts = [int(c) for c in args.cuts.split(",")]
    labels = list(LABELS[args.classes])
    li = {lab: i for i, lab in enumerate(labels)}
    train_all = sentiment_set(args.n_train + args.n_calib, args.classes, "train")
    train, calib = train_all[: args.n_train], train_all[args.n_train :]
    test = sentiment_set(args.n_test, args.classes, "test")

    bm = load(args.bundle, threads=2)
    tok = bm.tokenizer
    with open_bundle(args.bundle) as b:
        layers = b.read_json("unit_map.json")["layers"]
        engine = next(e for e in b.engines if e.kind == "dense").path
        paths = []
        for a, c in zip(cuts, cuts[1:]):
            p = args.work / f"block-{a}-{c}.onnx"
            if not p.exists():
                cut_range(engine, layers, a, c, p)
            paths.append(p)

    def sents(r):
        return [tok.encode(s if j == 0 else " " + s) for j, s in enumerate(r.sentences)]

    blank = [Adapter(np.zeros(576), np.ones(576), np.zeros((576, len(labels))), np.zeros(len(labels)))] * len(
        paths
    )
    stack = ExitStack(paths, cuts, blank, threads=2)
    t0 = time.time()
    # full texts only: a prefix's label is the whole review's, which its first sentences may not
    # show; the sentence-wise threshold is calibrated on prefixes instead
    cache = args.work / f"features-{args.classes}-{args.n_train}-{'-'.join(map(str, cuts))}.npz"
    if cache.exists():
        z = np.load(cache)
        x, y_arr = z["x"], z["y"]
    else:
        x = np.stack([stack.features(sents(r))[-1] for r in train])  # [texts, B, H]
        y_arr = np.array([li[r.label] for r in train])
        np.savez(cache, x=x, y=y_arr)
    stack.adapters = [Adapter.fit(x[:, k], y_arr, len(labels)) for k in range(len(paths))]
    print(f"adapters trained on {len(x)} reviews in {time.time() - t0:.0f} s", flush=True)

    def traces(rs):
        return [(stack.trace(sents(r)), li[r.label]) for r in rs]

    cal = traces(calib)

    def policy_outcomes(tr, policy, tau, sigma):
        out = []
        for (probs, toks), _y in tr:
            if policy in ("full", "layer"):
                out.append(simulate(probs[-1:], [sum(toks)], cuts, tau if policy == "layer" else None, None))
            else:
                out.append(simulate(probs, toks, cuts, tau if policy == "2d" else None, sigma))
        return out

    def acc(tr, outs):
        return float(np.mean([o.label == y for o, ((_, _), y) in zip(outs, tr)]))

    full_cal = acc(cal, policy_outcomes(cal, "full", None, None))
    chosen = {"full": (None, None)}
    for policy, grid in (("layer", [(t, None) for t in GRID]), ("sentence", [(None, s) for s in GRID]),
                         ("2d", list(itertools.product(GRID, GRID)))):  # fmt: skip
        best = None
        for tau, sigma in grid:
            outs = policy_outcomes(cal, policy, tau, sigma)
            a, cost = acc(cal, outs), float(np.mean([o.layer_tokens for o in outs]))
            if a >= full_cal - args.loss and (best is None or cost < best[0]):
                best = (cost, tau, sigma)
        chosen[policy] = (best[1], best[2]) if best else (GRID[-1], GRID[-1])
    print("calibration: full accuracy", full_cal, "thresholds", chosen, flush=True)

    # -- test: every policy run for real ------------------------------------------------------
    rows = []
    for r in test:
        ss = sents(r)
        y = li[r.label]
        for policy, (tau, sigma) in chosen.items():
            run = [sum(ss, [])] if policy in ("full", "layer") else ss
            o = stack.classify(run, tau, sigma)
            rows.append({"policy": policy, "label": o.label, "y": y, "ms": o.ms, "layer_tokens": o.layer_tokens,
                         "depth": int(cuts[o.depth + 1]), "sentences": o.sentences, "n_sentences": len(ss),
                         "tokens": sum(len(s) for s in run[: o.sentences]), "all_tokens": sum(len(s) for s in ss)})  # fmt: skip
    # prompting the LM for the label (the dense engine, chat template, greedy)
    cfg = GenerationConfig(max_new_tokens=4)
    for r in test:
        prompt = (f"Classify the sentiment of this review as {', '.join(labels[:-1])} or {labels[-1]}.\n\n"
                  f"Review: {r.text}\n\nAnswer with one word.")  # fmt: skip
        t = time.perf_counter()
        text = bm.generate(prompt, cfg, chat=True).text.lower()
        ms = (time.perf_counter() - t) * 1e3
        m = re.search("|".join(labels), text)
        rows.append({"policy": "prompt", "label": li[m.group(0)] if m else -1, "y": li[r.label], "ms": ms,
                     "layer_tokens": None, "depth": 30, "sentences": len(r.sentences), "n_sentences": len(r.sentences),
                     "tokens": None, "all_tokens": None})  # fmt: skip
    full = {i: row["label"] for i, row in enumerate(x for x in rows if x["policy"] == "full")}
    summary = []
    full_ms = np.mean([x["ms"] for x in rows if x["policy"] == "full"])
    for policy in ("full", "prompt", "layer", "sentence", "2d"):
        rs = [x for x in rows if x["policy"] == policy]
        lt = [x["layer_tokens"] for x in rs if x["layer_tokens"] is not None]
        summary.append({
            "policy": policy, "thresholds": chosen.get(policy), "accuracy": float(np.mean([x["label"] == x["y"] for x in rs])),
            "agreement_with_full": float(np.mean([x["label"] == full[i] for i, x in enumerate(rs)])),
            "ms": float(np.mean([x["ms"] for x in rs])), "speedup_vs_full": float(full_ms / np.mean([x["ms"] for x in rs])),
            "mean_exit_layer": float(np.mean([x["depth"] for x in rs])),
            "sentences_read": float(np.mean([1.0 if x["tokens"] is None else x["tokens"] / x["all_tokens"] for x in rs])),
            "layer_tokens": float(np.mean(lt)) if lt else None,
        })  # fmt: skip
    layer_ms = next(s["ms"] for s in summary if s["policy"] == "layer")
    for s in summary:
        s["speedup_vs_layer"] = layer_ms / s["ms"]
    md = ["| policy | thresholds (τ, σ) | accuracy | agreement with full | mean exit layer | sentences read | "
          "layer·tokens | ms/example | speedup vs full | vs layer-wise |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary:
        lt = f"{s['layer_tokens']:.0f}" if s["layer_tokens"] is not None else "–"
        md.append(f"| {s['policy']} | {s['thresholds']} | {s['accuracy']:.1%} | {s['agreement_with_full']:.1%} | "
                  f"{s['mean_exit_layer']:.1f} | {s['sentences_read']:.0%} | {lt} | {s['ms']:.1f} | "
                  f"{s['speedup_vs_full']:.2f}× | {s['speedup_vs_layer']:.2f}× |")  # fmt: skip
    text = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.classes} classes; {len(test)} test reviews; "
            f"calibration full accuracy {full_cal:.1%}, allowed loss {args.loss:.0%}\n\n" + "\n".join(md) + "\n")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"exits-{args.classes}{args.tag}"
    (args.out / f"{tag}.json").write_text(
        json.dumps({"summary": summary, "rows": rows, "cuts": cuts}, indent=1) + "\n"
    )
    (args.out / f"{tag}.md").write_text(text)
    plot(summary, args.out / f"{tag}.png", args.classes)
    print(text)


def plot(summary, path: Path, classes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summary:
        ax.scatter(s["speedup_vs_full"], s["accuracy"], s=60)
        ax.annotate(
            s["policy"], (s["speedup_vs_full"], s["accuracy"]), textcoords="offset points", xytext=(5, 4)
        )
    ax.set_xlabel("speedup over the full model (wall time per review)")
    ax.set_ylabel("accuracy (test)")
    ax.set_title(f"early exit, {classes}-class sentiment")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
