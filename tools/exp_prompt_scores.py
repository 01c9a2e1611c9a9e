"""Which token score: question → token attention (shipped) vs LLMLingua's self-information (issue #9).

    python tools/exp_prompt_scores.py [--n 12] [--ratio 0.2] [--layers 4,9]

Self-information ``−log p(x_i | x_<i)`` comes from depth-limited engines (the first L layers + the
LM head, int4 on the source grid, built with :func:`cscompile.search.joint.assemble`); attention
from the bundle's calibrated scorer. The same budget controller selects sentences from either
score. Accuracy on the retrieval and QA eval sets, scorer milliseconds, both sentence orders.
Writes ``benchmarks/results/prompt/scores.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from cscompile.cli.commands.common import resolve_model_dir
    from cscompile.data.longctx import long_context_set
    from cscompile.prompt import PromptBudget, PromptCompressor
    from cscompile.prompt.scorer import SelfInfoScorer
    from cscompile.runtime import GenerationConfig, load
    from cscompile.search.joint import EXACT, Config, Option, assemble

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("out/smollm2-prompt.csb"))
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--layers", default="4,9")
    ap.add_argument("--work", type=Path, default=Path("out/prompt-scores"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prompt"))
    args = ap.parse_args()
    model_dir = resolve_model_dir("smollm2")
    gguf = next((model_dir / "source").glob("*.gguf"), None)
    scorers = {}
    with load(args.bundle, threads=2) as bm:
        n_layers = len(bm.bundle.read_json("unit_map.json")["layers"])
        for L in (int(x) for x in args.layers.split(",")):
            eng = args.work / f"first{L}"
            if not (eng / "model.onnx").exists():
                keep, drop = Option("keep", EXACT, EXACT), Option("drop", None, None)
                assemble(model_dir, Config((keep,) * L + (drop,) * (n_layers - L), "q8"), eng, gguf)
                (eng / "config.json").write_text((model_dir / "config.json").read_text())
            scorers[f"self-info L={L}"] = SelfInfoScorer(eng / "model.onnx", threads=2)
        scorers["attention (bundle)"] = bm.compressor.scorer
        cfg = GenerationConfig(max_new_tokens=32)
        rows = []
        for fam in ("retrieval", "qa"):
            for ex in long_context_set(fam, args.n):
                for name, sc in scorers.items():
                    comp = PromptCompressor(bm.tokenizer, sc)
                    for order in ("original", "relevance"):
                        c = comp.compress(ex.context, ex.question, PromptBudget(ratio=args.ratio, order=order),
                                          ex.instruction)  # fmt: skip
                        res = bm.generate(c.ids, cfg)
                        rows.append({"family": fam, "id": ex.id, "scorer": name, "order": order,
                                     "correct": bool(ex.correct(res.text)), "evidence": ex.evidence[0] in c.text,
                                     "scorer_ms": c.scorer_ms})  # fmt: skip
                print(ex.id, flush=True)
    lines = [
        "| scorer | order | retrieval | QA | evidence kept | scorer ms (mean) |",
        "|---|---|---|---|---|---|",
    ]
    summary = []
    for name in scorers:
        for order in ("original", "relevance"):
            rs = [r for r in rows if r["scorer"] == name and r["order"] == order]
            acc = {
                f: float(np.mean([r["correct"] for r in rs if r["family"] == f])) for f in ("retrieval", "qa")
            }
            ev = float(np.mean([r["evidence"] for r in rs]))
            ms = float(np.mean([r["scorer_ms"] for r in rs]))
            summary.append({"scorer": name, "order": order, **acc, "evidence_kept": ev, "scorer_ms": ms})
            lines.append(
                f"| {name} | {order} | {acc['retrieval']:.0%} | {acc['qa']:.0%} | {ev:.0%} | {ms:.0f} |"
            )
    md = f"ratio {args.ratio:g}, {args.n} examples per family, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
    md += "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scores.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    (args.out / "scores.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
