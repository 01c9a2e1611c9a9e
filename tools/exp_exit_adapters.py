"""How exit adapters should be trained for sentence-wise exits (issue 10): whole texts vs prefixes.

    python tools/exp_exit_adapters.py [--length long] [--classes 2]

The sentence-wise exit asks an adapter about a *prefix* of the text. Adapters trained on whole
texts only have never seen a prefix of narrative sentences and can be confidently wrong on it;
adapters trained on every prefix (each labelled with its text's label) learn that such prefixes
are undecided. This tool extracts the pooled features of every prefix at every exit once
(cached under ``out/exits/``) from a classification bundle's blocks (built by
``tools/exp_early_exit.py``), then for each training variant fits the adapters, calibrates every
policy on the calibration fifth exactly as the build does and scores the test split by
simulation (identical to the real run, tested): accuracy, agreement with the full model, and
cost relative to the full model (layer·tokens + CALL_COST per block call). Writes
``benchmarks/results/exits/adapters-{length}-{classes}.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

VARIANTS = {  # weight of the whole text; the rest is shared by its shorter prefixes (prefix_weights)
    "whole": 1.0,
    "mixed": 0.5,
    "prefix": None,  # every prefix (the whole text included) equally
}


def main() -> None:
    from cscompile.evaluation.sentiment import LABELS, shipped_file
    from cscompile.exits.adapters import Adapter
    from cscompile.exits.classifier import (
        POLICIES,
        calibrate,
        cost,
        in_calibration,
        prefix_weights,
        sentence_ids,
        simulate_policy,
    )
    from cscompile.exits.model import apply_adapters
    from cscompile.runtime import load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", choices=["short", "long"], default="long")
    ap.add_argument("--classes", type=int, choices=[2, 3], default=2)
    ap.add_argument("--max-loss", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/exits"))
    args = ap.parse_args()
    labels = list(LABELS[args.classes])
    bundle = Path(f"out/exits/cls-{args.length}-{args.classes}.csb")
    model = load(bundle, threads=2)
    clf = model.classifier
    cuts = clf.cuts

    def rows(split):
        return [
            json.loads(x) for x in shipped_file(split, args.classes, args.length).read_text().splitlines()
        ]

    def feats(split):
        cache = Path(f"out/exits/prefix-features-{args.length}-{args.classes}-{split}.npz")
        rs = rows(split)
        if not cache.exists():
            t0, parts, toks = time.time(), [], []
            for i, r in enumerate(rs):
                s = sentence_ids(model.tokenizer, r["text"])
                parts.append(clf.stack.features(s).astype(np.float32))
                toks.append([len(x) for x in s])
                if (i + 1) % 50 == 0:
                    print(f"{split}: {i + 1}/{len(rs)} ({time.time() - t0:.0f} s)", flush=True)
            n = np.array([len(p) for p in parts])
            np.savez(cache, x=np.concatenate(parts), n=n, toks=np.concatenate([np.array(t) for t in toks]))
        z = np.load(cache)
        x, n, tk = z["x"], z["n"], z["toks"]  # each z[...] reads the archive again: once only
        bounds = np.concatenate([[0], np.cumsum(n)])
        xs = [x[a:b] for a, b in zip(bounds, bounds[1:])]
        ts = [list(map(int, tk[a:b])) for a, b in zip(bounds, bounds[1:])]
        ys = [labels.index(r["label"]) for r in rs]
        return xs, ts, ys, [r["text"] for r in rs]

    train = feats("train")
    test = feats("test")
    fit_i = [i for i, t in enumerate(train[3]) if not in_calibration(t)]
    cal_i = [i for i, t in enumerate(train[3]) if in_calibration(t)]
    results = {}
    lines = [
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.length} reviews, {args.classes} classes; "
        f"{len(fit_i)} training / {len(cal_i)} calibration / {len(test[0])} test texts; bundle {bundle}; "
        f"allowed loss {args.max_loss:.0%}; cost = (layer·tokens + CALL_COST·calls) relative to the full model",
        "",
        "| adapters | policy | τ | σ | accuracy | agreement with full | relative cost | tokens read |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, whole in VARIANTS.items():
        xs, ws, ys = [], [], []
        for i in fit_i:
            f, y = train[0][i], train[2][i]
            s = len(f)
            w = prefix_weights(s, whole)
            keep = w > 0
            xs.append(f[keep])
            ws.append(w[keep])
            ys += [y] * int(keep.sum())
        x, w, y = np.concatenate(xs), np.concatenate(ws), np.array(ys)
        adapters = [Adapter.fit(x[:, k], y, len(labels), weights=w) for k in range(len(cuts) - 1)]

        def traces(part, idx, adapters=adapters):
            return [(apply_adapters(part[0][i], adapters), part[1][i]) for i in idx]

        tr = traces(train, cal_i)
        cal = calibrate({"whole": tr, "prefix": tr}, [train[2][i] for i in cal_i], cuts, args.max_loss)
        tt = traces(test, range(len(test[0])))
        full = [simulate_policy(p, t, cuts, "full", None, None) for p, t in tt]
        full_cost = np.mean([cost(o) for o in full])
        results[variant] = {}
        for policy in POLICIES:
            th = cal["thresholds"][policy]
            outs = [simulate_policy(p, t, cuts, policy, th["tau"], th["sigma"]) for p, t in tt]
            r = {
                "tau": th["tau"], "sigma": th["sigma"],
                "accuracy": float(np.mean([o.label == yy for o, yy in zip(outs, test[2])])),
                "agreement_with_full": float(np.mean([o.label == f.label for o, f in zip(outs, full)])),
                "relative_cost": float(np.mean([cost(o) for o in outs]) / full_cost),
                "tokens_read": float(np.mean([o.tokens / sum(t) for o, (_, t) in zip(outs, tt)])),
            }  # fmt: skip
            results[variant][policy] = r
            lines.append(f"| {variant} | {policy} | {r['tau']} | {r['sigma']} | {r['accuracy']:.1%} | "
                         f"{r['agreement_with_full']:.1%} | {r['relative_cost']:.3f} | {r['tokens_read']:.0%} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"adapters-{args.length}-{args.classes}"
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
