"""Dense ONNX Runtime vs PyTorch eager on a fetched model, side by side in one process.

Both systems get the same prompts (the shipped set, chat template applied), the same number
of greedy tokens and the same thread count; prompts alternate between the systems, and
the order flips every prompt, so machine noise hits both alike. Perplexity is scored by the
same windowing code through both. Writes a JSON report and a PNG plot, prints a markdown table.

    python tools/bench_dense.py                 # full: 2 prompts/family (no retrieval), 128 tokens, 20,480 ppl tokens
    python tools/bench_dense.py --quick         # the README demo's headline (about a minute)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cscompile.data.prompts import load_prompts
from cscompile.evaluation.harness import OrtSystem, run_prompts, summarize
from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import chat_encoder, corpus_ids, machine_info, save_report
from cscompile.metrics import onnx_scorer, perplexity
from cscompile.models.reference import TorchReference
from cscompile.models.zoo import fetch
from cscompile.runtime import is_bundle, load, load_text_model

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--per-family", type=int, default=2, help="prompts per family (retrieval excluded: long prefill)"
    )
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ppl-tokens", type=int, default=20480)
    ap.add_argument("--quick", action="store_true", help="1 prompt/family, 64 tokens, 4,096 ppl tokens")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dense_baseline.json")
    ap.add_argument(
        "--with", dest="extra", type=Path, action="append", default=[],
        help="another model directory or bundle to run side by side (e.g. one made by `cscompile build`); repeatable",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.quick:
        args.per_family, args.new_tokens, args.ppl_tokens = 1, 64, 4096
        if args.out == ap.get_default("out"):
            args.out = ROOT / "benchmarks" / "results" / "dense_baseline_quick.json"

    art = fetch(args.model)
    rss0 = _rss_mb()
    ort_model = load_text_model(art.directory, threads=args.threads)
    rss1 = _rss_mb()
    torch_ref = TorchReference.from_dir(art.hf_dir, threads=args.threads)
    rss2 = _rss_mb()
    systems = [OrtSystem(ort_model), torch_ref]
    load_mb = {systems[0].name: rss1 - rss0, systems[1].name: rss2 - rss1}
    scorers = {systems[0].name: onnx_scorer(ort_model.session), systems[1].name: torch_ref.logits}
    opened = []
    for extra in args.extra:
        before = _rss_mb()
        if is_bundle(extra):
            bundle = load(extra, threads=args.threads)
            opened.append(bundle)  # keep it open (an archive's extracted files live as long as it does)
            tm = bundle.text_model
        else:
            tm = load_text_model(extra, threads=args.threads)
        system = OrtSystem(tm, name=f"cscompile {extra.name} (ORT)")
        load_mb[system.name] = _rss_mb() - before
        scorers[system.name] = onnx_scorer(tm.session)
        systems.append(system)

    prompts = []
    for fam in ("code", "math", "summarization", "dialogue"):
        prompts += load_prompts(families=[fam])[: args.per_family]
    encode = chat_encoder(ort_model)
    decode = ort_model.tokenizer.decode
    # warm-up (first-run allocations, thread pools)
    for s in systems:
        s.generate_ids(encode(prompts[0]), 4)

    runs: dict[str, list] = {s.name: [] for s in systems}
    agree = {s.name: 0 for s in systems}
    for i, p in enumerate(prompts):
        order = systems if i % 2 == 0 else systems[::-1]
        outs = {}
        for s in order:
            r = run_prompts(s, [p], encode, decode, args.new_tokens)[0]
            runs[s.name].append(r)
            outs[s.name] = r.text
        for name, text in outs.items():
            agree[name] += text == outs[torch_ref.name]
        same = [n for n in outs if n != torch_ref.name and outs[n] == outs[torch_ref.name]]
        print(f"[{i + 1}/{len(prompts)}] {p.id}: identical to PyTorch: {same or 'none'}", file=sys.stderr)

    ids = corpus_ids(ort_model, None, args.ppl_tokens)
    ppl = {name: perplexity(score, ids).to_dict() for name, score in scorers.items()}
    rows = []
    for s in systems:
        summ = summarize(runs[s.name])["overall"]
        rows.append(
            {
                "system": s.name,
                "decode_ms_per_token": summ["decode_ms_median"],
                "decode_ms_p90": summ["decode_ms_p90"],
                "tokens_per_s": summ["tokens_per_s"],
                "prefill_ms": summ["prefill_ms_median"],
                "prompt_tokens_median": summ["prompt_tokens_median"],
                "perplexity": ppl[s.name]["perplexity"],
                "rss_at_load_mb": load_mb[s.name],
                "greedy_identical_to_pytorch": f"{agree[s.name]}/{len(prompts)}",
            }
        )
    base = rows[1]
    for r in rows:
        r["decode_speedup_vs_pytorch"] = base["decode_ms_per_token"] / r["decode_ms_per_token"]
        r["prefill_speedup_vs_pytorch"] = base["prefill_ms"] / r["prefill_ms"]
        r["decode_speedup_vs_dense_ort"] = rows[0]["decode_ms_per_token"] / r["decode_ms_per_token"]
    report = {
        "command": "python tools/bench_dense.py"
        + (" --quick" if args.quick else "")
        + "".join(f" --with {e}" for e in args.extra),
        "machine": machine_info(),
        "threads": args.threads,
        "prompts": [p.id for p in prompts],
        "new_tokens": args.new_tokens,
        "ppl_tokens_scored": ppl[systems[0].name]["tokens_scored"],
        "results": rows,
    }
    save_report(report, args.out, to_markdown, lambda p: _plot(rows, p))
    return 0


def _rss_mb() -> float:
    import gc

    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def to_markdown(report: dict) -> str:
    lines = [
        "| system | decode ms/token (median) | p90 | tokens/s | prefill ms (median prompt "
        f"{report['results'][0]['prompt_tokens_median']:.0f} tok) | perplexity | RSS added by loading, MB | "
        "greedy = PyTorch | decode vs PyTorch | decode vs dense ORT |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['system']} | {r['decode_ms_per_token']:.2f} | {r['decode_ms_p90']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['prefill_ms']:.1f} | {r['perplexity']:.3f} | {r['rss_at_load_mb']:.0f} | "
            f"{r['greedy_identical_to_pytorch']} | {r['decode_speedup_vs_pytorch']:.2f}× | {r['decode_speedup_vs_dense_ort']:.2f}× |"
        )
    lines.append(
        f"\n{len(report['prompts'])} prompts × {report['new_tokens']} greedy tokens, {report['threads']} threads; "
        f"perplexity over {report['ppl_tokens_scored']} tokens of pydoc_data.topics (windows of 512). "
        f"{report['machine']['date']}, {report['machine']['processor']}."
    )
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(4.5 * max(2, len(rows)) / 1.5, 3.4))
    names = [r["system"].replace(" (", "\n(").replace("cscompile ", "cscompile\n") for r in rows]
    colors = ["#2a7", "#888", "#27a", "#a72", "#7a2"][: len(rows)]
    axes[0].bar(names, [r["tokens_per_s"] for r in rows], color=colors)
    axes[0].set_ylabel("decode tokens/s (higher is better)")
    axes[1].bar(names, [r["prefill_ms"] for r in rows], color=colors)
    axes[1].set_ylabel("prefill ms (lower is better)")
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    ppls = " vs ".join(f"{r['perplexity']:.3f}" for r in rows)
    fig.suptitle(f"SmolLM2-135M, perplexity {ppls}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
