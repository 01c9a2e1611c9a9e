"""Per-layer density allocation vs uniform density, at equal executed FFN fraction.

Calibration text (disjoint from the scored text) gives the predictors, the per-layer error
curves and the per-layer perplexity sensitivity; the allocation then picks densities per
layer for each target fraction. Scored on held-out reference text with the engine's
evaluation mode (each position runs exactly what a decode step would).

    python tools/exp_motif_family.py          # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from cscompile.decode.tokenizer import Tokenizer
from cscompile.evaluation.plotting import pyplot
from cscompile.evaluation.report import machine_info, save_report
from cscompile.metrics import perplexity, reference_corpus
from cscompile.models.zoo import fetch
from cscompile.motifs.engine import LayeredEngine, Motif, fit_predictors
from cscompile.motifs.family import LEVELS, FamilyMember, allocate, error_curves, sensitivities
from cscompile.motifs.segments import plan_segments
from cscompile.passes.pipeline import analyze

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--target", type=float, action="append", default=None)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--sens-tokens", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "motif_family.json")
    args = ap.parse_args(argv)
    targets = args.target or [0.9, 0.75, 0.5]

    art = fetch(args.model)
    ids = np.array(Tokenizer(art.tokenizer_dir).encode(reference_corpus()), np.int64)
    held = ids[: args.eval_tokens]
    calib = ids[args.eval_tokens : args.eval_tokens + args.calib_tokens]
    sens_ids = ids[
        args.eval_tokens + args.calib_tokens : args.eval_tokens + args.calib_tokens + args.sens_tokens
    ]
    model, um = analyze(art.directory / "model.onnx")
    eng = LayeredEngine(plan_segments(model, um), args.threads)
    del model
    t0 = time.time()
    preds = fit_predictors(eng, calib, m=args.m)
    curves = error_curves(eng, preds, calib)
    eng.sparse_prefill = True

    def score(motif: Motif, text: np.ndarray = sens_ids) -> float:
        return perplexity(lambda x: eng.forward(x, eng.new_state(), motif), text).perplexity

    def logits(motif: Motif) -> np.ndarray:
        return np.concatenate(
            [
                eng.forward(sens_ids[None, i : i + 512], eng.new_state(), motif)[0]
                for i in range(0, len(sens_ids), 512)
            ]
        )

    sens = sensitivities(
        logits, eng, preds, progress=lambda i, n: print(f"sensitivity {i}/{n}", file=sys.stderr, end="\r")
    )
    calib_s = time.time() - t0
    inter = eng.intermediate
    rows = [
        {
            "policy": "dense",
            "fraction": 1.0,
            "perplexity": score(Motif("dense", [None] * eng.num_layers), held),
        }
    ]
    allocations = {}
    for t in targets:
        uni = FamilyMember(f"uniform {t:.0%}", [t] * eng.num_layers)
        dens = allocate(curves, sens, LEVELS, t)
        alloc = FamilyMember(f"allocated {t:.0%}", dens)
        allocations[f"{t:.2f}"] = dens
        for mb, kind in ((uni, "uniform"), (alloc, "allocated")):
            motif = mb.motif(inter, preds)
            ppl = score(motif, held)
            rows.append(
                {"policy": kind, "fraction": motif.executed_fraction(inter), "target": t, "perplexity": ppl}
            )
            print(f"{mb.name}: {ppl:.3f}", file=sys.stderr)
    dense_ppl = rows[0]["perplexity"]
    for r in rows:
        r["vs_dense"] = r["perplexity"] / dense_ppl - 1
    report = {
        "command": "python tools/exp_motif_family.py",
        "machine": machine_info(),
        "m": args.m,
        "calibration_seconds": calib_s,
        "eval_tokens": len(held),
        "calib_tokens": len(calib),
        "sens_tokens": len(sens_ids),
        "sensitivity": sens.tolist(),
        "error_curves": {"levels": list(LEVELS), "values": curves.tolist()},
        "allocations": allocations,
        "results": rows,
    }
    save_report(report, args.out, to_markdown, lambda p: _plot(report, p))
    return 0


def to_markdown(report: dict) -> str:
    lines = ["| policy | target | FFN executed | perplexity | vs dense |", "|---|---|---|---|---|"]
    for r in report["results"]:
        t = f"{r['target']:.0%}" if "target" in r else "—"
        lines.append(
            f"| {r['policy']} | {t} | {r['fraction']:.1%} | {r['perplexity']:.3f} | {r['vs_dense']:+.1%} |"
        )
    lines.append(
        f"\nm = {report['m']}; predictors, error curves and sensitivities from {report['calib_tokens']} + "
        f"{report['sens_tokens']} calibration tokens ({report['calibration_seconds']:.0f} s); perplexity over "
        f"{report['eval_tokens']} held-out tokens. {report['machine']['date']}, {report['machine']['processor']}."
    )
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    sens = np.array(report["sensitivity"])
    a1.bar(range(len(sens)), sens)
    a1.set_xlabel("layer")
    a1.set_ylabel("KL from dense, this layer alone at 50%")
    a1.set_title("Layer sensitivity (calibration)")
    for t, dens in report["allocations"].items():
        a2.plot(range(len(dens)), dens, marker="o", label=f"target {float(t):.0%}")
    a2.set_xlabel("layer")
    a2.set_ylabel("allocated FFN density")
    a2.set_title("Per-layer density allocation")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
