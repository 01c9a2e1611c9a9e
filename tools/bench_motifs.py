"""Motif engines on a fetched model: decode speed and perplexity, side by side in one process.

Variants: the dense ORT graph (plain fp32; optionally an int4 model directory via --int4), the
layered engine at full density (ORT segments + the C kernel running every channel), and
sensed motifs at each --density (in-kernel sketch y = Φx, m measurements, fitted ridge decoder,
top-k channels per layer and token). Decode steps are teacher-forced on the same text for every
variant, rounds interleaved. Perplexity: the engine's evaluation mode (each position of a
window runs exactly the channels a decode step would), on held-out reference text.

    python tools/bench_motifs.py                      # ~6 minutes on 2 cores
    python tools/bench_motifs.py --int4 out/smollm2-int4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cscompile.compiler.pipeline import analyze
from cscompile.evaluation.perplexity import perplexity, reference_corpus
from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import machine_info
from cscompile.models.zoo import fetch
from cscompile.motifs.engine import LayeredEngine, Motif, StepStats, fit_predictors
from cscompile.motifs.segments import plan_segments
from cscompile.runtime.session import DecoderSession
from cscompile.runtime.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--density", type=float, action="append", default=None)
    ap.add_argument("--m", type=int, default=256, help="measurements per layer")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=48, help="decode steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--int4", type=Path, default=None, help="a `cscompile quantize` output directory")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "motifs.json")
    args = ap.parse_args(argv)
    densities = args.density or [0.9, 0.75, 0.5]

    art = fetch(args.model)
    onnx_path = art.directory / "model.onnx"
    ids = np.array(Tokenizer(art.tokenizer_dir).encode(reference_corpus()), np.int64)
    held, calib = ids[: args.ppl_tokens], ids[args.ppl_tokens : args.ppl_tokens + args.calib_tokens]

    t0 = time.time()
    model, um = analyze(onnx_path)
    plan = plan_segments(model, um)
    del model
    eng = LayeredEngine(plan, args.threads)
    print(f"engine built in {time.time() - t0:.1f} s", file=sys.stderr)
    preds = fit_predictors(eng, calib, m=args.m)
    inter = eng.intermediate
    motifs = [Motif("full", [None] * eng.num_layers)] + [
        Motif(f"sensed {d:.0%}", [round(d * inter)] * eng.num_layers, preds) for d in densities
    ]

    # -- quality ------------------------------------------------------------------------
    dense = DecoderSession(onnx_path, args.threads, spinning=False)
    rows: dict[str, dict] = {}
    rows["dense ORT fp32"] = {"perplexity": _ppl(lambda x: dense.forward(x, dense.new_state()), held)}
    eng.sparse_prefill = True
    for mo in motifs:
        rows[f"engine {mo.name}"] = {
            "perplexity": _ppl(lambda x, mo=mo: eng.forward(x, eng.new_state(), mo), held),
            "executed_fraction": mo.executed_fraction(inter),
        }
        print(f"{mo.name}: ppl {rows[f'engine {mo.name}']['perplexity']:.3f}", file=sys.stderr)
    eng.sparse_prefill = False
    int4 = None
    if args.int4:
        int4 = DecoderSession(args.int4 / "model.onnx", args.threads, spinning=False)
        rows["dense ORT int4 (exact, fused)"] = {
            "perplexity": _ppl(lambda x: int4.forward(x, int4.new_state()), held)
        }

    # -- decode speed (teacher-forced, interleaved rounds) -------------------------------
    prompt, cont = held[None, :64], held[64 : 64 + args.steps]
    runners: dict[str, object] = {"dense ORT fp32": dense}
    if int4 is not None:
        runners["dense ORT int4 (exact, fused)"] = int4
    times: dict[str, list[float]] = {n: [] for n in rows}
    stats = {mo.name: StepStats() for mo in motifs}
    for r in range(args.rounds):
        order = list(runners.items()) + [(f"engine {mo.name}", mo) for mo in motifs]
        if r % 2:
            order = order[::-1]
        for name, obj in order:
            if isinstance(obj, Motif):
                st = eng.new_state()
                eng.forward(prompt, st, obj)
                for t in cont:
                    a = time.perf_counter()
                    eng.forward(np.array([[t]]), st, obj, stats[obj.name] if r else None)
                    times[name].append(time.perf_counter() - a)
            else:
                sess: DecoderSession = obj  # type: ignore[assignment]
                st = sess.new_state()
                sess.forward(prompt, st)
                for t in cont:
                    a = time.perf_counter()
                    sess.forward(np.array([[t]]), st)
                    times[name].append(time.perf_counter() - a)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    base = float(np.median(times["dense ORT fp32"]))
    for name, ts in times.items():
        ms = float(np.median(ts)) * 1e3
        rows[name].update(decode_ms=ms, speedup_vs_dense_fp32=base * 1e3 / ms)
    steps = (args.rounds - 1) * args.steps
    for mo in motifs:
        s = stats[mo.name]
        rows[f"engine {mo.name}"].update(
            ort_ms=s.ort_s / steps * 1e3,
            ffn_ms=s.ffn_s / steps * 1e3,
            recovery_residual_median=float(np.median(s.residuals)) if s.residuals else None,
        )
    sensing = _sensing_cost(eng, preds, densities)
    token_ms = {f"sensed {d:.0%}": rows[f"engine sensed {d:.0%}"]["decode_ms"] for d in densities}
    for key, us in sensing.items():
        rows[f"engine {key}"]["sensing_recovery_ms"] = us * eng.num_layers / 1e3
        rows[f"engine {key}"]["sensing_share_of_token"] = us * eng.num_layers / 1e3 / token_ms[key]
    rss = _rss_children(onnx_path, args.threads)
    dense_ppl = rows["dense ORT fp32"]["perplexity"]
    for row in rows.values():
        row["ppl_vs_dense"] = row["perplexity"] / dense_ppl - 1
    report = {
        "command": "python tools/bench_motifs.py" + (f" --int4 {args.int4}" if args.int4 else ""),
        "machine": machine_info(),
        "threads": args.threads,
        "m": args.m,
        "calib_tokens": len(calib),
        "ppl_tokens": len(held),
        "decode_steps": steps,
        "rss_mb": rss,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _plot(rows, args.out.with_suffix(".png"))
    print(to_markdown(report))
    return 0


def _ppl(score, ids: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    return perplexity(score, ids).perplexity


def _sensing_cost(eng: LayeredEngine, preds, densities) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """µs per layer that sensing + recovery add: the sensed call minus a plain call on the same set."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(eng.hidden).astype(np.float32) * 0.3
    out: dict[str, float] = {}
    f, p = eng.ffn[0], preds[0]
    resid = np.zeros(eng.hidden, np.float32)
    for d in densities:
        k = round(d * eng.intermediate)
        idx, _ = f.sensed_add_to(resid, x, p.phi, p.decoder, p.bias, k)
        idx = idx.copy()
        a_t, b_t = [], []
        for _ in range(300):
            t = time.perf_counter()
            f.sensed_add_to(resid, x, p.phi, p.decoder, p.bias, k)
            a_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            f.add_to(resid, x, idx)
            b_t.append(time.perf_counter() - t)
        out[f"sensed {d:.0%}"] = max(0.0, (float(np.median(a_t)) - float(np.median(b_t))) * 1e6)
    return out


_RSS_CHILD = """
import sys, numpy as np, psutil
from pathlib import Path
kind, path, threads = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
if kind == "dense":
    from cscompile.runtime.session import DecoderSession
    s = DecoderSession(path, threads); st = s.new_state(); s.forward(np.array([[1, 2, 3]]), st)
else:
    from cscompile.compiler.pipeline import analyze
    from cscompile.motifs.engine import LayeredEngine
    from cscompile.motifs.segments import plan_segments
    m, um = analyze(path); plan = plan_segments(m, um); del m, um
    e = LayeredEngine(plan, threads); del plan; st = e.new_state(); e.forward(np.array([[1, 2, 3]]), st)
import gc; gc.collect()
print(psutil.Process().memory_info().rss / 2**20)
"""


def _rss_children(path: Path, threads: int) -> dict[str, float]:
    """Resident MB of a process that loaded only the dense graph, and one with the engine."""
    out = {}
    for kind in ("dense", "engine"):
        res = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, kind, str(path), str(threads)], capture_output=True, text=True
        )
        out[kind] = float(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else float("nan")
    return out


def to_markdown(report: dict) -> str:
    lines = [
        "| variant | FFN executed | perplexity | vs dense | decode ms/token | vs dense fp32 | ORT ms | FFN ms | sensing+recovery ms (share) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        frac = f"{r['executed_fraction']:.0%}" if "executed_fraction" in r else "100%"
        sens = (
            f"{r['sensing_recovery_ms']:.2f} ({r['sensing_share_of_token']:.1%})"
            if "sensing_recovery_ms" in r
            else "—"
        )
        ort_ms = f"{r['ort_ms']:.2f}" if "ort_ms" in r else "—"
        ffn_ms = f"{r['ffn_ms']:.2f}" if "ffn_ms" in r else "—"
        lines.append(
            f"| {name} | {frac} | {r['perplexity']:.3f} | {r['ppl_vs_dense']:+.1%} | {r['decode_ms']:.2f} | "
            f"{r['speedup_vs_dense_fp32']:.2f}× | {ort_ms} | {ffn_ms} | {sens} |"
        )
    rss = report["rss_mb"]
    lines.append(
        f"\nRSS after load: dense {rss['dense']:.0f} MB, engine {rss['engine']:.0f} MB "
        f"({rss['engine'] / rss['dense']:.2f}×). m = {report['m']}, calibration {report['calib_tokens']} tokens, "
        f"perplexity over {report['ppl_tokens']} held-out tokens, {report['decode_steps']} timed decode steps per variant, "
        f"{report['threads']} threads. {report['machine']['date']}, {report['machine']['processor']}."
    )
    return "\n".join(lines)


def _plot(rows: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in rows.items():
        ax.scatter(r["decode_ms"], r["perplexity"], label=name)
    ax.set_xlabel("decode ms/token (lower is better)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Motif engines vs dense (SmolLM2, ORT CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
