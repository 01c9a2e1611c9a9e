"""Weight precision on SmolLM2: perplexity and decode speed of fp32 / int8 / int4 forms, side by side.

Builds each variant with :class:`cscompile.passes.quantize.QuantizeWeightsPass` (Q/K/V and
gate/up packed) and optionally :class:`cscompile.passes.fuse.FuseAttentionPass` from the fetched
model (and, for the exact forms, the GGUF it came from), then measures in one process:
perplexity over ``--ppl-tokens`` tokens of ``pydoc_data.topics`` (windows of 512) and greedy
decode ms/token after a 64-token prompt, rounds interleaved across variants so machine noise
hits them alike. Writes JSON + PNG to ``benchmarks/results/precision.*`` and prints a table.

    python tools/bench_precision.py [--ppl-tokens 8192] [--rounds 5] [--new-tokens 96]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import machine_info, save_report
from cscompile.metrics import onnx_scorer, perplexity, reference_corpus
from cscompile.models.zoo import fetch
from cscompile.passes.fuse import FuseAttentionPass
from cscompile.passes.pipeline import analyze
from cscompile.passes.quantize import PrecisionPlan, QuantizeWeightsPass
from cscompile.quant.gguf import GGUFGrid
from cscompile.runtime import DecoderSession, Tokenizer

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = [
    # name, plan (attn, ffn, lm_head) or None for fp32, use the GGUF grid, accuracy level, fuse attention
    ("fp32 (dense export)", None, False, 0, False),
    ("fp32 + GQA fusion", None, False, 0, True),
    ("int8 RTN, head int8, acc 4", PrecisionPlan("int8", "int8", "int8"), False, 4, False),
    ("int4 RTN sym, head int8 RTN, acc 4", PrecisionPlan("int4", "int4", "int8"), False, 4, False),
    (
        "int4 exact Q4_1 grid + blocksum, head Q8_0 exact, acc 4",
        PrecisionPlan("int4", "int4", "int8"),
        True,
        4,
        False,
    ),
    (
        "int4 exact Q4_1 grid + blocksum, head Q8_0 exact, acc 0",
        PrecisionPlan("int4", "int4", "int8"),
        True,
        0,
        False,
    ),
    ("int4 RTN sym + GQA fusion, acc 4", PrecisionPlan("int4", "int4", "int8"), False, 4, True),
    ("int4 exact grid + GQA fusion, acc 4", PrecisionPlan("int4", "int4", "int8"), True, 4, True),
]


def decode_ms(sess: DecoderSession, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill ms, median decode ms/token), greedy."""
    st = sess.new_state()
    t0 = time.perf_counter()
    logits = sess.forward(np.array([prompt]), st)[0, -1]
    pre = (time.perf_counter() - t0) * 1e3
    times = []
    tok = int(np.argmax(logits))
    for _ in range(new_tokens - 1):
        t1 = time.perf_counter()
        logits = sess.forward(np.array([[tok]]), st)[0, -1]
        times.append((time.perf_counter() - t1) * 1e3)
        tok = int(np.argmax(logits))
    return pre, float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "precision.json")
    args = ap.parse_args(argv)

    art = fetch("smollm2")
    grid = GGUFGrid(art.gguf)
    tok = Tokenizer(art.tokenizer_dir)
    ids = tok.encode(reference_corpus())[: args.ppl_tokens]
    prompt = tok.encode(reference_corpus()[5000:9000])[:64]
    work = Path(tempfile.mkdtemp(prefix="cscompile-precision-"))
    sessions: dict[str, DecoderSession] = {}
    built: dict[str, dict] = {}
    for name, plan, use_grid, acc, fuse in VARIANTS:
        if plan is None and not fuse:
            path = art.onnx
            built[name] = {"report": {}, "file_mb": art.onnx.stat().st_size / 2**20}
        else:
            model, _ = analyze(art.onnx)
            if fuse:  # fusion first: quantization then packs Q/K/V straight into the GQA node
                FuseAttentionPass(max_positions=8192)(model)
            report: dict = {}
            if plan is not None:
                qp = QuantizeWeightsPass(plan, grid if use_grid else None, acc)
                qp(model)
                report = qp.report
            path = work / f"v{len(sessions)}.onnx"
            ir.save(model, str(path))
            built[name] = {"report": report, "file_mb": path.stat().st_size / 2**20}
        # ORT's default spinning workers, as a single-model service runs them (spinning=False is
        # steadier across sessions taking turns but 15-20% slower for every variant)
        sessions[name] = DecoderSession(path, threads=args.threads)
        print(f"built {name}: {built[name]}", file=sys.stderr)

    ppl = {}
    for name, sess in sessions.items():
        ppl[name] = perplexity(onnx_scorer(sess), ids).to_dict()
        print(f"ppl {name}: {ppl[name]['perplexity']:.3f}", file=sys.stderr)
    timing: dict[str, list[tuple[float, float]]] = {n: [] for n in sessions}
    for r in range(args.rounds):
        order = list(sessions) if r % 2 == 0 else list(sessions)[::-1]
        for name in order:
            decode_ms(sessions[name], prompt, 8)  # warm
            timing[name].append(decode_ms(sessions[name], prompt, args.new_tokens))
    base = "fp32 (dense export)"
    base_dec = float(np.median([t[1] for t in timing[base]]))
    rows = []
    for name in sessions:
        dec = float(np.median([t[1] for t in timing[name]]))
        rows.append(
            {
                "variant": name,
                "decode_ms_per_token": dec,
                "decode_ms_rounds": [round(t[1], 2) for t in timing[name]],
                "prefill_ms_64": float(np.median([t[0] for t in timing[name]])),
                "speedup_vs_fp32": base_dec / dec,
                "perplexity": ppl[name]["perplexity"],
                "ppl_vs_fp32": ppl[name]["perplexity"] / ppl[base]["perplexity"] - 1,
                "file_mb": built[name]["file_mb"],
                "projections": built[name]["report"],
            }
        )
    report = {
        "command": "python tools/bench_precision.py",
        "machine": machine_info(),
        "threads": args.threads,
        "ppl_tokens_scored": ppl[base]["tokens_scored"],
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "results": rows,
    }
    save_report(report, args.out, to_markdown, lambda p: _plot(rows, p))
    return 0


def to_markdown(report: dict) -> str:
    lines = [
        "| variant | decode ms/token | speedup vs fp32 | prefill 64 tok ms | perplexity | Δ ppl | file MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['variant']} | {r['decode_ms_per_token']:.2f} | {r['speedup_vs_fp32']:.2f}× | {r['prefill_ms_64']:.1f} | "
            f"{r['perplexity']:.3f} | {r['ppl_vs_fp32']:+.2%} | {r['file_mb']:.0f} |"
        )
    lines.append(
        f"\nPerplexity over {report['ppl_tokens_scored']} tokens (windows of 512); decode: median of "
        f"{report['rounds']} interleaved rounds × {report['new_tokens']} greedy tokens, {report['threads']} threads. "
        f"{report['machine']['date']}, {report['machine']['processor']}."
    )
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "osD^vP*X"
    for i, r in enumerate(rows):
        ax.scatter(
            r["decode_ms_per_token"],
            r["perplexity"],
            s=70,
            marker=markers[i % len(markers)],
            label=r["variant"],
        )
    ax.set_xscale("log")
    ax.set_xlabel("decode ms/token, log scale (lower is better)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("SmolLM2-135M: weight precision on ONNX Runtime CPU (2 threads)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
