"""Compressed prompt at renumbered vs original positions (issue #9, item 2).

    python tools/exp_prompt_positions.py [--n 12] [--ratio 0.3]

The serving engine (fused attention) can only renumber: it derives positions from lengths.
Whether keeping the original positions would be better is measured here on the plain fp32
export, which takes explicit ``position_ids``: for each retrieval / QA example the same kept
tokens (the bundle's compressor, text order) are decoded greedily twice — at ``0..n-1``, and
at their original indices (the full prompt prefilled with the dropped tokens masked out of
attention, decode continuing after the original prompt's end) — and compared with the dense
fp32 answer on the full prompt. Writes ``benchmarks/results/prompt/positions.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def greedy(sess, ids: list[int], eos: set[int], n: int, kept: np.ndarray | None = None) -> list[int]:
    """Greedy decode. ``kept`` (bool over ``ids``): prefill every token at its original position
    but mask the dropped ones out of attention. (The export builds its causal mask from
    ``position_ids``, so gappy positions alone would let tokens see the future.)"""
    state = sess.new_state()
    if kept is None:
        logits = sess.forward(np.array([ids]), state)[0, -1]
    else:
        t = len(ids)
        logits = sess.forward(np.array([ids]), state, attention_mask=kept[None].astype(np.int64),
                              positions=np.arange(t)[None])[0, -1]  # fmt: skip
    out: list[int] = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        if tok in eos:
            break
        out.append(tok)
        p = None if kept is None else np.array([[len(ids) + len(out) - 1]])
        logits = sess.forward(np.array([[tok]]), state, positions=p)[0, -1]
    return out


def main() -> None:
    from cscompile.cli.commands.common import resolve_model_dir
    from cscompile.data.longctx import long_context_set, rouge_l
    from cscompile.decode.session import DecoderSession
    from cscompile.prompt import PromptBudget, layout
    from cscompile.runtime import load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("out/smollm2-prompt.csb"))
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prompt"))
    args = ap.parse_args()
    sess = DecoderSession(resolve_model_dir("smollm2") / "model.onnx", threads=2)
    rows = []
    with load(args.bundle, threads=2) as bm:
        tok = bm.tokenizer
        for fam in ("retrieval", "qa"):
            for ex in long_context_set(fam, args.n):
                lay = layout(tok, ex.context, ex.question, ex.instruction)
                c = bm.compress(ex.context, PromptBudget(ratio=args.ratio), question=ex.question,
                                instruction=ex.instruction)  # fmt: skip
                dense = tok.decode(greedy(sess, lay.ids, tok.eos_token_ids, 32))
                renum = tok.decode(greedy(sess, c.ids, tok.eos_token_ids, 32))
                orig = tok.decode(greedy(sess, lay.ids, tok.eos_token_ids, 32, kept=c.kept))
                rows.append({
                    "id": ex.id, "dense": ex.correct(dense), "renumbered": ex.correct(renum),
                    "original": ex.correct(orig), "agree_renumbered": rouge_l(dense, renum),
                    "agree_original": rouge_l(dense, orig),
                })  # fmt: skip
                print(rows[-1], flush=True)
    summary = {}
    for fam in ("retrieval", "qa"):
        fr = [r for r in rows if r["id"].startswith(fam)]
        summary[fam] = {k: float(np.mean([r[k] for r in fr])) for k in fr[0] if k != "id"}
    md = (
        "| family | dense fp32 | renumbered | original positions | ROUGE-L vs dense: renumbered | original |\n"
        "|---|---|---|---|---|---|\n"
        + "".join(
            f"| {fam} | {s['dense']:.0%} | {s['renumbered']:.0%} | {s['original']:.0%} | "
            f"{s['agree_renumbered']:.2f} | {s['agree_original']:.2f} |\n"
            for fam, s in summary.items()
        )
    )
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"ratio": args.ratio, "n": args.n, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "summary": summary, "rows": rows}  # fmt: skip
    (args.out / "positions.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "positions.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
