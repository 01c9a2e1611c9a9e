"""Load benchmark of `cscompile serve` against llama.cpp's own OpenAI-compatible server (issue 25).

Both servers run on 127.0.0.1 on the same model (the bundle's native engine / the source GGUF it
was built from) with the same thread count; a bounded asyncio client drives ``/v1/completions``
with ``stream: true`` at each concurrency (``--clients``, default 1,4,16): every client sends the
shipped prompts' texts in turn, greedy, ``--max-tokens`` each, until ``--requests`` per level are
done. Measured per level and server: total completion tokens/s over the wall time, time to first
token and inter-token latency (p50/p99), errors, and **mixed-up responses** (a greedy answer that
differs from the same prompt's answer at one client). With ``--busy 1`` every level is repeated
beside a CPU-busy process (a Python spin loop). Servers run one at a time; nothing else should.
llama-cpp-python's server runs with ``--interrupt_requests False`` (by default a new request
cuts the running stream short: at 2 clients 3 of 4 answers came back truncated).

    python tools/bench_serve.py --bundle B [--gguf F] [--clients 1,4,16] [--requests 32]
        [--max-tokens 64] [--busy 0,1] [--threads 2] [--servers cscompile,llama.cpp]

Writes ``benchmarks/results/serve.{json,png}`` and prints the table. Needs the ``serve`` extra and,
for the peer, ``llama-cpp-python[server]`` (the ``peers`` extra).

``--rss-requests N`` measures memory instead (issue 25: growth < 5% over 1,000 requests): the
cscompile server alone, warmed up with two rounds of the prompts at the highest ``--clients``,
then N requests at that concurrency cycling through every request path (streamed and whole
completions, streamed chat, and a streamed completion whose client leaves after three chunks),
the server process's resident set size (psutil) sampled after the warm-up and every N/10
requests. Reports the growth from the first sample to the last, in percent, and the samples;
writes ``benchmarks/results/serve_rss.json``.

    python tools/bench_serve.py --bundle B --rss-requests 1000 [--clients 4] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ("cscompile", "llama.cpp")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(kind: str, bundle: Path, gguf: Path | None, threads: int, clients: int, n_ctx: int,
           pid: list[int] | None = None):  # type: ignore[no-untyped-def]  # fmt: skip
    """A server subprocess on a free port; yields its base URL once ``/v1/models`` answers
    (``pid``, if given, gets the process id appended).
    """
    import httpx

    port = _free_port()
    env = dict(os.environ, CSCOMPILE_THREADS=str(threads))
    if kind == "cscompile":
        cmd = [sys.executable, "-m", "cscompile", "serve", str(bundle), "--port", str(port),
               "--max-running", str(max(clients, 1)), "--max-queue", str(max(clients, 16)), "--log-level", "warning"]  # fmt: skip
    else:
        assert gguf is not None
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
               "--host", "127.0.0.1", "--n_threads", str(threads), "--n_threads_batch", str(threads),
               "--n_ctx", str(n_ctx), "--verbose", "False", "--interrupt_requests", "False"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if pid is not None:
        pid.append(proc.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{kind} server exited: {proc.stderr.read().decode()[-400:] if proc.stderr else ''}"
                )
            try:
                r = httpx.get(url + "/v1/models", timeout=2)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server did not answer within 300 s")
            time.sleep(0.5)
        yield url, r.json()["data"][0]["id"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def busy(n: int):  # type: ignore[no-untyped-def]
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


async def one_request(client: Any, url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    text = []
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": f"HTTP {r.status_code}", "prompt": prompt}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = chunk.get("choices", [{}])[0].get("text", "")
            if piece:
                stamps.append(time.perf_counter())
                text.append(piece)
    if not stamps:  # an immediate end of text: a valid (empty) answer, no latencies
        return {
            "prompt": prompt,
            "text": "",
            "ttft": None,
            "gaps": [],
            "chunks": 0,
            "start": t0,
            "end": time.perf_counter(),
        }
    return {"prompt": prompt, "text": "".join(text), "ttft": stamps[0] - t0, "gaps": list(np.diff(stamps)),
            "chunks": len(stamps), "start": t0, "end": stamps[-1]}  # fmt: skip


async def level(url: str, model: str, prompts: list[str], clients: int, requests: int, max_tokens: int) -> list[dict[str, Any]]:  # fmt: skip
    import httpx

    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(prompts[i % len(prompts)])
    out: list[dict[str, Any]] = []

    async def worker() -> None:
        async with httpx.AsyncClient() as client:
            while not queue.empty():
                prompt = queue.get_nowait()
                try:
                    out.append(await one_request(client, url, model, prompt, max_tokens))
                except (httpx.HTTPError, json.JSONDecodeError) as exc:
                    out.append({"error": type(exc).__name__, "prompt": prompt})

    await asyncio.gather(*(worker() for _ in range(clients)))
    return out


#: the request paths the RSS run cycles through (see the module docstring)
RSS_KINDS = ("stream", "whole", "chat", "leave")


async def mixed_request(client: Any, url: str, model: str, prompt: str, max_tokens: int, kind: str) -> str:
    """One request of ``kind``; its text (``leave``: the client closes the stream after 3 chunks)."""
    base = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    if kind == "whole":
        r = await client.post(url + "/v1/completions", json={**base, "prompt": prompt}, timeout=600)
        r.raise_for_status()
        return str(r.json()["choices"][0]["text"])
    chat = kind == "chat"
    body = {**base, "stream": True, **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}  # fmt: skip
    pieces: list[str] = []
    async with client.stream("POST", url + ("/v1/chat/completions" if chat else "/v1/completions"),
                             json=body, timeout=600) as r:  # fmt: skip
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"]
            if choice:
                piece = (
                    (choice[0].get("delta", {}).get("content") or "") if chat else choice[0].get("text", "")
                )
                pieces.append(piece)
            if kind == "leave" and len(pieces) == 3:
                break  # leaving the block closes the connection mid-stream
    return "".join(pieces)


def rss_run(url: str, model: str, pid: int, prompts: list[str], clients: int, requests: int, max_tokens: int) -> dict[str, Any]:  # fmt: skip
    """Warm up, then ``requests`` mixed requests at ``clients``; the server's RSS along the way."""
    import psutil

    proc = psutil.Process(pid)
    for _ in range(2):  # warm-up: every path, every prompt, at the run's concurrency
        asyncio.run(mixed(url, model, prompts, clients, 2 * len(prompts), max_tokens, {}))
    samples = [(0, proc.memory_info().rss)]
    answers: dict[tuple[str, str], str] = {}
    errors = mixed_up = 0
    step = max(1, requests // 10)
    done = 0
    while done < requests:
        n = min(step, requests - done)
        e, m = asyncio.run(mixed(url, model, prompts, clients, n, max_tokens, answers, offset=done))
        errors, mixed_up, done = errors + e, mixed_up + m, done + n
        samples.append((done, proc.memory_info().rss))
        say(f"  {done} requests: RSS {samples[-1][1] / 2**20:.1f} MiB")
    first, last = samples[0][1], samples[-1][1]
    return {
        "requests": requests, "clients": clients, "errors": errors, "mixed_up": mixed_up,
        "rss_start_mib": first / 2**20, "rss_end_mib": last / 2**20, "rss_peak_mib": max(r for _, r in samples) / 2**20,
        "rss_growth_pct": 100.0 * (last - first) / first,
        "samples": [{"after_requests": n, "rss_mib": r / 2**20} for n, r in samples],
    }  # fmt: skip


async def mixed(url: str, model: str, prompts: list[str], clients: int, requests: int, max_tokens: int,
                answers: dict[tuple[str, str], str], offset: int = 0) -> tuple[int, int]:  # fmt: skip
    """``requests`` requests cycling through the prompts and :data:`RSS_KINDS`; (errors, answers
    that differ from the first answer seen for the same prompt and kind).
    """
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(offset, offset + requests):
        queue.put_nowait(i)
    counts = [0, 0]

    async def worker() -> None:
        async with httpx.AsyncClient() as client:
            while not queue.empty():
                i = queue.get_nowait()
                prompt, kind = prompts[i % len(prompts)], RSS_KINDS[i % len(RSS_KINDS)]
                try:
                    text = await mixed_request(client, url, model, prompt, max_tokens, kind)
                except (httpx.HTTPError, json.JSONDecodeError, KeyError):
                    counts[0] += 1
                    continue
                if answers.setdefault((prompt, kind), text) != text:
                    counts[1] += 1

    await asyncio.gather(*(worker() for _ in range(clients)))
    return counts[0], counts[1]


def summarize(results: list[dict[str, Any]], solo: dict[str, str]) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    gaps = [g for r in ok for g in r["gaps"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    wall = (max(r["end"] for r in ok) - min(r["start"] for r in ok)) if ok else float("nan")
    chunks = sum(r["chunks"] for r in ok)
    mixed = sum(1 for r in ok if r["prompt"] in solo and r["text"] != solo[r["prompt"]])

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q) * 1e3) if xs else float("nan")

    return {
        "requests": len(results), "errors": len(results) - len(ok), "mixed_up": mixed, "chunks": chunks,
        "error_kinds": sorted({str(r["error"]) for r in results if "error" in r}),
        "mixed_examples": [(r["prompt"][:40], r["text"][:60], solo[r["prompt"]][:60]) for r in ok
                           if r["prompt"] in solo and r["text"] != solo[r["prompt"]]][:3],
        "tokens_per_s": chunks / wall if ok and wall > 0 else float("nan"),
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99),
    }  # fmt: skip


def _ints(text: str) -> list[int]:
    try:
        xs = [int(x) for x in text.split(",")]
    except ValueError:
        xs = []
    if not xs or min(xs) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers >= 0")
    return xs


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return int(text)


def _servers(text: str) -> list[str]:
    xs = text.split(",")
    if not xs or any(x not in SERVERS for x in xs):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a comma-separated subset of {','.join(SERVERS)}"
        )
    return xs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle with the native engine")
    ap.add_argument(
        "--gguf", type=Path, help="the GGUF for llama.cpp (default: the bundle source's, from the cache)"
    )
    ap.add_argument("--clients", type=_ints, default=[1, 4, 16])
    ap.add_argument("--requests", type=_positive, default=32)
    ap.add_argument("--max-tokens", type=_positive, default=64)
    ap.add_argument("--busy", type=_ints, default=[0, 1])
    ap.add_argument("--threads", type=_positive, default=2)
    ap.add_argument("--servers", type=_servers, default=list(SERVERS))
    ap.add_argument("--prompts", type=_positive, default=16)
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/serve.json "
                    "(serve_rss.json with --rss-requests)")  # fmt: skip
    ap.add_argument("--rss-requests", type=_positive, default=None,
                    help="measure the cscompile server's RSS over this many requests instead (see above)")  # fmt: skip
    args = ap.parse_args(argv)
    results = ROOT / "benchmarks" / "results"
    if not args.bundle.exists():
        ap.error(f"--bundle {args.bundle}: no such bundle")
    if 0 in args.clients:
        ap.error("--clients: expected integers >= 1")
    from cscompile.data.prompts import load_prompts
    from cscompile.evaluation.report import machine_info, save_report

    command = "python tools/bench_serve.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    prompts = [" ".join(m["content"] for m in p.messages) for p in load_prompts()[: args.prompts]]
    if args.rss_requests:
        pid: list[int] = []
        clients = max(args.clients)
        with server("cscompile", args.bundle, None, args.threads, clients, 2048, pid) as (url, model):
            say(f"cscompile: RSS over {args.rss_requests} requests at {clients} clients")
            row = rss_run(url, model, pid[0], prompts, clients, args.rss_requests, args.max_tokens)
        rss = {"command": command, "machine": machine_info(), "threads": args.threads,
               "max_tokens": args.max_tokens, "bundle": str(args.bundle), **row}  # fmt: skip
        save_report(rss, args.out or results / "serve_rss.json", rss_markdown, None)
        return 0
    gguf = args.gguf
    if "llama.cpp" in args.servers and gguf is None:
        from cscompile.models.zoo import fetch
        from cscompile.passes.precision import find_source_gguf

        gguf = find_source_gguf(fetch("smollm2", progress=say).directory)
        if gguf is None:
            ap.error("--gguf: no GGUF found for the bundle's source; give one")
    rows: list[dict[str, Any]] = []
    for kind in args.servers:
        for b in args.busy:
            with (
                server(kind, args.bundle, gguf, args.threads, max(args.clients), 2048) as (url, model),
                busy(b),
            ):
                say(f"{kind}, {b} busy: warm-up and the one-client reference answers")
                ref = asyncio.run(level(url, model, prompts, 1, len(prompts), args.max_tokens))
                solo = {r["prompt"]: r["text"] for r in ref if "error" not in r}
                for c in args.clients:
                    say(f"{kind}, {b} busy, {c} clients")
                    res = asyncio.run(level(url, model, prompts, c, args.requests, args.max_tokens))
                    rows.append({"server": kind, "busy": b, "clients": c, **summarize(res, solo)})
    report = {
        "command": command,
        "machine": machine_info(), "threads": args.threads, "max_tokens": args.max_tokens,
        "requests": args.requests, "bundle": str(args.bundle), "gguf": str(gguf) if gguf else None, "rows": rows,
    }  # fmt: skip
    save_report(report, args.out or results / "serve.json", to_markdown, lambda path: plot(report, path))
    return 0


def rss_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    return (
        "| requests | clients | RSS after warm-up MiB | RSS at the end MiB | peak MiB | growth % | errors | mixed-up |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {r['requests']} | {r['clients']} | {r['rss_start_mib']:.1f} | {r['rss_end_mib']:.1f} | "
        f"{r['rss_peak_mib']:.1f} | {r['rss_growth_pct']:+.2f} | {r['errors']} | {r['mixed_up']} |\n\n"
        f"Requests cycle through {', '.join(RSS_KINDS)} ({r['max_tokens']} tokens, greedy); {r['threads']} "
        f"threads; {m.get('processor', '')}; {m.get('date', '')}. Command: `{r['command']}`.\n"
    )


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "| server | busy procs | clients | tokens/s | TTFT p50 / p99 ms | inter-token p50 / p99 ms | errors | mixed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['server']} | {r['busy']} | {r['clients']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} / "
            f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['errors']} | {r['mixed_up']} |"
        )
    m = report["machine"]
    lines.append(
        f"\n{report['requests']} requests per level, {report['max_tokens']} tokens each, greedy, streamed; "
        f"{report['threads']} threads per server; {m.get('processor', '')} ({m.get('isa', '')}); "
        f"{m.get('date', '')}. Command: `{report['command']}`."
    )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    from cscompile.evaluation.plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for (kind, b), style in zip(
        sorted({(r["server"], r["busy"]) for r in report["rows"]}),
        ["o-", "s--", "^-", "v--"] * 2,
        strict=False,
    ):
        rs = [r for r in report["rows"] if (r["server"], r["busy"]) == (kind, b)]
        label = f"{kind}" + (f" + {b} busy" if b else "")
        axes[0].plot([r["clients"] for r in rs], [r["tokens_per_s"] for r in rs], style, label=label)
        axes[1].plot([r["clients"] for r in rs], [r["ttft_p99_ms"] for r in rs], style, label=label)
    for ax, title in zip(axes, ["total decode tokens/s", "time to first token p99 (ms)"], strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
