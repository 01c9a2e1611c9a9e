"""Soak a bundle: many generations in one process, resident memory before and after.

Loads the bundle once with ``cscompile.runtime.load`` and runs N generations (default 500)
over the shipped prompts (chat template applied, retrieval excluded: long prefills), greedy
and seeded sampling alternating, a fixed number of new tokens each. RSS is sampled (after a
``gc.collect()``) at the end of the warm-up (first 50 generations) and every 50 generations
after; growth = (end - warm-up) / warm-up. Writes benchmarks/results/soak.json.

    python tools/soak.py /tmp/smol.csb                       # 500 generations, 32 new tokens
    python tools/soak.py /tmp/smol.csb -n 100 --max-growth 5 # exit 1 if RSS grew by more than 5%
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

from cscompile.data.prompts import load_prompts
from cscompile.evaluation.report import machine_info
from cscompile.runtime import GenerationConfig, load

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("code", "math", "summarization", "dialogue")


def rss_mb() -> float:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("-n", "--generations", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=50, help="generations before the baseline RSS sample")
    ap.add_argument("--every", type=int, default=50, help="RSS sample interval (generations)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-growth", type=float, default=None, help="exit 1 if RSS grew by more (percent)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = ap.parse_args(argv)
    if args.generations <= args.warmup:
        ap.error(f"--generations ({args.generations}) must exceed --warmup ({args.warmup})")

    rss_start = rss_mb()
    t_load = time.perf_counter()
    model = load(args.bundle, threads=args.threads)
    load_s = time.perf_counter() - t_load
    rss_loaded = rss_mb()
    tok = model.tokenizer
    limit = model.context_length
    prompts = []
    for fam in FAMILIES:
        for p in load_prompts(families=[fam]):
            ids = tok.encode(tok.apply_chat_template(p.messages))
            if limit is None or len(ids) + args.max_new_tokens <= limit:
                prompts.append((p.id, ids))
    if not prompts:
        print(f"no prompt fits the context of {limit}", file=sys.stderr)
        return 2

    samples: list[dict[str, float]] = []
    decode_ms: list[float] = []
    tokens = 0
    rss_warm = float("nan")
    t0 = time.perf_counter()
    with model:
        for g in range(args.generations):
            pid, ids = prompts[g % len(prompts)]
            sampled = g % 2 == 1
            cfg = GenerationConfig(
                max_new_tokens=args.max_new_tokens,
                temperature=0.8 if sampled else 0.0,
                top_p=0.95,
                seed=g,
                stop_at_eos=False,
            )
            res = model.generate(ids, cfg)
            tokens += len(res.token_ids)
            if g >= args.warmup:
                decode_ms += res.stats.decode_ms
            done = g + 1
            if done == args.warmup:
                rss_warm = rss_mb()
                samples.append({"generations": done, "rss_mb": rss_warm})
            elif done > args.warmup and (done % args.every == 0 or done == args.generations):
                samples.append({"generations": done, "rss_mb": rss_mb()})
                print(f"[{done}/{args.generations}] rss {samples[-1]['rss_mb']:.1f} MB", file=sys.stderr)
        content = model.content_hash
    elapsed = time.perf_counter() - t0
    rss_end = samples[-1]["rss_mb"]
    growth = 100.0 * (rss_end - rss_warm) / rss_warm
    report = {
        "command": "python tools/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "bundle": str(args.bundle),
        "content_hash": content,
        "generations": args.generations,
        "warmup": args.warmup,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "prompts": len(prompts),
        "tokens_generated": tokens,
        "seconds": elapsed,
        "load_seconds": load_s,
        "decode_ms_median": float(np.median(decode_ms)) if decode_ms else None,
        "rss_mb": {"start": rss_start, "loaded": rss_loaded, "after_warmup": rss_warm, "end": rss_end},
        "rss_max_mb": max(s["rss_mb"] for s in samples),
        "rss_growth_pct": growth,
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{args.generations} generations, {tokens} tokens in {elapsed:.1f} s "
        f"(decode {report['decode_ms_median']:.2f} ms/token median); RSS {rss_loaded:.0f} MB loaded, "
        f"{rss_warm:.1f} MB after {args.warmup} warm-up, {rss_end:.1f} MB at the end: growth {growth:+.2f}%"
    )
    print(f"written to {args.out}")
    if args.max_growth is not None and growth > args.max_growth:
        print(f"RSS grew by {growth:.2f}%, more than --max-growth {args.max_growth}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
