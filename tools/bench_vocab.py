"""The sensed vocabulary head (issue 24) against the full head on SmolLM2 or Gemma 3 270M (``--model``),
native step, greedy.

The preview is the high bit plane of the Q8_0 head stored as planes (``--preview planes``, no
extra bytes) or a separate copy re-rounded to 4-bit (``--preview copy``: Q4_1, blocks of 32), or
both (``--preview planes,copy``); the margin ``tau`` is calibrated on ``--calib`` tokens of
``pydoc_data.topics`` after the scored text (1.25 x the largest preview error per unit of its
scale e_n |x|: the row's preview error norm times the hidden state's norm). Measured:
  * decode ms/token at a 64-token context, full head (step + argmax) vs the sensed step at each
    K and preview, medians over interleaved rounds;
  * greedy agreement with the full head on the shipped prompts (chat template, ``--new`` tokens
    each, the C path end to end) and the fallback rate;
  * teacher-forced over ``--tokens`` held-out tokens: one full-head pass records the full logits,
    the preview scores and |x| per position, and the selection (top K, exact candidates, rule) is
    replayed in numpy for each K (tests/unit/test_sensed_head.py: the C selection equals it):
    agreement, fallback rate, argmax inside the top K, and misses the rule let through;
  * the preview choices the C step does not run, replayed in numpy on the same held-out tokens
    (``vocab.sweep_previews``; the head's input recovered from the full logits): one stage of the
    top ``--sweep-bits`` bits of each code, and cascades (the top 2 or 3 bits over every row, the
    ``--k1s`` best bounds kept, their 4-bit preview, the K best, exact rows): fallback rate,
    argmax in the candidates, misses let through, bytes expected per token (docs/design.md
    "Sensed vocabulary head": why the cascade is not built).
Writes ``benchmarks/results/vocab[-MODEL].{json,png}`` (the plot: decode ms vs K per timed preview,
greedy agreement, and per preview choice the fallback rate and expected bytes vs K) and prints
the tables.

    python tools/bench_vocab.py [--model gemma3-270m] [--ks 16,64,256] [--tokens 4096] [--calib 1024]
        [--rounds 3] [--preview planes,copy] [--sweep-bits 2,3,4] [--k1s 1024,4096,16384]
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


def _previews(text: str) -> list[str]:
    got = [p for p in text.split(",") if p]
    if not got or any(p not in ("planes", "copy") for p in got):
        raise argparse.ArgumentTypeError(f"{text!r}: expected planes, copy or planes,copy")
    return list(dict.fromkeys(got))


def _bits(text: str) -> list[int]:
    try:
        got = [int(b) for b in text.split(",")]
    except ValueError:
        got = []
    if not got or any(not 1 <= b <= 4 for b in got):
        raise argparse.ArgumentTypeError(f"{text!r}: expected preview bit widths in 1..4, comma-separated")
    return got


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
    ap.add_argument("--preview", type=_previews, default=["planes"],
                    help="the head's high bit plane (no extra bytes), a separate Q4_1 copy, or both: planes,copy")  # fmt: skip
    ap.add_argument("--sweep-bits", type=_bits, default=[2, 3, 4],
                    help="one-stage previews replayed in numpy: the top bits of each code")  # fmt: skip
    ap.add_argument("--k1s", type=_ks, default=[1024, 2048, 4096, 8192, 16384],
                    help="cascades replayed in numpy: rows kept by the 2- and 3-bit first stage")  # fmt: skip
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
    previews: list[str] = args.preview
    planes_w = native.head_as_planes(w)
    setups: dict[str, Any] = {}  # preview name -> (weights, preview matrix or None, e_n)
    for name in previews:
        pv = vocab.build_preview(w.head, 4) if name == "copy" else None
        wp = w if pv is not None else planes_w
        setups[name] = (wp, pv, vocab.preview_errors(wp.head, pv))
    decs = {
        name: native.NativeDecoder(su[0], args.threads, max_ctx=8192, capacity=8192)
        for name, su in setups.items()
    }
    say(f"calibrating tau on {len(calib)} tokens")
    taus = {name: vocab.calibrate_tau(decs[name], su[1], calib, su[2])[0] for name, su in setups.items()}
    heads = {
        (name, k): native.SensedHead(su[1], k, taus[name], su[2]) for name, su in setups.items() for k in ks
    }
    dec = decs[previews[0]]  # the full head: the same logits from either (planes are Q8_0 bit for bit)
    say("timing")
    names: list[Any] = ["full", *heads]
    timing = {_key(n): [] for n in names}  # type: dict[str, list[float]]
    tids = ids[args.tokens + args.calib :]

    def timed(n: Any) -> float:
        d = dec if n == "full" else decs[n[0]]
        return decode_ms(d, tids, args.steps, heads.get(n))

    for n in names:
        decode_ms(dec if n == "full" else decs[n[0]], tids, 4, heads.get(n))  # warm-up
    for r in range(args.rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            timing[_key(n)].append(timed(n))
    say("shipped prompts")
    prompts = load_prompts()[: args.prompts]
    agree = {n: 0 for n in heads}
    fell = {n: [0, 0] for n in heads}
    for p in prompts:
        text = " ".join(m["content"] for m in p.messages)
        pid = tok.encode(tok.apply_chat_template(p.messages) if getattr(tok, "chat_template", None) else text)
        want = dec.generate(pid, args.new)
        for n, sh in heads.items():
            d = decs[n[0]]
            agree[n] += d.generate(pid, args.new, sensed=sh) == want
            d.reset()
            d.forward(pid)
            for t in want[:-1]:
                fell[n][0] += d.step_greedy(t, sh).fell_back
                fell[n][1] += 1
    say(f"teacher-forced over {len(held)} tokens")
    tf = {name: vocab.replay(decs[name], su[1], su[2], held, taus[name], ks) for name, su in setups.items()}
    full_ms = float(np.median(timing["full"]))
    rows = []
    for name, k in heads:
        ms = float(np.median(timing[_key((name, k))]))
        r = tf[name]
        rows.append({
            "bits": 4, "preview": name, "K": k, "model": args.model, "tau": taus[name], "decode_ms": ms,
            "speedup": full_ms / ms, "prompts_agree": agree[(name, k)] / len(prompts),
            "prompts_fallback": fell[(name, k)][0] / max(fell[(name, k)][1], 1),
            **{f"tf_{m}": v for m, v in r["by_k"][k].items()}, "tf_heldout_worst_err_over_tau": r["worst_over_tau"],
        })  # fmt: skip
    say("preview choices replayed in numpy (the head's input recovered from the logits)")
    xd = native.NativeDecoder(planes_w, args.threads, max_ctx=8192, capacity=8192)
    choices = [vocab.PreviewChoice(b, k) for b in args.sweep_bits for k in ks]
    choices += [vocab.PreviewChoice(b, k, k1) for b in (2, 3) for k1 in args.k1s for k in ks if k < k1]
    sweep = vocab.sweep_previews(
        planes_w.head,
        int(w.config["vocab"]),
        vocab.hidden_states(xd, calib),
        vocab.hidden_states(xd, held),
        choices,
    )
    report = {
        "model": args.model,
        "command": "python tools/bench_vocab.py"
        + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(),
        "load_before": list(__import__("os").getloadavg()),
        "threads": args.threads,
        "simd": native.simd_level(),
        "head_bytes": w.head.nbytes,
        "preview": ",".join(previews),
        "preview_bytes": {n: (su[1].nbytes if su[1] is not None else 0) for n, su in setups.items()},
        "preview_reads_bytes": {
            n: (su[1].nbytes if su[1] is not None else vocab.plane_bytes(su[0].head))
            for n, su in setups.items()
        },
        "full_decode_ms": full_ms,
        "prompts": len(prompts),
        "new_tokens": args.new,
        "tokens": len(held),
        "calib_tokens": len(calib),
        "rows": rows,
        "sweep": sweep,
        "timing": timing,
    }
    save_report(report, args.out, to_markdown, lambda path: plot(report, path))
    return 0


def _key(n: Any) -> str:
    return "full" if n == "full" else f"{n[0]}:{n[1]}"


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "| head | K | decode ms/token @64 | vs full | prompts agree | prompts fallback | teacher-forced agree "
        "| tf fallback | argmax in top K | misses passed |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| full (Q8_0) | – | {report['full_decode_ms']:.2f} | 1.00× | – | – | – | – | – | – |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| sensed, 4-bit preview ({r.get('preview', 'planes')}) | {r['K']} | {r['decode_ms']:.2f} | {r['speedup']:.2f}× "
            f"| {100 * r['prompts_agree']:.1f}% | {100 * r['prompts_fallback']:.1f}% | {100 * r['tf_agree']:.2f}% "
            f"| {100 * r['tf_fallback']:.1f}% | {100 * r['tf_in_topk']:.2f}% | {r['tf_misses_passed']} |"
        )
    m = report["machine"]
    lines.append(
        f"\nPreview ({report.get('preview', 'copy')}) {_mb(report['preview_bytes'])} MB stored vs head {report['head_bytes'] / 1e6:.1f} MB; "
        f"tau {report['rows'][0]['tau']:.4g} "
        f"calibrated on {report['calib_tokens']} tokens (held-out worst error "
        f"{report['rows'][0]['tf_heldout_worst_err_over_tau']:.2f} tau). {report['threads']} threads, "
        f"{report['simd']}; medians of interleaved rounds; {report['prompts']} shipped prompts x "
        f"{report['new_tokens']} new tokens; teacher-forced over {report['tokens']} tokens. "
        f"Load average before: {report['load_before'][0]:.2f}. {m.get('date', '')}. Command: `{report['command']}`."
    )
    sw = report.get("sweep")
    if sw:
        lines += [
            f"\nPreview choices replayed in numpy over the same {sw['tokens']} held-out tokens (tau per bit width "
            + ", ".join(f"{b}-bit {t:.3g}" for b, t in sw["taus"].items())
            + f"; full head {sw['full_head_bytes'] / 1e6:.1f} MB; bytes expected per token = the first stage's plane "
            "and the scales + a cascade's K1 rows of the 4-bit plane's rest + K row groups + fallback x the full head; "
            "tiered: a failed cascade runs the one-stage 4-bit rule before the full head):\n",
            "| preview | K | fallback | argmax in candidates | misses passed | expected MB/token | vs full head "
            "| tiered: full-head fallback | tiered: expected MB/token |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sw["rows"]:
            lines.append(
                f"| {r['preview']} | {r['k']} | {100 * r['fallback']:.1f}% | {100 * r['in_topk']:.1f}% "
                f"| {r['misses_passed']} | {r['expected_bytes_per_token'] / 1e6:.1f} "
                f"| {r['expected_bytes_per_token'] / sw['full_head_bytes']:.2f} "
                + (
                    f"| {100 * r['fallback_full_tiered']:.1f}% | {r['expected_bytes_tiered'] / 1e6:.1f} |"
                    if r["k1"]
                    else "| – | – |"
                )
            )
    return "\n".join(lines) + "\n"


def _mb(b: Any) -> str:
    if isinstance(b, dict):
        return ", ".join(f"{k} {v / 1e6:.1f}" for k, v in b.items())
    return f"{b / 1e6:.1f}"


def plot(report: dict[str, Any], path: Path) -> None:
    """Four panels: decode ms/token vs K per timed preview (the full head dashed); greedy agreement
    with the full head on the prompts; per preview choice (bits, stages) replayed in numpy the
    held-out fallback rate and the bytes expected per token vs K.
    """
    plt = pyplot()
    fig, axs = plt.subplots(2, 2, figsize=(11, 7.5))
    rs = report["rows"]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rs:
        by.setdefault(r.get("preview", "planes"), []).append(r)
    ax = axs[0][0]
    for name, rr in by.items():
        ax.plot([r["K"] for r in rr], [r["decode_ms"] for r in rr], "o-", label=f"sensed, 4-bit {name}")
    ax.axhline(report["full_decode_ms"], color="gray", ls="--", label="full head")
    ax.set_ylabel("decode ms/token @64")
    ax.set_title("speed (timed)")
    ax = axs[0][1]
    for name, rr in by.items():
        ax.plot([r["K"] for r in rr], [100 * r["prompts_agree"] for r in rr], "o-", label=f"prompts, {name}")
        ax.plot(
            [r["K"] for r in rr], [100 * r["tf_agree"] for r in rr], "s--", label=f"teacher-forced, {name}"
        )
    ax.set_ylabel("greedy = full head (%)")
    ax.set_title("agreement")
    sw = report.get("sweep") or {"rows": [], "full_head_bytes": report["head_bytes"]}
    series: dict[str, list[dict[str, Any]]] = {}
    for r in sw["rows"]:
        series.setdefault(r["preview"], []).append(r)
    for name, rr in series.items():
        style = "o-" if not rr[0]["k1"] else ("^--" if rr[0]["bits"] == 2 else "v:")
        ks = [r["k"] for r in rr]
        axs[1][0].plot(ks, [100 * r["fallback"] for r in rr], style, label=name, ms=3)
        axs[1][1].plot(ks, [r["expected_bytes_per_token"] / 1e6 for r in rr], style, label=name, ms=3)
    axs[1][0].set_ylabel("held-out fallback (%)")
    axs[1][0].set_title("fallback by preview (numpy replay)")
    axs[1][1].axhline(sw["full_head_bytes"] / 1e6, color="gray", ls="--", label="full head")
    axs[1][1].set_ylabel("expected head MB/token")
    axs[1][1].set_title("bytes by preview (numpy replay)")
    for row in axs:
        for ax in row:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("candidates K")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(f"{report.get('model', 'smollm2')}: sensed vocabulary head, previews by bits and stages")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
