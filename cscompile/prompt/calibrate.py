"""Choose the scorer's heads from calibration examples, and package the scorer into a bundle.

Every query head of the first ``max_layer`` layers is scored on calibration examples whose
evidence sentence is known (the ``calib`` split of the retrieval and QA sets): for each head,
the rank of the evidence sentence when sentences are ordered by the head's mean attention
from the question. The ``n_heads`` heads with the best mean rank are kept and the scorer graph
is cut after the deepest of them. The cut depth is the scorer's cost (about ``L/N`` of a
prefill, no LM head), so ``max_layer`` bounds it: a third of the model by default.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.errors import UserError
from cscompile.prompt.compress import layout, sentence_means
from cscompile.prompt.scorer import PromptScorer, ScorerSpec, build_scorer, engine_attention

SCORER_FILE = "prompt/scorer.onnx"
#: the prompt ratios whose quality a build calibrates (the runtime's latency budget picks among them)
GRID_RATIOS = (1.0, 0.5, 0.3, 0.2, 0.1)
SPEC_FILE = "prompt/scorer.json"
ROPE_FILE = "prompt/rope.npz"


def evidence_sentence(lay: Any, evidence: str) -> int:
    """The context sentence index holding the start of ``evidence``."""
    at = lay.text.find(evidence, lay.context_span[0])
    if at < 0:
        raise ValueError("evidence not in the prompt")
    for i, (_, b) in enumerate(lay.offsets):
        if b > at and lay.sentence[i] >= 0:
            return int(lay.sentence[i])
    raise ValueError("evidence outside the context")


def sentence_rank(lay: Any, row: np.ndarray, target: int) -> int:
    """How many context sentences score above ``target`` (mean token score; 0 = first)."""
    mean = sentence_means(lay, row)
    return int((mean > mean[target]).sum())


def calibrate_heads(engine: Path, tokenizer: Any, work: Path, examples: Sequence[Any], *,
                    max_layer: int | None = None, n_heads: int = 2, threads: int | None = None,
                    n_layers: int | None = None,
                    say: Callable[[str], None] = lambda m: None) -> tuple[ScorerSpec, dict[str, Any]]:  # fmt: skip
    """Rank every head of the first ``max_layer`` layers on ``examples``; keep the best ``n_heads``.

    ``n_layers`` (the engine's fused attention layers) saves loading the engine to count them.
    """
    if n_layers is None:
        n_layers = engine_attention(engine)[0]
    if n_layers == 0:
        build_scorer(engine, [0], work / "probe.onnx")  # raises the one-line error
    max_layer = max_layer or max(1, n_layers // 3)
    if not 1 <= max_layer <= n_layers:
        raise UserError("scorer max layer", f"{max_layer}", f"1..{n_layers}")
    if n_heads < 1:
        raise UserError("scorer heads", f"{n_heads}", "a positive count")
    attrs, rope = build_scorer(engine, list(range(max_layer)), work / "calib-scorer.onnx")
    h = int(attrs["num_heads"])
    d = int(rope["cos"].shape[1] * 2)
    probe = ScorerSpec(
        tuple((layer, head) for layer in range(max_layer) for head in range(h)),
        h, int(attrs["kv_num_heads"]), d, float(attrs["scale"]),
    )  # fmt: skip
    scorer = PromptScorer(work / "calib-scorer.onnx", probe, rope, threads)
    fits = []
    for ex in examples:  # a small-context model cannot read the longer examples
        lay = layout(tokenizer, ex.context, ex.question, ex.instruction)
        if len(lay.ids) <= scorer.max_positions:
            fits.append((ex, lay))
    if not fits:
        raise UserError(
            "prompt scorer calibration",
            f"no calibration example fits the model's {scorer.max_positions} positions",
            "a model with a longer context",
        )
    ranks = np.zeros((len(fits), max_layer, h))
    sizes, kept = [], []
    for i, (ex, lay) in enumerate(fits):
        target = evidence_sentence(lay, ex.evidence[0])
        outs = scorer.run(lay.ids)
        rows = {lh: scorer.head_attention(outs, lay.query, *lh) for lh in probe.heads}
        for (layer, head), row in rows.items():
            ranks[i, layer, head] = sentence_rank(lay, row, target)
        sizes.append(int(lay.sentence.max()) + 1)
        kept.append((lay, target, rows))
        say(f"scorer calibration {i + 1}/{len(fits)}")
    mean_rank = ranks.mean(axis=0)
    order = sorted(probe.heads, key=lambda lh: (mean_rank[lh], lh[0]))  # ties: the shallower head
    best = float(mean_rank[order[0]])
    # a head much worse than the best would dilute it: keep only heads within 2x (+1) of it
    heads = tuple(sorted(lh for lh in order[:n_heads] if mean_rank[lh] <= 2 * best + 1))
    spec = ScorerSpec(heads, h, probe.num_kv_heads, d, probe.scale)
    # the chosen heads together, as the runtime combines them
    combined = [
        sentence_rank(lay, np.sum([rows[lh] for lh in heads], axis=0), target) for lay, target, rows in kept
    ]
    report = {
        "examples": len(fits),
        "skipped_too_long": len(examples) - len(fits),
        "sentences_mean": float(np.mean(sizes)),
        "max_layer": max_layer,
        "mean_rank": np.round(mean_rank, 2).tolist(),
        "chosen": [list(x) for x in heads],
        "chosen_ranks": combined,
        "recall_at_3": float(np.mean(np.array(combined) < 3)),
    }
    return spec, report


def prompt_part(engine: Path, tokenizer: Any, work: Path, *, n_heads: int = 2, max_layer: int | None = None,
                n_calib: int = 8, threads: int | None = None,
                say: Callable[[str], None] = lambda m: None) -> Any:  # fmt: skip
    """The bundle part with the calibrated scorer (``prompt/``): scorer graph, spec, RoPE tables."""
    from cscompile.bundle.parts import BundlePart
    from cscompile.data.longctx import long_context_set

    n_layers, positions = engine_attention(engine)
    # contexts of ~1000 tokens; halved until most examples fit a short model's RoPE table
    tokens = 1000
    while True:
        examples = long_context_set("retrieval", n_calib, tokens, split="calib") + long_context_set(
            "qa", n_calib, tokens, split="calib"
        )
        sizes = [len(layout(tokenizer, e.context, e.question, e.instruction).ids) for e in examples]
        if 2 * sum(n <= positions for n in sizes) >= len(examples) or tokens < 16:
            break
        tokens //= 2
    spec, report = calibrate_heads(engine, tokenizer, work, examples, max_layer=max_layer, n_heads=n_heads,
                                   threads=threads, n_layers=n_layers, say=say)  # fmt: skip
    _, rope = build_scorer(engine, list(spec.layers), work / "scorer.onnx")
    np.savez(work / "rope.npz", cos=rope["cos"], sin=rope["sin"])
    decodable = [e for e, n in zip(examples, sizes) if n + 32 <= positions]  # the grid decodes 32 tokens
    doc = {"spec": spec.to_dict(), "calibration": report,
           "grid": ratio_grid(engine, tokenizer, work, spec, rope, decodable, threads, say)}  # fmt: skip
    return BundlePart(
        files={
            SCORER_FILE: work / "scorer.onnx",
            ROPE_FILE: work / "rope.npz",
            SPEC_FILE: (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(),
        },
        sections={"prompt": SPEC_FILE},
    )


def ratio_grid(engine: Path, tokenizer: Any, work: Path, spec: ScorerSpec, rope: dict[str, np.ndarray],
               examples: Sequence[Any], threads: int | None, say: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Quality of each prompt ratio on the dense engine, per sentence order (machine-independent:
    the runtime's latency budget combines it with costs measured where it runs).
    """
    from cscompile.decode.generate import TextModel
    from cscompile.decode.session import DecoderSession
    from cscompile.prompt.allocate import calibrate_grid
    from cscompile.prompt.compress import ORDERS, PromptCompressor

    comp = PromptCompressor(tokenizer, PromptScorer(work / "scorer.onnx", spec, rope, threads))
    tm = TextModel(DecoderSession(engine, threads=threads), tokenizer)
    grids, plan = {}, 0
    for order in ORDERS:
        grid, plan = calibrate_grid({"dense": tm}, comp, examples, GRID_RATIOS, order,
                                    say=lambda m, o=order: say(f"prompt grid ({o}): {m}"))  # fmt: skip
        grids[order] = grid.to_dict()
    return {"examples": len(examples), "new_tokens_mean": plan, "orders": grids}


def load_scorer(bundle: Any, threads: int | None = None) -> PromptScorer | None:
    """The bundle's scorer, or None if it was built without ``--prompt-scorer``."""
    if "prompt" not in bundle.sections:
        return None
    where = f"bundle {bundle.source}: {SPEC_FILE}"
    doc = bundle.read_json(bundle.sections["prompt"])
    spec = ScorerSpec.from_dict(doc.get("spec") if isinstance(doc, dict) else None, where)
    rope = bundle.read_npz(ROPE_FILE)
    if set(rope) != {"cos", "sin"}:
        raise UserError(f"bundle {bundle.source}: {ROPE_FILE}", f"holds {sorted(rope)}", "cos and sin")
    return PromptScorer(bundle.path_of(SCORER_FILE), spec, rope, threads)
