"""Joint width × depth × precision search on the native decode step, against the sequential
baseline (issue 8). Space and method: ``cscompile/search/native_search.py``.

1. Ranking and quality proxy (PyTorch, calibration tokens after the held-out text): each unit
   (heads kept, FFN blocks kept, Q8_0 attention / FFN, layer dropped) applied to one layer alone,
   KL to the dense model; the 4-bit LM head (rounded by GPTQ on the same tokens).
2. Latency table: native engines derived from the source grid for probe configurations, decode
   ms measured side by side in this process (interleaved rounds), least squares.
3. Fronts: joint (precision per layer and unit type), sequential (one precision model-wide,
   then width and depth) and depth-only (joint without width: attention / FFN kept or dropped
   whole), exact under the proxy and the table; at each latency budget the best predicted
   points are evaluated whole in PyTorch and the best kept.
4. The kept points: derived, timed side by side with the dense native engine, perplexity on the
   held-out tokens through the native engine itself.

    python tools/exp_native_search.py   # ~30 min on 2 cores the first time, ~13 with the proxy cached
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.decode.tokenizer import Tokenizer
from cscompile.evaluation.report import machine_info, save_report
from cscompile.evaluation.search_report import matched_latency, matched_summary, plot
from cscompile.metrics import perplexity, reference_corpus
from cscompile.models.zoo import fetch
from cscompile.native.engine import NativeSession, pack, weights_from_model
from cscompile.native.points import NativeConfig, Ranking, Shape, choices, dense_config, derive_config
from cscompile.search.artifact import measure_latencies
from cscompile.search.joint import refine
from cscompile.search.native_search import (
    NativeLatencyTable,
    NativeQualityTable,
    NativeVariants,
    pareto_front,
    probe_configs,
    quality_table,
    sequential_front,
)

ROOT = Path(__file__).resolve().parents[1]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--held-tokens", type=int, default=4096)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--budgets", default="1.0,0.95,0.9,0.85,0.8,0.75,0.7,0.6,0.5",
                    help="fractions of the dense native engine's predicted latency")  # fmt: skip
    ap.add_argument("--refine", type=int, default=6,
                    help="evaluate the N best predicted points per budget whole (0 = trust the proxy)")  # fmt: skip
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "native-search")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "native_search.json")
    args = ap.parse_args(argv)

    art = fetch("smollm2")
    tok = Tokenizer(art.tokenizer_dir)
    ids = tok.encode(reference_corpus())
    held = np.asarray(ids[: args.held_tokens], np.int64)
    calib = np.asarray(ids[8192 : 8192 + args.calib_tokens], np.int64)  # after the held-out text
    args.work.mkdir(parents=True, exist_ok=True)
    say("native weights (the source GGUF grid)")
    base = weights_from_model(art.directory / "model.onnx")
    shape = Shape.of(base.config)
    dense = dense_config(shape)

    # 1. ranking and quality proxy (cached: same tokens, same model)
    t0 = time.perf_counter()
    cached = args.work / f"quality-{len(calib)}-gptq-head.json"
    tv: NativeVariants | None = None
    if cached.is_file():
        q = json.loads(cached.read_text())
        quality, ranking = NativeQualityTable.from_dict(q["quality"]), Ranking(**q["ranking"])
        say(f"quality proxy: reused {cached}")
    else:
        tv = NativeVariants(art.hf_dir, calib, threads=args.threads)
        ranking = tv.ranking
        say(f"quality proxy: {shape.n_layers} layers × units on {len(calib)} calibration tokens")
        quality = quality_table(tv, lambda i, n: say(f"  {i}/{n}") if i % 30 == 0 else None)
        cached.write_text(json.dumps({"quality": quality.to_dict(), "ranking": ranking.to_dict()}))
    quality_s = time.perf_counter() - t0

    # 2. latency table from native engines (nothing else running; on a first run PyTorch is loaded
    #    but idle)
    probes = probe_configs(shape)
    say(f"latency table: {len(probes)} probe engines, {args.rounds} interleaved rounds")
    sessions = {f"probe-{k}": NativeSession(derive_config(base, c, ranking), args.threads, 1024)
                for k, c in enumerate(probes)}  # fmt: skip
    probe_ms = measure_latencies(sessions, args.threads, args.rounds, args.steps, prompt=64)
    del sessions
    latency = NativeLatencyTable.fit(probes, [probe_ms[f"probe-{k}"] for k in range(len(probes))])
    say(f"latency table {latency.coef} residuals {np.round(latency.residual_ms, 3).tolist()}")

    # 3. fronts, refined whole at each budget
    joint = pareto_front(quality, latency)
    seq = sequential_front(quality, latency)
    # joint without width: whole attention / FFN kept or dropped (depth × precision only)
    depth = pareto_front(quality, latency, [c for c in choices(shape)
                                            if c.heads in (0, shape.n_heads) and c.blocks in (0, shape.ffn_blocks)])  # fmt: skip
    full_ms = latency.predict(dense)
    chosen: dict[str, Any] = {}
    if tv is None:  # refinement and the GPTQ head need the PyTorch model (loaded after the timing)
        tv = NativeVariants(art.hf_dir, calib, threads=args.threads)
    for frac in [float(x) for x in args.budgets.split(",")]:
        for kind, front in (("joint", joint), ("sequential", seq), ("depth-only", depth)):
            say(f"budget {frac:.0%}: {kind}")
            p = refine(front, full_ms * frac, tv, args.refine) if args.refine else _at(front, full_ms * frac)
            if p is not None:
                key = json.dumps(p.config.describe(), sort_keys=True)
                chosen.setdefault(key, {"point": p, "labels": []})["labels"].append(f"{kind} {frac:.0%}")
    head = pack(tv.head_grid)  # the 4-bit LM head (GPTQ on the proxy tokens) of head_bits=4 points
    tv = None
    gc.collect()

    # 4. the kept points, derived and measured side by side; held-out perplexity on the engine
    say(f"measuring {len(chosen)} points side by side")
    points = {
        f"point-{i}": derive_config(base, item["point"].config, ranking, head)
        for i, item in enumerate(chosen.values())
    }
    sessions = {n: NativeSession(w, args.threads, 1024) for n, w in points.items()}
    ms = measure_latencies(sessions, args.threads, args.rounds, args.steps, prompt=64)
    rows = []
    for i, item in enumerate(chosen.values()):
        s = sessions[f"point-{i}"]
        ppl = perplexity(lambda x, s=s: s.forward(x, s.new_state()), held, 512, 512).perplexity
        p = item["point"]
        rows.append({"labels": item["labels"], **p.to_dict(), "decode_ms": ms[f"point-{i}"], "perplexity": ppl,
                     "weights_mb": points[f"point-{i}"].nbytes / 1e6})  # fmt: skip
        say(f"  {', '.join(item['labels'])}: {ms[f'point-{i}']:.3f} ms, perplexity {ppl:.3f}")
    report = {
        "command": "python tools/exp_native_search.py",
        "machine": machine_info(),
        "threads": args.threads,
        "held_tokens": len(held),
        "calib_tokens": len(calib),
        "seconds": {"quality_proxy": quality_s},
        "quality": quality.to_dict(),
        "ranking": ranking.to_dict(),
        "latency": latency.to_dict(),
        "probes": [
            {"config": c.describe(), "decode_ms": probe_ms[f"probe-{k}"], "pred_ms": latency.predict(c)}
            for k, c in enumerate(probes)
        ],  # fmt: skip
        "front_joint": [p.to_dict() for p in joint],
        "front_sequential": [p.to_dict() for p in seq],
        "front_depth_only": [p.to_dict() for p in depth],
        "points": rows,
        "matched": matched_latency(rows),
        "matched_depth": matched_latency(rows, "depth-only"),
    }
    save_report(report, args.out, to_markdown, lambda path: plot(report, path))
    return 0


def _at(front: list[Any], budget: float) -> Any:
    ok = [p for p in front if p.latency_ms <= budget + 1e-9]
    return min(ok, key=lambda p: p.delta_nll) if ok else None


def summarize(layers: list[str]) -> str:
    """heads kept / FFN blocks kept / layers dropped / 8-bit units, over the model."""
    n = NativeConfig.from_dict({"layers": layers}).counts()
    return f"{n['heads']} / {n['blocks']} / {n['dropped']} / {n['q8']}"


def to_markdown(report: dict[str, Any]) -> str:
    lat = report["latency"]["coef_ms"]
    shape = report["quality"]["shape"]
    lines = [
        f"Latency table (ms/token, least squares over {len(report['probes'])} probe engines; residuals "
        f"{', '.join(f'{r:+.3f}' for r in report['latency']['residual_ms'])} ms): "
        + ", ".join(f"{k} {v:.4f}" for k, v in lat.items()),
        "",
        f"| point | heads kept (of {shape[0] * shape[1]}) / FFN blocks kept (of {shape[0] * shape[2]}) / layers "
        "dropped / 8-bit units | LM head bits | predicted ms | measured ms | predicted ΣKL | measured KL "
        "(calibration) | perplexity (held-out) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(report["points"], key=lambda r: r["latency_ms_pred"], reverse=True):
        kl = f"{r['kl_measured']:.4f}" if r.get("kl_measured") is not None else "–"
        lines.append(
            f"| {'; '.join(r['labels'])} | {summarize(r['layers'])} | {r['head_bits']} | {r['latency_ms_pred']:.2f} "
            f"| {r['decode_ms']:.2f} | {r['delta_nll_pred']:.4f} | {kl} | {r['perplexity']:.3f} |"
        )
    for baseline in ("sequential", "depth-only"):
        summary = matched_summary(
            report.get("matched", []) if baseline == "sequential" else report.get("matched_depth", []),
            baseline,
        )
        if summary:
            lines.append("\n" + summary)
    m = report["machine"]
    lines.append(
        f"\n{report['threads']} threads; decode = median step over interleaved rounds after a 64-token prompt, "
        f"all engines in one process; perplexity over {report['held_tokens']} held-out tokens (windows of 512) "
        f"through the native engine. {m['date']}, {m['processor']}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
