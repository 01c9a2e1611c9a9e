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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.decode.session import DecoderSession
from cscompile.decode.tokenizer import Tokenizer
from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import machine_info, save_report
from cscompile.metrics import perplexity, reference_corpus
from cscompile.models.zoo import fetch
from cscompile.motifs.build import build_family, family_summary, switching_session
from cscompile.motifs.engine import LayeredEngine, StepStats
from cscompile.motifs.segments import plan_segments
from cscompile.passes.pipeline import analyze

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", type=float, action="append", default=None, help="FFN fractions of the family")
    ap.add_argument("--m", type=int, default=256, help="measurements per layer")
    ap.add_argument("--max-engines", type=int, default=4)
    ap.add_argument(
        "--select", choices=["fraction", "measured"], default="fraction",
        help="family cost: FFN fraction (what bundles use) or measured decode latency",
    )  # fmt: skip
    ap.add_argument("--calib-tokens", type=int, default=6144)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument(
        "--switch-tokens",
        type=int,
        default=1024,
        help="teacher-forced decode steps scored for the switching runtime",
    )
    ap.add_argument("--steps", type=int, default=48, help="decode steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--int4", type=Path, default=None, help="a `cscompile quantize` output directory")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "motifs.json")
    args = ap.parse_args(argv)
    targets = args.target or [0.9, 0.75, 0.5]

    art = fetch(args.model)
    onnx_path = art.directory / "model.onnx"
    ids = np.array(Tokenizer(art.tokenizer_dir).encode(reference_corpus()), np.int64)
    held, calib = ids[: args.ppl_tokens], ids[args.ppl_tokens : args.ppl_tokens + args.calib_tokens]

    t0 = time.time()
    model, um = analyze(onnx_path)
    eng = LayeredEngine(plan_segments(model, um), args.threads)
    del model
    print(f"engine built in {time.time() - t0:.1f} s", file=sys.stderr)
    t0 = time.time()
    fb = build_family(
        eng, calib, m=args.m, targets=targets, max_engines=args.max_engines, profile_steps=16, select=args.select,
        progress=lambda msg: print(f"family: {msg}", file=sys.stderr),
    )  # fmt: skip
    family_s = time.time() - t0
    inter = eng.intermediate
    members = fb.family.members
    motifs = [mb.motif(inter, fb.predictors) for mb in members]
    switching = switching_session(eng, fb.family, fb.predictors, fb.controller)

    # -- quality (held-out text) ---------------------------------------------------------
    dense = DecoderSession(onnx_path, args.threads, spinning=False)
    rows: dict[str, dict] = {}
    dense_logits = lambda x: dense.forward(x, dense.new_state())  # noqa: E731
    rows["dense ORT fp32"] = {"perplexity": _ppl(dense_logits, held)}
    eng.sparse_prefill = True
    for mo in motifs:
        rows[f"motif {mo.name}"] = {
            "perplexity": _ppl(lambda x, mo=mo: eng.forward(x, eng.new_state(), mo), held),
            "executed_fraction": mo.executed_fraction(inter),
        }
        print(f"{mo.name}: ppl {rows[f'motif {mo.name}']['perplexity']:.3f}", file=sys.stderr)
    eng.sparse_prefill = False
    int4 = None
    if args.int4:
        int4 = DecoderSession(args.int4 / "model.onnx", args.threads, spinning=False)
        rows["dense ORT int4 (exact, fused)"] = {
            "perplexity": _ppl(lambda x: int4.forward(x, int4.new_state()), held)
        }
    sw_tokens = held[: args.switch_tokens]
    sw_nll, sw_stats = _decode_nll(switching, sw_tokens)
    dense_nll, _ = _decode_nll(dense, sw_tokens)
    rows["switching runtime"] = {
        "perplexity": float(np.exp(sw_nll)),
        "perplexity_dense_same_tokens": float(np.exp(dense_nll)),
        "executed_fraction": sw_stats["executed_fraction"],
        "controller": sw_stats,
    }
    print(
        f"switching: ppl {np.exp(sw_nll):.3f} (dense {np.exp(dense_nll):.3f} on the same steps)",
        file=sys.stderr,
    )

    # -- decode speed (teacher-forced, interleaved rounds) -------------------------------
    prompt, cont = held[None, :64], held[64 : 64 + args.steps]
    variants: list[tuple[str, Any, Any]] = [("dense ORT fp32", dense, None)]
    if int4 is not None:
        variants.append(("dense ORT int4 (exact, fused)", int4, None))
    variants += [(f"motif {mo.name}", eng, mo) for mo in motifs]
    variants.append(("switching runtime", switching, None))
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    stats = {mo.name: StepStats() for mo in motifs}
    for r in range(args.rounds):
        for name, runner, motif in variants if r % 2 == 0 else variants[::-1]:
            st = runner.new_state()
            runner.forward(prompt, st)
            for t in cont:
                a = time.perf_counter()
                if motif is not None:
                    runner.forward(np.array([[t]]), st, motif, stats[motif.name] if r else None)
                else:
                    runner.forward(np.array([[t]]), st)
                times[name].append(time.perf_counter() - a)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    base = float(np.median(times["dense ORT fp32"]))
    for name, ts in times.items():
        ms = float(np.median(ts)) * 1e3
        rows[name].update(decode_ms=ms, speedup_vs_dense_fp32=base * 1e3 / ms)
    steps = (args.rounds - 1) * args.steps
    for mo in motifs:
        s = stats[mo.name]
        rows[f"motif {mo.name}"].update(ort_ms=s.ort_s / steps * 1e3, ffn_ms=s.ffn_s / steps * 1e3)
    sensing = _sensing_cost(eng, fb.predictors, targets)
    rss = _rss_children(onnx_path, args.threads)
    dense_ppl = rows["dense ORT fp32"]["perplexity"]
    for row in rows.values():
        ref = row.get("perplexity_dense_same_tokens", dense_ppl)
        row["ppl_vs_dense"] = row["perplexity"] / ref - 1
    report = {
        "command": "python tools/bench_motifs.py" + (f" --int4 {args.int4}" if args.int4 else ""),
        "machine": machine_info(),
        "threads": args.threads,
        "m": args.m,
        "calib_tokens": len(calib),
        "family_build_seconds": family_s,
        "family_candidates": family_summary(fb),
        "controller": fb.controller.to_dict(),
        "ppl_tokens": len(held),
        "switch_tokens": len(sw_tokens),
        "decode_steps": steps,
        "sensing_recovery_us_per_layer": sensing,
        "rss_mb": rss,
        "results": rows,
    }
    save_report(report, args.out, to_markdown, lambda p: _plot(rows, p))
    return 0


def _decode_nll(session: Any, tokens: np.ndarray, window: int = 512) -> tuple[float, dict]:
    """Mean NLL of ``tokens`` scored one decode step at a time (windows of ``window``)."""
    total, count = 0.0, 0
    summary: dict = {}
    for b in range(0, len(tokens) - 1, window):
        chunk = tokens[b : b + window]
        st = session.new_state()
        logits = session.forward(chunk[None, :1], st)[0, -1]
        for t in range(1, len(chunk)):
            z = logits.astype(np.float64) - logits.max()
            total -= z[chunk[t]] - np.log(np.exp(z).sum())
            count += 1
            logits = session.forward(chunk[None, t : t + 1], st)[0, -1]
        if hasattr(st, "stats"):
            summary = st.stats.summary()
    return total / max(1, count), summary


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
        out[f"{d:.0%}"] = max(0.0, (float(np.median(a_t)) - float(np.median(b_t))) * 1e6)
    return out


_RSS_CHILD = """
import sys, numpy as np, psutil
from pathlib import Path
kind, path, threads = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
if kind == "dense":
    from cscompile.decode.session import DecoderSession
    s = DecoderSession(path, threads); st = s.new_state(); s.forward(np.array([[1, 2, 3]]), st)
else:
    from cscompile.passes.pipeline import analyze
    from cscompile.motifs.engine import LayeredEngine
    from cscompile.motifs.segments import plan_segments
    m, um = analyze(path); e = LayeredEngine(plan_segments(m, um), threads); del m, um
    st = e.new_state(); e.forward(np.array([[1, 2, 3]]), st)
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
        "| variant | FFN executed | perplexity | vs dense | decode ms/token | vs dense fp32 | ORT ms | FFN ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        frac = f"{r['executed_fraction']:.0%}" if "executed_fraction" in r else "100%"
        ort_ms = f"{r['ort_ms']:.2f}" if "ort_ms" in r else "—"
        ffn_ms = f"{r['ffn_ms']:.2f}" if "ffn_ms" in r else "—"
        lines.append(
            f"| {name} | {frac} | {r['perplexity']:.3f} | {r['ppl_vs_dense']:+.1%} | {r['decode_ms']:.2f} | "
            f"{r['speedup_vs_dense_fp32']:.2f}× | {ort_ms} | {ffn_ms} |"
        )
    rss = report["rss_mb"]
    sw = report["results"]["switching runtime"]
    ctl = sw["controller"]
    sens = ", ".join(f"{k}: {v:.0f} µs" for k, v in report["sensing_recovery_us_per_layer"].items())
    lines += [
        "",
        f"Switching runtime over {report['switch_tokens']} teacher-forced decode steps: motif histogram "
        f"{ctl.get('motif_histogram')}, {ctl.get('fallbacks', 0)} fallbacks, {ctl.get('switches', 0)} switches, "
        f"control {ctl.get('control_ms_per_step', 0):.3f} ms/step; its perplexity is compared with dense on the same steps "
        f"({sw['perplexity_dense_same_tokens']:.3f}).",
        f"Sensing + recovery per layer (sensed call minus a plain call on the same channels): {sens}.",
        f"RSS after load: dense {rss['dense']:.0f} MB, engine {rss['engine']:.0f} MB ({rss['engine'] / rss['dense']:.2f}×). "
        f"m = {report['m']}; family built from {report['calib_tokens']} calibration tokens in "
        f"{report['family_build_seconds']:.0f} s; perplexity over {report['ppl_tokens']} held-out tokens; "
        f"{report['decode_steps']} timed decode steps per variant; {report['threads']} threads. "
        f"{report['machine']['date']}, {report['machine']['processor']}.",
    ]
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
