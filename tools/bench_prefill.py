"""Prefill speed on long prompts (issue 26 item 9): the native engine against the dense ORT engine
of the same int4 bundle and llama.cpp on the source GGUF.

Each system runs in its own worker process (``cscompile/evaluation/peers.py``: stopped while
another is timed), with the same token ids and threads. A prompt of each length is the reference
corpus's tokens (repeated as needed); one run = a fresh cache, the prompt fed at once, the wall
time of that forward (``prefill_ms``: logits of the last position only). Rounds interleave the
systems (the order rotates every run); the table gives medians over rounds and the machine's ISA
(the native build's SIMD level and the CPU's flags). Writes ``benchmarks/results/prefill.json``.

    python tools/bench_prefill.py [--lengths 64,512,2048,8192] [--rounds 3] [--threads 2]
                                  [--bundle out/smollm2-int4.csb] [--systems native,dense,llama.cpp]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: the systems this tool names -> the peer benchmark's keys (bundle: its default engine)
SYSTEMS = {"native": "bundle", "dense": "bundle-ort", "llama.cpp": "llama.cpp"}
LABELS = {"native": "native engine", "dense": "dense ORT engine", "llama.cpp": "llama.cpp"}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {what} >= 1, comma-separated")
    return vals


def _lengths(text: str) -> list[int]:
    return _ints(text, "prompt lengths")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return int(text)


def _systems(text: str) -> list[str]:
    names = text.split(",")
    if not names or any(n not in SYSTEMS for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct names among {', '.join(SYSTEMS)}")
    return names


def isa() -> dict[str, Any]:
    """The CPU's widest vector ISA and the SIMD level the native build runs."""
    from cscompile.evaluation.report import cpu_isa
    from cscompile.native import engine as native

    try:
        level = native.simd_level()
    except Exception as e:  # noqa: BLE001 - reported, not fatal: the other systems still run
        level = f"unavailable ({e})".splitlines()[0]
    return {"cpu": cpu_isa(), "native_simd": level}


def prompt_ids(tokenizer_dir: Path, n: int) -> list[int]:
    from cscompile.decode.tokenizer import Tokenizer
    from cscompile.metrics import reference_corpus

    base = Tokenizer(tokenizer_dir).encode(reference_corpus())
    return (base * (n // len(base) + 1))[:n]


def default_bundle(art: Any, cache: Path) -> Path:
    """A plain int4 bundle of the model (native engine by default, dense ORT beside it), cached."""
    from cscompile.compiler.build import build_bundle
    from cscompile.steps.base import Lines

    path = cache / "int4.csb"
    if not path.exists():
        say(f"building {path} (cscompile build --precision int4)")
        build_bundle(art.directory, path, precision="int4", progress=Lines(say))
    return path


def to_markdown(report: dict[str, Any]) -> str:
    names = [n for n in report["systems"] if report["status"].get(n) == "ok"]
    head = "| prompt tokens | " + " | ".join(f"{LABELS[n]} ms (tok/s)" for n in names)
    ratio = "native" in names and "dense" in names
    lines = [head + (" | native / dense |" if ratio else " |")]
    lines.append("|" + "---|" * (1 + len(names) + ratio))
    for L in report["lengths"]:
        med = report["median_ms"][str(L)]
        cells = [f"{med[n]:,.0f} ({L / med[n] * 1e3:,.0f})" if med.get(n) else "-" for n in names]
        row = f"| {L:,} | " + " | ".join(cells)
        if ratio:
            r = med["native"] / med["dense"] if med.get("native") and med.get("dense") else None
            row += f" | {r:.2f}x" if r else " | -"
        lines.append(row + " |")
    m = report["machine"]
    lines.append("")
    lines.append(f"{m.get('processor')} ({m.get('cores')} cores), {report['threads']} threads; native build: "
                 f"{report['isa']['native_simd']}; CPU ISA: {report['isa']['cpu']}; "
                 f"medians of {report['rounds']} interleaved rounds")  # fmt: skip
    for n, st in report["status"].items():
        if st != "ok":
            lines.append(f"{n}: {st}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=_lengths, default=[64, 512, 2048, 8192])
    ap.add_argument("--rounds", type=_positive, default=3)
    ap.add_argument("--threads", type=_positive, default=2)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument(
        "--bundle", type=Path, help="an int4 bundle with the native engine (default: build one, cached)"
    )
    ap.add_argument("--systems", type=_systems, default=list(SYSTEMS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prefill.json")
    args = ap.parse_args(argv)
    if args.bundle is not None and not args.bundle.exists():
        ap.error(f"--bundle {args.bundle}: no such file; expected a bundle built with --precision int4")

    from cscompile.cache import cache_root
    from cscompile.evaluation.peers import SPEC_BY_KEY, Worker, missing_modules, model_artifacts, prepare
    from cscompile.evaluation.report import machine_info

    lengths: list[int] = args.lengths
    names: list[str] = args.systems
    art = model_artifacts(args.model)
    ids = prompt_ids(art.tokenizer_dir, max(lengths))
    cache = cache_root() / "peers" / Path(args.model).name
    cache.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or (default_bundle(art, cache) if {"native", "dense"} & set(names) else None)
    ctx = {"artifacts": art, "threads": args.threads, "n_ctx": (max(lengths) + 8 + 63) // 64 * 64,
           "peer_dir": cache, "bundle": lambda: bundle}  # fmt: skip
    log_dir = Path(tempfile.mkdtemp(prefix="cscompile-prefill-"))
    status: dict[str, str] = {}
    workers: dict[str, Worker] = {}
    times: dict[str, dict[str, list[float]]] = {n: {str(L): [] for L in lengths} for n in names}
    try:
        for n in names:
            key = SYSTEMS[n]
            missing = missing_modules(SPEC_BY_KEY[key])
            if missing:
                status[n] = f"not installed: {', '.join(missing)} ({SPEC_BY_KEY[key].install})"
                say(f"{n}: {status[n]}")
                continue
            try:
                cfg = prepare(key, ctx, say)
            except Exception as e:  # noqa: BLE001 - the reason this system did not run
                status[n] = f"could not prepare: {e}".splitlines()[0]
                say(f"{n}: {status[n]}")
                continue
            say(f"{n}: loading")
            w = Worker(key, cfg, log_dir / f"{n}.log")
            if not w.hello.get("ready"):
                status[n] = f"failed to load: {w.hello.get('error')}"
                say(f"{n}: {status[n]}")
                w.close()
                continue
            w.pause()
            workers[n] = w
            status[n] = "ok"
        live = [n for n in names if n in workers]
        for n in live:  # warm-up: first-run allocations, thread pools
            reply = workers[n].call(op="generate", ids=ids[: min(lengths)], n=1)
            if "error" in reply:
                status[n] = f"failed: {reply['error']}"
        run = 0
        for r in range(args.rounds):
            for L in lengths:
                ok = [n for n in live if status[n] == "ok"]
                for n in ok[run % len(ok) :] + ok[: run % len(ok)] if ok else []:
                    reply = workers[n].call(op="generate", ids=ids[:L], n=1)
                    if "error" in reply:
                        status[n] = f"failed at {L} tokens: {reply['error']}"
                        continue
                    times[n][str(L)].append(float(reply["prefill_ms"]))
                run += 1
                say(f"round {r + 1}/{args.rounds}, {L} tokens: " + ", ".join(
                    f"{n} {times[n][str(L)][-1]:,.0f} ms" for n in ok if times[n][str(L)]))  # fmt: skip
    finally:
        for w in workers.values():
            w.close()
    report = {
        "command": "python tools/bench_prefill.py"
        + " ".join([""] + (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(),
        "isa": isa(),
        "threads": args.threads,
        "model": str(args.model),
        "bundle": str(bundle) if bundle else None,
        "lengths": lengths,
        "rounds": args.rounds,
        "systems": names,
        "status": status,
        "prefill_ms": times,
        "median_ms": {
            str(L): {n: float(np.median(times[n][str(L)])) for n in names if times[n][str(L)]}
            for L in lengths
        },
        "logs": str(log_dir),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(to_markdown(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
