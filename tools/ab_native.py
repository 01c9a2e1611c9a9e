"""The native decode step's kernel at a git revision against the working tree's, side by side.

Both kernel sources (``cscompile/native/csrc/qdecode.c`` at ``--base`` and as it is now) are
compiled with the same flags (the runtime's own fallback compile, cached by content) and loaded
into one process; SmolLM2's exact-grid weights run through each, rounds interleaved: prefill of
each ``--lengths`` (last position's logits) and decode ms/token after a 64-token context. The two
builds' logits are compared too (a kernel change that should not change the numbers must give
the same logits). Writes ``benchmarks/results/ab_native.{json,png}`` and prints a table.

    python tools/ab_native.py --base HEAD~1 [--lengths 48,512] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.clib import compile_into_cache
from cscompile.decode.tokenizer import Tokenizer
from cscompile.evaluation.report import machine_info, save_report
from cscompile.metrics import reference_corpus
from cscompile.models.zoo import fetch
from cscompile.native import engine as native

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "cscompile/native/csrc/qdecode.c"


def say(msg: str) -> None:
    print(msg, file=sys.stderr)


def build(source: Path, label: str) -> ctypes.CDLL:
    """Compile ``source`` (cached by content) and load it with the runtime's signatures."""
    lib = ctypes.CDLL(str(compile_into_cache(source, f"native decode kernel ({label})")))
    if lib.cs_dec_abi_version() != native.ABI:
        raise SystemExit(
            f"{label}: kernel ABI {lib.cs_dec_abi_version()}, this checkout runs ABI {native.ABI}"
        )
    for name, (restype, argtypes) in native.SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="git revision of the kernel to compare with")
    ap.add_argument("--lengths", default="48,512", help="prompt lengths to prefill")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ab_native.json")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    base_src = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.base}:{SOURCE}"], capture_output=True,
                              text=True)  # fmt: skip
    if base_src.returncode != 0:
        git_said = (base_src.stderr.strip().splitlines() or ["no output"])[0]
        ap.error(
            f"--base {args.base}: no {SOURCE} at that revision ({git_said}); expected a git revision of this repo"
        )
    art = fetch("smollm2", progress=say)
    ids = np.asarray(Tokenizer(art.tokenizer_dir).encode(reference_corpus()), np.int64)[
        : max(lengths) + 64 + 1
    ]
    say("packing SmolLM2's exact Q4_1 grid")
    weights = native.weights_from_model(art.onnx)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "qdecode.c").write_text(base_src.stdout)
        libs = {f"base ({args.base})": build(Path(tmp) / "qdecode.c", args.base),
                "working tree": build(ROOT / SOURCE, "working tree")}  # fmt: skip
    decs = {k: native.NativeDecoder(weights, args.threads, lib=lib) for k, lib in libs.items()}
    names = list(decs)
    keys = [f"prefill{n}" for n in lengths] + ["decode@64"]
    runs: dict[str, dict[str, list[float]]] = {k: {m: [] for m in keys} for k in names}
    logits: dict[str, dict[int, np.ndarray]] = {k: {} for k in names}
    for r in range(args.rounds + 1):  # round 0 warms up
        for k in names[r % 2 :] + names[: r % 2]:
            d = decs[k]
            for n in lengths:
                d.reset()
                ms = timed(lambda d=d, n=n, k=k: logits[k].__setitem__(n, d.forward(ids[:n]).copy()))
                if r:
                    runs[k][f"prefill{n}"].append(ms)
            d.reset()
            d.forward(ids[:64])
            steps = [timed(lambda d=d, t=t: d.forward([int(t)])) for t in ids[64 : 64 + args.steps]]
            if r:
                runs[k]["decode@64"].append(float(np.median(steps)))
        say(f"round {r}/{args.rounds}" + (" (warm-up)" if r == 0 else ""))
    a, b = names
    diff = {n: float(np.abs(logits[a][n] - logits[b][n]).max()) for n in lengths}
    rows = [{"metric": m, a: float(np.median(runs[a][m])), b: float(np.median(runs[b][m]))} for m in keys]
    report = {"command": "python tools/ab_native.py" + " ".join([""] + (argv or sys.argv[1:])),
              "machine": machine_info(), "threads": args.threads, "rounds": args.rounds, "base": args.base,
              "simd": native.SIMD_LEVELS.get(int(libs[b].cs_dec_simd()), "?"), "rows": rows, "runs": runs,
              "max_abs_logit_difference": diff}  # fmt: skip

    def markdown(rep: dict[str, Any]) -> str:
        lines = [
            f"| ms (median of {rep['rounds']} interleaved rounds) | {a} | {b} | speed-up |",
            "|---|---|---|---|",
        ]
        for row in rep["rows"]:
            lines.append(f"| {row['metric']} | {row[a]:.2f} | {row[b]:.2f} | {row[a] / row[b]:.2f}× |")
        d = ", ".join(f"{n} tokens: {v:.2g}" for n, v in rep["max_abs_logit_difference"].items())
        m = rep["machine"]
        lines.append(f"\nlargest |logit difference| between the builds: {d}. {rep['threads']} threads, "
                     f"{rep['simd']}; {m['date']}, {m['processor']}. Command: `{rep['command']}`.")  # fmt: skip
        return "\n".join(lines)

    def plot(path: Path) -> None:
        from cscompile.evaluation.plotting import pyplot

        plt = pyplot()
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4))
        for ax, m in zip(axes, keys):
            for i, k in enumerate(names):
                ax.scatter([i] * len(runs[k][m]), runs[k][m], color="#a44" if i == 0 else "#2a7")
            ax.set_xticks(range(len(names)), names, fontsize=8)
            ax.set_title(m, fontsize=9)
            ax.set_ylabel("ms")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    save_report(report, args.out, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
