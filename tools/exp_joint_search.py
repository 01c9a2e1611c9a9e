"""Joint depth × precision search on SmolLM2 against the sequential baseline and llama.cpp (issue 8).

1. Quality proxy: ΔNLL of each per-layer choice alone (PyTorch, calibration tokens after the
   held-out text).
2. Latency table: real engines built here for probe configurations, decode ms measured (each
   engine in its own worker process, one at a time, interleaved rounds), least-squares fit.
3. Fronts: joint (per-layer choice) and sequential (one precision model-wide, then depth), exact
   under the proxy and the table.
4. Chosen points at latency budgets: built, measured side by side with llama.cpp on the source
   GGUF (when installed), perplexity on the held-out tokens.

    python tools/exp_joint_search.py            # about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.decode.tokenizer import Tokenizer
from cscompile.evaluation.report import machine_info, save_report
from cscompile.evaluation.search_report import matched_latency, matched_summary, plot
from cscompile.metrics import reference_corpus
from cscompile.models.zoo import fetch
from cscompile.search.joint import (
    EXACT,
    Config,
    LatencyTable,
    Option,
    QualityTable,
    assemble,
    at_budget,
    pareto_front,
    probe_configs,
    sequential_front,
)

ROOT = Path(__file__).resolve().parents[1]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(engines: dict[str, Path], prompt: list[int], steps: int, rounds: int, threads: int,
            gguf: Path | None, held: list[int] | None, work: Path) -> dict[str, dict[str, float]]:  # fmt: skip
    """Decode ms/token (median over rounds × steps) and, with ``held``, perplexity; one worker each."""
    from cscompile.evaluation.peers import SPEC_BY_KEY, Worker, missing_modules

    cfg = {"threads": threads, "n_ctx": len(prompt) + steps + 64}
    workers: dict[str, Worker] = {}
    for name, path in engines.items():
        w = Worker("ort-dense", {**cfg, "onnx": str(path / "model.onnx")}, work / f"{name}.log")
        if not w.hello.get("ready"):
            raise RuntimeError(f"{name}: {w.hello.get('error')}")
        w.pause()
        workers[name] = w
    if gguf is not None and not missing_modules(SPEC_BY_KEY["llama.cpp"]):
        w = Worker("llama.cpp", {**cfg, "gguf": str(gguf)}, work / "llama.cpp.log")
        if w.hello.get("ready"):
            w.pause()
            workers["llama.cpp"] = w
        else:
            say(f"llama.cpp did not load: {w.hello.get('error')}")
    try:
        names = list(workers)
        steps_ms: dict[str, list[float]] = {n: [] for n in names}
        for n in names:
            workers[n].call(op="generate", ids=prompt, n=4)  # warm-up
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                reply = workers[n].call(op="generate", ids=prompt, n=steps + 1)
                if "error" in reply:
                    raise RuntimeError(f"{n}: {reply['error']}")
                steps_ms[n] += reply["decode_ms"]
        out = {n: {"decode_ms": float(np.median(steps_ms[n]))} for n in names}
        if held is not None:
            for n in names:
                reply = workers[n].call(op="nll", ids=held, window=512)
                out[n]["perplexity"] = float(np.exp(reply["nll"] / reply["count"]))
        return out
    finally:
        for w in workers.values():
            w.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--held-tokens", type=int, default=4096)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--budgets", default="1.0,0.95,0.9,0.85,0.8,0.75,0.7,0.65,0.6",
                    help="fractions of the all-exact latency")  # fmt: skip
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "joint")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "joint_search.json")
    ap.add_argument("--keep-engines", action="store_true")
    ap.add_argument(
        "--reuse-probes", action="store_true", help="time the probe engines left by an earlier run"
    )
    ap.add_argument("--refine", type=int, default=6,
                    help="evaluate the N best predicted points per budget as whole configs (0 = trust the proxy)")  # fmt: skip
    args = ap.parse_args(argv)

    art = fetch("smollm2")
    gguf = art.directory / "source" / Path(art.manifest["source"]["gguf"]).name
    tok = Tokenizer(art.tokenizer_dir)
    ids = tok.encode(reference_corpus())
    held = ids[: args.held_tokens]
    calib = np.asarray(ids[8192 : 8192 + args.calib_tokens], np.int64)  # after the held-out text
    prompt = ids[20000:20064]
    args.work.mkdir(parents=True, exist_ok=True)
    n_layers = int(art.manifest["export"]["config"]["num_layers"])

    # 1. quality proxy
    from cscompile.search.joint import measure_quality

    t0 = time.perf_counter()
    cached = args.work / f"quality-kl-{len(calib)}.json"  # reused by reruns (same tokens, same model)
    if cached.is_file():
        q = json.loads(cached.read_text())
        quality = QualityTable(q["base_nll"], q["delta_nll"], q["head_int4_rtn"])
        say(f"quality proxy: reused {cached}")
    else:
        say(f"quality proxy: {n_layers} layers × 4 choices on {len(calib)} calibration tokens")
        quality = measure_quality(art.hf_dir, calib, threads=args.threads,
                                  progress=lambda i, n: say(f"  {i}/{n}") if i % 20 == 0 else None)  # fmt: skip
        cached.write_text(json.dumps(quality.to_dict()))
    quality_s = time.perf_counter() - t0

    # 2. latency table from real engines
    probes = probe_configs(n_layers)
    engines: dict[str, Path] = {}
    t0 = time.perf_counter()
    for k, cfg in enumerate(probes):
        d = args.work / f"probe-{k}"
        if d.exists() and not args.reuse_probes:  # engines from older code would time older graphs
            shutil.rmtree(d)
        if not (d / "model.onnx").is_file():
            say(f"building probe engine {k + 1}/{len(probes)}")
            assemble(art.directory, cfg, d, gguf)
        engines[f"probe-{k}"] = d
    build_s = time.perf_counter() - t0
    say("measuring probe engines")
    probe_ms = measure(engines, prompt, args.steps, args.rounds, args.threads, None, None, args.work)
    latency = LatencyTable.fit(probes, [probe_ms[f"probe-{k}"]["decode_ms"] for k in range(len(probes))])
    say(f"latency table {latency.coef} residuals {np.round(latency.residual_ms, 3).tolist()}")

    # 3. fronts
    joint = pareto_front(quality, latency, n_layers)
    seq = sequential_front(quality, latency, n_layers)
    full = Config((Option("keep", EXACT, EXACT),) * n_layers)
    full_ms = latency.predict(full)

    # 4. chosen points, built and measured with llama.cpp
    chosen: dict[str, Any] = {}
    tv = None
    if args.refine:
        from cscompile.search.joint import TorchVariants, refine

        say(f"refining: the {args.refine} best predicted points per budget, evaluated whole in PyTorch")
        tv = TorchVariants(art.hf_dir, calib, threads=args.threads)
    for frac in [float(x) for x in args.budgets.split(",")]:
        for kind, front in (("joint", joint), ("sequential", seq)):
            p = (
                refine(front, full_ms * frac, tv, args.refine)
                if tv is not None
                else at_budget(front, full_ms * frac)
            )
            if p is not None:
                key = json.dumps(p.config.describe(), sort_keys=True)
                chosen.setdefault(key, {"point": p, "labels": []})["labels"].append(f"{kind} {frac:.0%}")
    tv = None  # free the PyTorch model before anything is timed
    engines = {}
    for i, (_key, item) in enumerate(chosen.items()):
        d = args.work / f"point-{i}"
        if d.exists():
            shutil.rmtree(d)
        say(f"building point {i + 1}/{len(chosen)}: {', '.join(item['labels'])}")
        assemble(art.directory, item["point"].config, d, gguf)
        engines[f"point-{i}"] = d
    say("measuring the chosen points (and llama.cpp) side by side")
    measured = measure(engines, prompt, args.steps, args.rounds, args.threads, gguf, held, args.work)
    base_ppl = float(np.exp(quality.base_nll))
    rows = []
    for i, (_key, item) in enumerate(chosen.items()):
        p, m = item["point"], measured[f"point-{i}"]
        rows.append({"labels": item["labels"], **p.to_dict(), "decode_ms": m["decode_ms"],
                     "perplexity": m["perplexity"]})  # fmt: skip
    report = {
        "matched": matched_latency(rows),
        "command": "python tools/exp_joint_search.py"
        + (f" --refine {args.refine}" if args.refine != 6 else ""),
        "refine": args.refine,
        "machine": machine_info(),
        "threads": args.threads,
        "held_tokens": len(held),
        "calib_tokens": int(len(calib)),
        "seconds": {"quality_proxy": quality_s, "probe_builds": build_s},
        "quality": quality.to_dict(),
        "calib_base_ppl": base_ppl,
        "latency": latency.to_dict(),
        "probes": [
            {"config": c.describe(), **probe_ms[f"probe-{k}"], "pred_ms": latency.predict(c)}
            for k, c in enumerate(probes)
        ],  # fmt: skip
        "front_joint": [p.to_dict() for p in joint],
        "front_sequential": [p.to_dict() for p in seq],
        "points": rows,
        "llama_cpp": measured.get("llama.cpp"),
    }
    if not args.keep_engines:
        for d in list(args.work.glob("point-*")):
            shutil.rmtree(d, ignore_errors=True)
    save_report(report, args.out, to_markdown, lambda path: plot(report, path))
    return 0


def to_markdown(report: dict[str, Any]) -> str:
    lat = report["latency"]["coef_ms"]
    lines = [
        "Latency table (ms/token, least squares over "
        f"{len(report['probes'])} probe engines; residuals "
        f"{', '.join(f'{r:+.2f}' for r in report['latency']['residual_ms'])} ms): "
        + ", ".join(f"{k} {v:.3f}" for k, v in lat.items()),
        "",
        "| point | layers kept / FFNs kept / RTN units | head | predicted ms | measured ms | predicted ΔNLL "
        "| perplexity (held-out) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(report["points"], key=lambda r: r["latency_ms_pred"], reverse=True):
        layers = r["layers"]
        kept = sum(n != "drop" for n in layers)
        ffn = sum("ffn=exact" in n or "ffn=rtn" in n for n in layers)
        rtn = sum(n.count("rtn") for n in layers)
        lines.append(
            f"| {'; '.join(r['labels'])} | {kept} / {ffn} / {rtn} | {r['head']} | {r['latency_ms_pred']:.2f} | "
            f"{r['decode_ms']:.2f} | {r['delta_nll_pred']:.4f} | {r['perplexity']:.3f} |"
        )
    ll = report.get("llama_cpp")
    if ll:
        lines.append(
            f"| llama.cpp (Q4_1 GGUF) | 30 / 30 / – | Q8_0 | – | {ll['decode_ms']:.2f} | – | {ll['perplexity']:.3f} |"
        )
    summary = matched_summary(report.get("matched", []))
    if summary:
        lines.append("\n" + summary)
    m = report["machine"]
    lines.append(
        f"\n{report['threads']} threads; decode = median step over rounds × steps after a 64-token prompt, each engine "
        f"in its own process, one at a time; perplexity over {report['held_tokens']} held-out tokens (windows of 512). "
        f"{m['date']}, {m['processor']}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
