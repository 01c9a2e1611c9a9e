"""Per-token layer skip in the motif engine on SmolLM2: what a skipped layer costs and saves (issue 5).

A skip motif runs only a skipped layer's K/V (so any later token may run the layer again and
attend to a complete cache). This measures, on the fp32 motif engine: each layer's sensitivity to
being skipped alone (mean KL to dense on calibration tokens), then motifs skipping the s least
sensitive layers — perplexity on held-out text (every position skips, evaluation mode) and decode
ms/token (teacher-forced, variants interleaved in rounds), against the dense motif.

    python tools/bench_skip.py            # ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from cscompile.decode.tokenizer import Tokenizer
from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import machine_info, save_report
from cscompile.metrics import perplexity, reference_corpus
from cscompile.models.zoo import fetch
from cscompile.motifs.engine import LayeredEngine, Motif
from cscompile.motifs.family import mean_kl
from cscompile.motifs.segments import plan_segments
from cscompile.passes.pipeline import analyze

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skips", type=int, nargs="+", default=[1, 2, 4, 6])
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--sens-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "skip.json")
    args = ap.parse_args(argv)

    art = fetch("smollm2")
    ids = np.array(Tokenizer(art.tokenizer_dir).encode(reference_corpus()), np.int64)
    held, sens_ids = ids[: args.eval_tokens], ids[args.eval_tokens : args.eval_tokens + args.sens_tokens]
    model, um = analyze(art.directory / "model.onnx")
    eng = LayeredEngine(plan_segments(model, um), args.threads)
    del model
    n = eng.num_layers
    dense = Motif("dense", [None] * n)
    base = eng.forward(sens_ids[None], eng.new_state())
    sens = np.full(n, np.inf)
    for li in range(1, n):
        sens[li] = mean_kl(
            base,
            eng.forward(sens_ids[None], eng.new_state(), Motif(f"s{li}", [None] * n, skip=frozenset({li}))),
        )
        print(f"skip layer {li}: KL {sens[li]:.4f}", file=sys.stderr, end="\r")
    order = [int(i) for i in np.argsort(sens)]  # least sensitive first (layer 0 is never skipped)
    motifs = [dense] + [Motif(f"skip-{s}", [None] * n, skip=frozenset(order[:s])) for s in args.skips]

    def ppl(m: Motif) -> float:
        return perplexity(lambda x: eng.forward(x, eng.new_state(), m), held).perplexity

    quality = {m.name: ppl(m) for m in motifs}
    times: dict[str, list[float]] = {m.name: [] for m in motifs}
    text = ids[-(args.steps + 40) :]
    for r in range(args.rounds):
        for m in motifs if r % 2 == 0 else motifs[::-1]:
            st = eng.new_state()
            eng.forward(text[None, :32], st)
            for t in text[32 : 32 + args.steps]:
                a = time.perf_counter()
                eng.forward(np.array([[t]]), st, m)
                times[m.name].append(time.perf_counter() - a)
    rows = []
    for m in motifs:
        ms = float(np.median(times[m.name])) * 1e3
        rows.append(
            {"motif": m.name, "skipped": sorted(m.skip), "perplexity": quality[m.name], "decode_ms": ms}
        )
    d = rows[0]
    for r in rows:
        r["ppl_vs_dense"] = r["perplexity"] / d["perplexity"] - 1
        r["speedup"] = d["decode_ms"] / r["decode_ms"]
    report = {
        "command": "python tools/bench_skip.py",
        "machine": machine_info(),
        "threads": args.threads,
        "eval_tokens": len(held),
        "sensitivity_kl": [None if not np.isfinite(x) else float(x) for x in sens],
        "results": rows,
    }
    save_report(report, args.out, to_markdown, lambda p: plot(report, p))
    return 0


def to_markdown(report: dict) -> str:
    lines = [
        "| motif | layers skipped | perplexity | vs dense | decode ms/token | vs dense motif |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['motif']} | {', '.join(map(str, r['skipped'])) or '—'} | {r['perplexity']:.3f} | "
                     f"{r['ppl_vs_dense']:+.1%} | {r['decode_ms']:.2f} | {r['speedup']:.2f}× |")  # fmt: skip
    lines.append(f"\nfp32 motif engine, {report['threads']} threads; perplexity over {report['eval_tokens']} held-out "
                 f"tokens; {report['machine']['date']}, {report['machine']['processor']}.")  # fmt: skip
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    kl = [0 if x is None else x for x in report["sensitivity_kl"]]
    a1.bar(range(len(kl)), kl)
    a1.set_xlabel("layer")
    a1.set_ylabel("KL to dense, this layer skipped alone")
    a1.set_title("Skip sensitivity (layer 0 always runs)")
    rs = report["results"]
    a2.plot([r["speedup"] for r in rs], [r["perplexity"] for r in rs], marker="o")
    for r in rs:
        a2.annotate(r["motif"], (r["speedup"], r["perplexity"]), fontsize=8)
    a2.set_xlabel("decode speedup over the dense motif")
    a2.set_ylabel("perplexity")
    a2.set_title("Layer-skip motifs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
