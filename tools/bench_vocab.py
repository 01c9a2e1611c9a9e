"""The sensed vocabulary head (issue 24) against the full head on SmolLM2 or Gemma 3 270M (``--model``),
native step, greedy.

The preview is the high bit plane of the Q8_0 head stored as planes (``--preview planes``, no
extra bytes) or a separate copy re-rounded to 4-bit (``--preview copy``: Q4_1, blocks of 32); the margin ``tau`` is
calibrated on ``--calib`` tokens of ``pydoc_data.topics`` after the scored text (1.25 x the largest
preview error per unit of its scale e_n |x|: the row's preview error norm times the hidden state's norm). Measured:
  * decode ms/token at a 64-token context, full head (step + argmax) vs the sensed step at each
    K, medians over interleaved rounds;
  * greedy agreement with the full head on the shipped prompts (chat template, ``--new`` tokens
    each, the C path end to end) and the fallback rate;
  * teacher-forced over ``--tokens`` held-out tokens: one full-head pass records the full logits,
    the preview scores and |x| per position, and the selection (top K, exact candidates, rule) is
    replayed in numpy for each K (tests/unit/test_sensed_head.py: the C selection equals it):
    agreement, fallback rate, argmax inside the top K, and misses the rule let through.
Writes ``benchmarks/results/vocab.{json,png}`` and prints the table.

    python tools/bench_vocab.py [--ks 16,64,256] [--tokens 4096] [--calib 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.data.prompts import load_prompts
from cscompile.decode.tokenizer import Tokenizer
from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import machine_info, save_report
from cscompile.metrics import reference_corpus
from cscompile.models.zoo import fetch
from cscompile.native import engine as native
from cscompile.native import vocab
from cscompile.passes.precision import find_source_gguf

ROOT = Path(__file__).resolve().parents[1]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def decode_ms(
    dec: native.NativeDecoder, ids: np.ndarray, steps: int, sensed: native.SensedHead | None
) -> float:
    dec.reset()
    dec.forward(ids[:64])
    tok, times = int(ids[64]), []
    for _ in range(steps):
        t = time.perf_counter()
        tok = int(np.argmax(dec.step(tok))) if sensed is None else dec.step_greedy(tok, sensed).token
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def _ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected candidate counts >= 1, comma-separated")
    return ks


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", type=_ks, default=[16, 64, 256])
    ap.add_argument("--tokens", type=_positive, default=4096)
    ap.add_argument("--calib", type=_positive, default=1024)
    ap.add_argument("--rounds", type=_positive, default=3)
    ap.add_argument("--steps", type=_positive, default=32)
    ap.add_argument("--new", type=_positive, default=32)
    ap.add_argument("--prompts", type=_positive, default=50)
    ap.add_argument("--threads", type=_positive, default=2)
    ap.add_argument("--model", choices=["smollm2", "gemma3-270m"], default="smollm2")
    ap.add_argument(
        "--bits", type=int, choices=[4, 8], default=4, help="the projections' bits (the head is Q8_0)"
    )
    ap.add_argument("--preview", choices=["planes", "copy"], default="planes",
                    help="the head's high bit plane (no extra bytes) or a separate Q4_1 copy")  # fmt: skip
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vocab.json")
    args = ap.parse_args(argv)
    if args.model != "smollm2" and args.out == ap.get_default("out"):  # one result file per model
        args.out = args.out.with_name(f"vocab-{args.model}.json")
    ks: list[int] = args.ks
    art = fetch(args.model, progress=say)
    tok = Tokenizer(art.tokenizer_dir)
    ids = np.asarray(tok.encode(reference_corpus()), np.int64)
    held, calib = ids[: args.tokens], ids[args.tokens : args.tokens + args.calib]
    say(
        f"packing {args.model} (its GGUF's grid where the step runs it, else RTN; Q8_0 head) and the 4-bit preview"
    )
    w = native.weights_from_model(art.onnx, find_source_gguf(art.directory), bits=args.bits)
    preview = vocab.build_preview(w.head, 4) if args.preview == "copy" else None
    if preview is None:
        w = native.head_as_planes(w)
    rowerr = vocab.preview_errors(w.head, preview)
    dec = native.NativeDecoder(w, args.threads, max_ctx=8192, capacity=8192)
    say(f"calibrating tau on {len(calib)} tokens")
    tau, _ = vocab.calibrate_tau(dec, preview, calib, rowerr)
    heads = {k: native.SensedHead(preview, k, tau, rowerr) for k in ks}
    say("timing")
    names: list[Any] = ["full", *ks]
    timing = {str(n): [] for n in names}  # type: dict[str, list[float]]
    tids = ids[args.tokens + args.calib :]
    for n in names:
        decode_ms(dec, tids, 4, heads.get(n))  # warm-up
    for r in range(args.rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            timing[str(n)].append(decode_ms(dec, tids, args.steps, heads.get(n)))
    say("shipped prompts")
    prompts = load_prompts()[: args.prompts]
    agree = {k: 0 for k in ks}
    fell = {k: [0, 0] for k in ks}
    for p in prompts:
        text = " ".join(m["content"] for m in p.messages)
        pid = tok.encode(tok.apply_chat_template(p.messages) if getattr(tok, "chat_template", None) else text)
        want = dec.generate(pid, args.new)
        for k in ks:
            agree[k] += dec.generate(pid, args.new, sensed=heads[k]) == want
            dec.reset()
            dec.forward(pid)
            for t in want[:-1]:
                fell[k][0] += dec.step_greedy(t, heads[k]).fell_back
                fell[k][1] += 1
    say(f"teacher-forced over {len(held)} tokens")
    tf = vocab.replay(dec, preview, rowerr, held, tau, ks)
    full_ms = float(np.median(timing["full"]))
    rows = []
    for k in ks:
        ms = float(np.median(timing[str(k)]))
        rows.append({
            "bits": 4, "K": k, "model": args.model, "tau": tau, "decode_ms": ms, "speedup": full_ms / ms,
            "prompts_agree": agree[k] / len(prompts), "prompts_fallback": fell[k][0] / max(fell[k][1], 1),
            **{f"tf_{m}": v for m, v in tf["by_k"][k].items()}, "tf_heldout_worst_err_over_tau": tf["worst_over_tau"],
        })  # fmt: skip
    report = {
        "model": args.model,
        "command": "python tools/bench_vocab.py"
        + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(),
        "load_before": list(__import__("os").getloadavg()),
        "threads": args.threads,
        "simd": native.simd_level(),
        "head_bytes": w.head.nbytes,
        "preview": args.preview,
        "preview_bytes": preview.nbytes if preview is not None else 0,
        "preview_reads_bytes": preview.nbytes if preview is not None else vocab.plane_bytes(w.head),
        "full_decode_ms": full_ms,
        "prompts": len(prompts),
        "new_tokens": args.new,
        "tokens": len(held),
        "calib_tokens": len(calib),
        "rows": rows,
        "timing": timing,
    }
    save_report(report, args.out, to_markdown, lambda path: plot(report, path))
    return 0


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "| head | K | decode ms/token @64 | vs full | prompts agree | prompts fallback | teacher-forced agree "
        "| tf fallback | argmax in top K | misses passed |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| full (Q8_0) | – | {report['full_decode_ms']:.2f} | 1.00× | – | – | – | – | – | – |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| sensed, 4-bit preview | {r['K']} | {r['decode_ms']:.2f} | {r['speedup']:.2f}× "
            f"| {100 * r['prompts_agree']:.1f}% | {100 * r['prompts_fallback']:.1f}% | {100 * r['tf_agree']:.2f}% "
            f"| {100 * r['tf_fallback']:.1f}% | {100 * r['tf_in_topk']:.2f}% | {r['tf_misses_passed']} |"
        )
    m = report["machine"]
    lines.append(
        f"\nPreview ({report.get('preview', 'copy')}) {report['preview_bytes'] / 1e6:.1f} MB stored vs head {report['head_bytes'] / 1e6:.1f} MB "
        f"(+{100 * report['preview_bytes'] / report['head_bytes']:.0f}%); tau {report['rows'][0]['tau']:.4g} "
        f"calibrated on {report['calib_tokens']} tokens (held-out worst error "
        f"{report['rows'][0]['tf_heldout_worst_err_over_tau']:.2f} tau). {report['threads']} threads, "
        f"{report['simd']}; medians of interleaved rounds; {report['prompts']} shipped prompts x "
        f"{report['new_tokens']} new tokens; teacher-forced over {report['tokens']} tokens. "
        f"Load average before: {report['load_before'][0]:.2f}. {m.get('date', '')}. Command: `{report['command']}`."
    )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    rs = report["rows"]
    ax.plot([r["K"] for r in rs], [r["decode_ms"] for r in rs], "o-", label="sensed head")
    ax.axhline(report["full_decode_ms"], color="gray", ls="--", label="full head")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("candidates K")
    ax.set_ylabel("decode ms/token @64")
    ax.set_title(f"{report.get('model', 'smollm2')}: sensed vocabulary head (4-bit preview)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
