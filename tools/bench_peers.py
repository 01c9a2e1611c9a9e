"""cscompile against the systems a user would pick instead, on one machine, in one run (issue 7).

PyTorch eager, cscompile dense ORT, the cscompile bundle (int4 engine, and its switching runtime
over the motif family), llama.cpp on the very GGUF the project starts from, and onnxruntime-genai
(fp32 and int4, built by its own builder from the same fp32 weights). Each system runs in its own
process, one at a time, with the same token ids, threads and generation length; see
``cscompile/evaluation/peers.py`` for what is measured and how. Peers that are not installed are
reported with the reason (install them with ``bash tools/setup.sh --peers``).

    python tools/bench_peers.py            # 2 prompts/family × 128 tokens, 4,096 ppl tokens
    python tools/bench_peers.py --quick    # 1 prompt/family × 64 tokens, 2,048 ppl tokens
    python tools/bench_peers.py --render benchmarks/results/peers.json   # table + plot again, no runs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cscompile.evaluation.peers import SPEC_BY_KEY, headline, plot, run_peer_bench, to_markdown
from cscompile.evaluation.report import save_report

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-family", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="1 prompt/family, 64 tokens, 2,048 ppl tokens")
    ap.add_argument(
        "--bundle", type=Path, help="the cscompile bundle to run (default: build one with --motifs, cached)"
    )
    ap.add_argument("--systems", help=f"comma-separated subset of: {', '.join(SPEC_BY_KEY)}")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--render", type=Path, help="re-render the table, plot and headline of a saved JSON (no runs)"
    )
    args = ap.parse_args(argv)
    if args.render:
        try:
            report = json.loads(args.render.read_text())
        except (OSError, ValueError) as exc:
            ap.error(
                f"--render {args.render}: cannot read it as JSON ({exc}); expected a report this tool saved"
            )
        if not isinstance(report, dict) or not isinstance(report.get("results"), list):
            ap.error(f"--render {args.render}: has no 'results' list; expected a report this tool saved")
        save_report(report, args.render, to_markdown, lambda p: plot(report, p))
        print()
        print(headline(report))
        return 0
    if args.quick:
        args.per_family, args.new_tokens, args.ppl_tokens = 1, 64, 2048
    out = args.out or ROOT / "benchmarks" / "results" / ("peers_quick.json" if args.quick else "peers.json")
    report = run_peer_bench(
        model=args.model,
        systems=args.systems.split(",") if args.systems else None,
        bundle=args.bundle,
        threads=args.threads,
        per_family=args.per_family,
        new_tokens=args.new_tokens,
        ppl_tokens=args.ppl_tokens,
        say=lambda m: print(m, file=sys.stderr),
    )
    report["command"] = "python tools/bench_peers.py" + " ".join(
        [""] + (argv if argv is not None else sys.argv[1:])
    )
    save_report(report, out, to_markdown, lambda p: plot(report, p))
    print()
    print(headline(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
