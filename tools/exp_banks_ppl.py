"""Perplexity with task-conditioned predictor banks vs one universal predictor set (SmolLM2).

The shipped prompts (5 families × 10, chat template): prompts 0–7 of each family fit — the
universal predictors on all of them, one bank per k-means cluster of their mean layer-0 FFN
input (the runtime's `--motif-banks`); prompts 8–9 are scored. Every test prompt is scored in
the engine's evaluation mode (each position runs exactly the channels a decode step would), with
the universal set and with the bank its prefill selects, at uniform FFN fractions.

    python tools/exp_banks_ppl.py          # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cscompile.data.prompts import load_prompts
from cscompile.decode.tokenizer import Tokenizer
from cscompile.evaluation.report import machine_info, save_report
from cscompile.models.zoo import fetch
from cscompile.motifs.build import fit_banks, prompt_features
from cscompile.motifs.engine import LayeredEngine, Motif, fit_predictors
from cscompile.motifs.segments import plan_segments
from cscompile.passes.pipeline import analyze
from cscompile.recovery.banks import BankSelector

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("code", "math", "summarization", "dialogue", "retrieval")


def nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    z = logits[:-1].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-lp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--banks", type=int, default=5)
    ap.add_argument("--fracs", type=float, nargs="+", default=[0.9, 0.75, 0.5])
    ap.add_argument("--max-prompt-tokens", type=int, default=768)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "banks_ppl.json")
    args = ap.parse_args(argv)

    art = fetch(args.model)
    tok = Tokenizer(art.tokenizer_dir)
    model, um = analyze(art.directory / "model.onnx")
    eng = LayeredEngine(plan_segments(model, um), args.threads)
    del model
    fit, test = [], []
    for fam in FAMILIES:
        for i, p in enumerate(load_prompts(families=[fam])):
            ids = np.array(tok.encode(tok.apply_chat_template(p.messages)), np.int64)[
                : args.max_prompt_tokens
            ]
            (fit if i < 8 else test).append(ids)
    universal = fit_predictors(eng, np.concatenate(fit), m=args.m)
    centroids, banks = fit_banks(eng, fit, args.banks, m=args.m)
    selector = BankSelector(centroids)
    chosen = [selector.choose(f) for f in prompt_features(eng, test)]
    inter = eng.intermediate
    eng.sparse_prefill = True
    totals: dict[str, list[float]] = {}

    def score(name: str, motif: Motif | None, ids: np.ndarray) -> None:
        t = totals.setdefault(name, [0.0, 0])
        a, b = nll(eng.forward(ids[None], eng.new_state(), motif)[0], ids)
        t[0] += a
        t[1] += b

    for ids, bank in zip(test, chosen):
        score("dense", None, ids)
        for frac in args.fracs:
            k = [round(frac * inter)] * eng.num_layers
            score(f"{frac:.0%} universal", Motif("u", k, universal), ids)
            score(f"{frac:.0%} bank", Motif("b", k, banks[bank]), ids)
    eng.sparse_prefill = False
    ppl = {name: float(np.exp(t[0] / t[1])) for name, t in totals.items()}
    report = {
        "command": "python tools/exp_banks_ppl.py",
        "machine": machine_info(),
        "m": args.m,
        "banks": args.banks,
        "test_prompts": len(test),
        "test_tokens": int(totals["dense"][1]),
        "bank_of_test_prompt": chosen,
        "perplexity": ppl,
    }
    save_report(report, args.out, to_markdown)
    return 0


def to_markdown(report: dict) -> str:
    p = report["perplexity"]
    d = p["dense"]
    lines = ["| FFN executed | universal predictors | task-conditioned bank |", "|---|---|---|"]
    for key in [k for k in p if k.endswith("universal")]:
        frac = key.split(" ")[0]
        u, b = p[key], p[f"{frac} bank"]
        lines.append(f"| {frac} | {u:.3f} ({u / d - 1:+.1%}) | {b:.3f} ({b / d - 1:+.1%}) |")
    lines.append(
        f"\nDense {d:.3f} over {report['test_tokens']} tokens of {report['test_prompts']} held-out prompts; "
        f"m = {report['m']}, {report['banks']} banks. {report['machine']['date']}, {report['machine']['processor']}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
