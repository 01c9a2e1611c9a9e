"""Where one streaming client's tokens cost more in `cscompile serve` than in `cscompile run` (issue 25).

Two runs on the same bundle, prompts and settings (greedy, ``--max-tokens`` each, ``--threads``):

- **solo**: a worker process loads the bundle and streams every prompt with ``model.stream``
  (what ``cscompile run`` does per prompt);
- **server**: ``cscompile serve`` in its own process, one client streaming ``/v1/completions``
  for every prompt in turn (``stream: true``).

For each, the CPU time of every thread of the generating process (psutil, per thread: user +
system) over the measured prompts, divided by the tokens generated, after one unmeasured round.
CPU time rather than wall time because a loaded machine stretches wall time but barely changes
the work done per token: the difference between the two rows is the server's own work per token
(the event loop thread: SSE framing, the asyncio hand-over, the HTTP writes; the engine thread's
scheduling), which on cores the decode threads fill is added to the token time. The server's
main thread is uvicorn's event loop; the engine thread and the OpenMP workers are the others.
Wall-time inter-token latencies (p50) are printed too; they mean something on a quiet machine only.
With ``--py-spy S``, the server run is also sampled by py-spy (S samples/s) and the busiest
functions of its event loop and engine threads are listed.

    python tools/serve_overhead.py --bundle smol.csb [--prompts 8] [--max-tokens 64] [--threads 2] [--py-spy 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import server  # noqa: E402

SOLO = r"""
import json, sys, time
import psutil
from cscompile.runtime import GenerationConfig, load

bundle, threads, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
cfg = GenerationConfig(max_new_tokens=max_tokens, temperature=0.0)
me = psutil.Process()

def cpu():
    return {t.id: t.user_time + t.system_time for t in me.threads()}

with load(bundle, threads) as model:
    for p in prompts:  # warm-up round
        for _ in model.stream(p, cfg):
            pass
    before, tokens, gaps = cpu(), 0, []
    for p in prompts:
        last = None
        for ev in model.stream(p, cfg):
            now = time.perf_counter()
            if ev.token_id >= 0:
                tokens += 1
                if last is not None:
                    gaps.append(now - last)
                last = now
    after = cpu()
print(json.dumps({"main": me.pid, "before": before, "after": after, "tokens": tokens, "gaps": gaps}))
"""


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def per_thread(before: dict[Any, float], after: dict[Any, float]) -> dict[int, float]:
    return {int(t): after[t] - before.get(t, 0.0) for t in after}


def summary(name: str, main: int, cpu: dict[int, float], tokens: int, gaps: list[float]) -> dict[str, Any]:
    us = 1e6 / max(tokens, 1)
    return {
        "run": name,
        "tokens": tokens,
        "cpu_us_per_token": sum(cpu.values()) * us,
        "main_thread_us_per_token": cpu.get(main, 0.0) * us,
        "other_threads_us_per_token": sum(v for t, v in cpu.items() if t != main) * us,
        "itl_p50_ms": float(np.median(gaps) * 1e3) if gaps else float("nan"),
    }


async def client_run(url: str, model: str, prompts: list[str], max_tokens: int) -> list[float]:
    """Stream every prompt in turn; the gaps between text chunks (s)."""
    import httpx

    gaps: list[float] = []
    async with httpx.AsyncClient() as client:
        for p in prompts:
            body = {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": True}
            last = None
            async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = json.loads(line[6:])["choices"]
                    if choice and choice[0].get("text"):
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        last = now
    return gaps


def hot_functions(raw: Path, top: int = 15) -> dict[str, list[tuple[str, int]]]:
    """py-spy's collapsed stacks: the innermost frames' sample counts, per thread role (the engine
    thread runs the scheduler's loop; the event loop thread the rest)."""
    roles: dict[str, Counter[str]] = {"event loop": Counter(), "engine": Counter()}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        role = "engine" if any("_loop (cscompile/serve/scheduler.py" in f for f in frames) else "event loop"
        leaf = frames[-1]
        # the first cscompile frame from the leaf up says whose work it is
        mine = next((f for f in reversed(frames) if "cscompile/" in f), None)
        roles[role][leaf if mine is None else f"{leaf}  [in {mine}]"] += int(n)
    return {k: c.most_common(top) for k, c in roles.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--prompts", type=_at_least(1), default=8)
    ap.add_argument("--max-tokens", type=_at_least(1), default=64)
    ap.add_argument("--threads", type=_at_least(1), default=2)
    ap.add_argument(
        "--py-spy", type=_at_least(0), default=0, help="py-spy samples per second on the server (0: off)"
    )
    args = ap.parse_args(argv)
    if not args.bundle.exists():
        ap.error(f"--bundle {args.bundle}: no such bundle")
    from cscompile.data.prompts import load_prompts

    prompts = [" ".join(m["content"] for m in p.messages)[:600] for p in load_prompts()[: args.prompts]]
    env = dict(os.environ, CSCOMPILE_THREADS=str(args.threads))
    say("solo: model.stream per prompt in a worker process")
    out = subprocess.run([sys.executable, "-c", SOLO, str(args.bundle), str(args.threads), str(args.max_tokens),
                          json.dumps(prompts)], env=env, capture_output=True, text=True, check=True)  # fmt: skip
    s = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [summary("solo (run)", s["main"], per_thread(s["before"], s["after"]), s["tokens"], s["gaps"])]

    import psutil

    say("server: one client streaming /v1/completions")
    pid: list[int] = []
    with server("cscompile", args.bundle, None, args.threads, 1, 2048, pid) as (url, model):
        proc = psutil.Process(pid[0])
        asyncio.run(client_run(url, model, prompts, args.max_tokens))  # warm-up round
        spy = None
        raw = Path(tempfile.mkdtemp()) / "spy.txt"
        if args.py_spy:
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid[0]), "--rate", str(args.py_spy), "--threads",
                                    "--format", "raw", "--output", str(raw), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1.0)
        before = {t.id: t.user_time + t.system_time for t in proc.threads()}
        tokens_before = _generated(url)
        gaps = asyncio.run(client_run(url, model, prompts, args.max_tokens))
        after = {t.id: t.user_time + t.system_time for t in proc.threads()}
        tokens = _generated(url) - tokens_before
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(60)
    rows.append(summary("server, 1 client", pid[0], per_thread(before, after), int(tokens), gaps))
    for r in rows:
        print(f"{r['run']:>18}: {r['tokens']} tokens, CPU {r['cpu_us_per_token']:.0f} us/token (main thread "
              f"{r['main_thread_us_per_token']:.0f}, others {r['other_threads_us_per_token']:.0f}), "
              f"inter-token p50 {r['itl_p50_ms']:.2f} ms")  # fmt: skip
    print(
        f"server - solo: {rows[1]['cpu_us_per_token'] - rows[0]['cpu_us_per_token']:+.0f} us of CPU per token"
    )
    if args.py_spy and raw.exists():
        for role, hot in hot_functions(raw).items():
            total = sum(n for _, n in hot)
            print(f"\n{role} thread, busiest leaf frames (samples; top {len(hot)} of the thread's {total}+):")
            for f, n in hot:
                print(f"  {n:6d}  {f}")
    return 0


def _at_least(least: int) -> Any:
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {least}")
        return int(text)

    return parse


def _generated(url: str) -> float:
    """The server's generated-token counter (``/metrics``)."""
    import httpx

    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("cscompile_generation_tokens_total "):
            return float(line.split()[1])
    return 0.0


if __name__ == "__main__":
    raise SystemExit(main())
