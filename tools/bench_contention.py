"""The native decode step on cores that other processes also want (issue 25 item 3).

Each configuration runs in its own worker process (libgomp reads its wait policy when it is first
loaded, so the environment is set before the bundle is), with a bundle loaded once. Each round
measures every configuration idle, beside one and beside two CPU-busy processes
(``python -c "while True: pass"``), rounds interleaved; per cell the median over rounds of each
round's median and mean ms/token over ``--steps`` decode steps (the mean shows collapses and probes),
after ``--settle`` unmeasured steps under the new load (a governed engine adapts within its back-off).

Configurations: ``default`` (cscompile's own: libgomp spin of 1,000 + adaptive thread count),
``spin`` (libgomp's default spin of 300,000, fixed ``--threads``: before issue 25), ``spin+adaptive``,
``passive`` (OMP_WAIT_POLICY=passive, fixed), ``1-thread``, ``short-spin`` (spin 1,000, fixed). Measure on a quiet machine: other load
on the cores is contention the table does not name.

    python tools/bench_contention.py --bundle smol.csb [--rounds 3] [--steps 64] [--threads 2] [--configs default,spin] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPIN = {"GOMP_SPINCOUNT": "300000"}  # libgomp's default when nothing is set
CONFIGS: dict[str, tuple[dict[str, str], str]] = {
    # name: (environment, threads: "T" = --threads, else that number)
    "default": ({}, "T"),
    "spin": ({**SPIN, "CSCOMPILE_ADAPTIVE_THREADS": "0"}, "T"),
    "spin+adaptive": ({**SPIN, "CSCOMPILE_ADAPTIVE_THREADS": "1"}, "T"),
    "passive": ({"OMP_WAIT_POLICY": "passive", "CSCOMPILE_ADAPTIVE_THREADS": "0"}, "T"),
    "1-thread": ({"CSCOMPILE_ADAPTIVE_THREADS": "0"}, "1"),
    "short-spin": ({"GOMP_SPINCOUNT": "1000", "CSCOMPILE_ADAPTIVE_THREADS": "0"}, "T"),
}
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "CSCOMPILE_ADAPTIVE_THREADS", "CSCOMPILE_THREADS")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _positive(least: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {least}")
        return value

    return parse


def _bundle(text: str) -> Path:
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(
            f"{text}: no such bundle (build one: cscompile build smollm2 -o smol.csb)"
        )
    return p


def _configs(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    bad = [n for n in names if n not in CONFIGS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"{bad[0] if bad else text!r}: expected names from {', '.join(CONFIGS)}"
        )
    return names


def worker(bundle: Path, threads: int) -> int:
    """Answer each line ``N`` on stdin with the ms of N decode steps (a JSON list), one sequence."""
    import numpy as np

    from cscompile.runtime import load

    model = load(bundle, threads, engine="native")
    sess = model.session
    prompt = np.arange(1, 65, dtype=np.int64)[None]
    state, tok = sess.new_state(), 0
    print(json.dumps({"ready": True, "threads": getattr(sess, "threads", None)}), flush=True)
    for line in sys.stdin:
        n, times = int(line), []
        for _ in range(n):
            if state.length == 0 or state.length + 1 >= min(1024, sess.context_length):
                state = sess.new_state()
                tok = int(np.argmax(sess.forward_last(prompt, state)))
            t = time.perf_counter()
            tok = int(np.argmax(sess.forward_last(np.array([[tok]], np.int64), state)))
            times.append((time.perf_counter() - t) * 1e3)
        print(json.dumps(times), flush=True)
    return 0


def _spawn(name: str, bundle: Path, threads: int) -> subprocess.Popen[str]:
    env_add, t = CONFIGS[name]
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    env.update(env_add)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    n = threads if t == "T" else int(t)
    cmd = [sys.executable, __file__, "--worker", "--bundle", str(bundle), "--threads", str(n)]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None
    json.loads(p.stdout.readline())
    return p


def _ask(p: subprocess.Popen[str], steps: int) -> list[float]:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(f"{steps}\n")
    p.stdin.flush()
    return [float(x) for x in json.loads(p.stdout.readline())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=_bundle, required=True)
    ap.add_argument("--rounds", type=_positive(1), default=3)
    ap.add_argument("--steps", type=_positive(8), default=64)
    ap.add_argument("--settle", type=_positive(1), default=40, help="steps run before each measured cell")
    ap.add_argument("--threads", type=_positive(1), default=2)
    ap.add_argument("--busy", type=_positive(0), default=2, help="up to this many CPU-busy processes (0..N)")
    ap.add_argument("--configs", type=_configs, default=list(CONFIGS), help="comma-separated (default: all)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.bundle, args.threads)
    if args.threads < 2:
        ap.error(
            f"argument --threads: '{args.threads}': expected an integer >= 2 (1 thread is a configuration)"
        )

    import numpy as np

    from cscompile.evaluation.report import cpu_name
    from cscompile.native.engine import simd_level

    isa = f"{cpu_name()}, kernel {simd_level()}, {os.cpu_count()} CPUs"
    configs: list[str] = args.configs
    say(f"contention: {isa}; starting {len(configs)} workers")
    workers = {name: _spawn(name, args.bundle, args.threads) for name in configs}
    levels = list(range(args.busy + 1))
    cells: dict[tuple[str, int], list[tuple[float, float]]] = {(n, b): [] for n in configs for b in levels}
    try:
        for r in range(args.rounds):
            for busy in levels:
                hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
                try:
                    time.sleep(0.3)
                    names = list(configs)
                    names = names[r % len(names) :] + names[: r % len(names)]
                    for name in names:
                        # settle: a governed step has adapted to the new load after at most max_back
                        # steps (the steady state is what a server sees; recovery is tests/unit/test_threads.py's)
                        _ask(workers[name], args.settle)
                        t = _ask(workers[name], args.steps)
                        cells[name, busy].append((float(np.median(t)), float(np.mean(t))))
                        say(
                            f"round {r + 1} busy {busy} {name}: median {np.median(t):.2f} mean {np.mean(t):.2f} ms"
                        )
                        time.sleep(0.2)
                finally:
                    for h in hogs:
                        h.kill()
                        h.wait()
    finally:
        for p in workers.values():
            p.kill()
            p.wait()
    table = {
        f"{n}@{b}": {"median": float(np.median([c[0] for c in cells[n, b]])),
                     "mean": float(np.median([c[1] for c in cells[n, b]]))}
        for n in configs for b in levels
    }  # fmt: skip
    head = "| config | " + " | ".join(f"+{b} busy: median / mean ms (× idle)" for b in levels) + " |"
    lines = [f"native step, {args.threads} threads, {isa}; median over {args.rounds} rounds", head,
             "|---" * (len(levels) + 1) + "|"]  # fmt: skip
    for n in configs:
        idle = table[f"{n}@0"]["median"]
        row = [f"{table[f'{n}@{b}']['median']:.2f} / {table[f'{n}@{b}']['mean']:.2f} "
               f"({table[f'{n}@{b}']['mean'] / idle:.1f}×)" for b in levels]  # fmt: skip
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"isa": isa, "threads": args.threads, "rounds": args.rounds,
                                        "steps": args.steps, "cells": table}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
