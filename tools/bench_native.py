"""The native decode step against the ONNX Runtime engines on SmolLM2, side by side in one process.

Variants: the native step on the source Q4_1 grid (exact), on round-to-nearest Q4_1 and Q8_0
(what models without a GGUF get; the grid is ignored), the exact grid with a 4-bit head rounded
to nearest or by GPTQ on 1,024 calibration tokens (lossy points), the ORT int4 engine of a default bundle
(exact grid with block-sum correction, GQA fusion, int8 activations) and the ORT fp32 export.
Measured: decode ms/token after a 64- and a 1,024-token context (median of ``--steps`` steps),
prefill ms for 64 and 512 tokens (last position's logits for the native step, all positions for
ORT — what each runtime does), rounds interleaved across variants; perplexity over
``--ppl-tokens`` tokens of ``pydoc_data.topics`` (windows of 512). Writes
``benchmarks/results/native.{json,md,png}``.

    python tools/bench_native.py [--rounds 3] [--steps 32] [--ppl-tokens 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import machine_info, save_report
from cscompile.metrics import onnx_scorer, perplexity, reference_corpus
from cscompile.models.zoo import fetch
from cscompile.native import engine as native
from cscompile.passes.precision import precision_plan, quantize_model
from cscompile.runtime import DecoderSession, Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def decode_ms(sess: Any, ids: np.ndarray, ctx: int, steps: int) -> float:
    state = sess.new_state()
    sess.forward(ids[None, :ctx].astype(np.int64), state)
    times = []
    tok = int(ids[ctx])
    for _ in range(steps):
        t = time.perf_counter()
        logits = sess.forward(np.array([[tok]], np.int64), state)
        times.append((time.perf_counter() - t) * 1e3)
        tok = int(np.argmax(logits[0, -1]))
    return float(np.median(times))


def prefill_ms(sess: Any, ids: np.ndarray, n: int) -> float:
    state = sess.new_state()
    run = getattr(sess, "forward_last", sess.forward)
    t = time.perf_counter()
    run(ids[None, :n].astype(np.int64), state)
    return (time.perf_counter() - t) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "native.json")
    args = ap.parse_args(argv)
    art = fetch("smollm2", progress=say)
    tok = Tokenizer(art.tokenizer_dir)
    ids = np.asarray(tok.encode(reference_corpus()), np.int64)
    corpus = ids[: args.ppl_tokens]
    timing_ids = ids[args.ppl_tokens : args.ppl_tokens + 1100]
    ctx_len = int(art.manifest.get("config", {}).get("max_position_embeddings", 2048) or 2048)
    sessions: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        say("building the ORT int4 engine (cscompile quantize, as in a default bundle)")
        quantize_model(art.directory, Path(tmp) / "int4", precision_plan("int4"))
        sessions["ORT int4 (exact grid + block sums, int8 act.)"] = DecoderSession(
            Path(tmp) / "int4" / "model.onnx", threads=args.threads
        )
        sessions["ORT fp32 (export)"] = DecoderSession(art.onnx, threads=args.threads)
        for name, kw in (
            ("native, exact Q4_1 grid (int16 act.)", {}),
            ("native, RTN Q4_1 (grid ignored)", {"source_grid": False}),
            ("native, RTN Q8_0 (grid ignored)", {"source_grid": False, "bits": 8}),
            ("native, exact grid + Q4_1 RTN head", {"head_bits": 4}),
        ):
            say(f"packing {name}")
            w = native.weights_from_model(art.onnx, **kw)  # type: ignore[arg-type]
            sessions[name] = native.NativeSession(w, args.threads, context_length=ctx_len)
        say("GPTQ-rounding the LM head to Q4_1 on 1,024 calibration tokens (PyTorch, after the scored text)")
        from cscompile.search.native_search import NativeVariants

        tv = NativeVariants(art.hf_dir, ids[8192:9216], threads=args.threads)
        head = native.pack(tv.head_grid)
        del tv
        exact = sessions["native, exact Q4_1 grid (int16 act.)"].weights
        layers = [native.LayerPlan()] * exact.config["n_layers"]
        sessions["native, exact grid + Q4_1 GPTQ head"] = native.NativeSession(
            native.derive(exact, layers, head_bits=4, head=head), args.threads, context_length=ctx_len
        )
        names = list(sessions)
        keys = ("decode@64", "decode@1024", "prefill64", "prefill512")
        runs: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in names}
        for name in names:  # warm-up
            decode_ms(sessions[name], timing_ids, 64, 4)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                s = sessions[name]
                runs[name]["decode@64"].append(decode_ms(s, timing_ids, 64, args.steps))
                runs[name]["decode@1024"].append(decode_ms(s, timing_ids, 1024, args.steps))
                runs[name]["prefill64"].append(prefill_ms(s, timing_ids, 64))
                runs[name]["prefill512"].append(prefill_ms(s, timing_ids, 512))
            say(f"round {r + 1}/{args.rounds}")
        rows = []
        for name in names:
            say(f"perplexity: {name}")
            s = sessions[name]
            scorer = onnx_scorer(s) if isinstance(s, DecoderSession) else (
                lambda x, s=s: s.forward(x, s.new_state())
            )  # fmt: skip
            ppl = perplexity(scorer, corpus, window=512).perplexity
            rows.append(
                {
                    "variant": name,
                    "perplexity": ppl,
                    **{k: float(np.median(v)) for k, v in runs[name].items()},
                }
            )
    base = next(r for r in rows if r["variant"].startswith("ORT int4"))
    for r in rows:
        r["decode_speedup_vs_ort_int4"] = base["decode@64"] / r["decode@64"]
    report = {
        "command": "python tools/bench_native.py"
        + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(),
        "threads": args.threads,
        "simd": native.simd_level(),
        "rounds": args.rounds,
        "steps": args.steps,
        "ppl_tokens": int(len(corpus)),
        "rows": rows,
        "runs": runs,
    }
    save_report(report, args.out, to_markdown, lambda p: plot(report, p))
    print(to_markdown(report))
    return 0


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "| variant | decode ms/token @64 | @1024 | vs ORT int4 | prefill 64 tok ms | prefill 512 tok ms | perplexity |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['variant']} | {r['decode@64']:.2f} | {r['decode@1024']:.2f} | {r['decode_speedup_vs_ort_int4']:.2f}× "
            f"| {r['prefill64']:.1f} | {r['prefill512']:.1f} | {r['perplexity']:.3f} |"
        )
    m = report["machine"]
    lines.append(
        f"\n{report['threads']} threads, kernel path {report['simd']}; medians over {report['rounds']} interleaved rounds "
        f"× {report['steps']} steps; perplexity over {report['ppl_tokens']} tokens (windows of 512). "
        f"{m.get('date', '')}, {m.get('processor', '')}. Command: `{report['command']}`."
    )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in report["rows"]:
        ax.scatter(r["decode@64"], r["perplexity"], s=40)
        ax.annotate(
            r["variant"],
            (r["decode@64"], r["perplexity"]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("decode ms/token (64-token context, lower is better)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("SmolLM2: native step vs ONNX Runtime engines")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
