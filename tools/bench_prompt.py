"""Prompt compression benchmark (issue #9): dense vs compressed prompts on the long-context sets.

    python tools/bench_prompt.py [--bundle out/smollm2-prompt.csb] [--n 12] [--tokens 1000] [--quick]

Builds the bundle (int4 + --prompt-scorer) if it is missing, then writes
``benchmarks/results/prompt/bench.{json,md,png}``. Quality and end-to-end latency per setting; the speedup is
dense end-to-end time over compressed end-to-end time, same examples, same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from cscompile.evaluation.prompt_bench import plot, run_prompt_bench, to_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("out/smollm2-prompt.csb"))
    ap.add_argument("--n", type=int, default=12, help="examples per family")
    ap.add_argument("--tokens", type=int, default=1000, help="retrieval context length (QA: half)")
    ap.add_argument("--ratios", default="0.5,0.3,0.2,0.1")
    ap.add_argument("--orders", default="original,relevance")
    ap.add_argument(
        "--fine", type=float, default=0.0, help="word-level fine stage share (0 = whole sentences)"
    )
    ap.add_argument("--families", default="retrieval,qa,summarize")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prompt"))
    ap.add_argument("--quick", action="store_true", help="4 examples per family")
    args = ap.parse_args()
    if not args.bundle.exists():
        from cscompile.cli.commands.common import resolve_model_dir
        from cscompile.compiler.build import build_bundle

        print(f"building {args.bundle} (int4, --prompt-scorer)")
        build_bundle(resolve_model_dir("smollm2"), args.bundle, precision="int4", prompt_scorer=True)
    t0 = time.time()
    report = run_prompt_bench(
        args.bundle,
        families=args.families.split(","),
        n=4 if args.quick else args.n,
        tokens=args.tokens,
        ratios=[float(r) for r in args.ratios.split(",")],
        threads=args.threads,
        orders=args.orders.split(","),
        fine=args.fine,
        say=lambda m: print(m, flush=True),
    )
    report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report["machine"] = f"{platform.processor() or platform.machine()}, {args.threads} threads"
    report["seconds"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    md = to_markdown(report)
    (args.out / "bench.md").write_text(md)
    plot(report, args.out / "bench.png")
    print(md)
    print(f"wrote {args.out}/bench.{{json,md,png}} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
