"""Accuracy checks between runners with Polygraphy: each TensorRT engine against the ORT graph.

``compare`` runs a reference and a candidate runner on the same feeds (Polygraphy's
``Comparator``) and reports, per output, the largest absolute and relative error and whether
every element is within ``atol``/``rtol``; the bundle records these numbers with the tolerances.
On GPU the candidate is Polygraphy's ``TrtRunner`` on an engine; on CPU the same function
compares the lowered graph (ORT, reference plugin) with the motif engine through
:class:`MotifRunner`, which is how it is tested.

Feeds (:func:`decoder_feeds`): short token sequences after a random cache, for each engine
profile (a prompt chunk for ``prefill``, one token for ``decode``), with each sparse motif's
counts for the sparse engine.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cscompile.trt.lower import COUNTS_INPUT

#: defaults recorded with every comparison; fp16 engines drift ~1e-2 on logits of ~10
TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (5e-2, 5e-2), "bf16": (2e-1, 1e-1)}


@dataclass
class OutputCheck:
    output: str
    max_abs: float
    max_rel: float
    passed: bool


@dataclass
class Comparison:
    reference: str
    candidate: str
    atol: float
    rtol: float
    outputs: list[OutputCheck]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def compare(
    reference: Any,
    candidate: Any,
    feeds: list[dict[str, np.ndarray]],
    atol: float,
    rtol: float,
    outputs: list[str],
) -> Comparison:
    """Run both Polygraphy runners on ``feeds``; errors over ``outputs`` across all feeds."""
    from polygraphy.comparator import Comparator, CompareFunc

    results = Comparator.run([reference, candidate], data_loader=feeds)
    func = CompareFunc.simple(atol=atol, rtol=rtol, check_shapes=True)
    acc = Comparator.compare_accuracy(results, compare_func=func, comparisons=[(0, 1)])
    # Polygraphy ≥ 0.53 returns one AccuracyResult per compare function, older releases one
    pairs = [r for res in ([acc] if hasattr(acc, "values") else list(acc)) for r in res.values()]
    checks = {name: OutputCheck(name, 0.0, 0.0, True) for name in outputs}
    for iterations in pairs:
        for per_output in iterations:
            for name, res in per_output.items():
                if name not in checks:
                    continue
                c = checks[name]
                c.max_abs = max(c.max_abs, float(res.max_absdiff))
                c.max_rel = max(c.max_rel, float(res.max_reldiff))
                c.passed = c.passed and bool(res)
    missing = [n for n in outputs if n not in {k for it in pairs for po in it for k in po}]
    for n in missing:
        checks[n].passed = False
    return Comparison(reference.name, candidate.name, atol, rtol, list(checks.values()))


def decoder_feeds(
    shapes: dict[str, tuple[list[int], list[int], list[int]]],
    tokens: int,
    past: int,
    vocab: int,
    seed: int = 0,
    counts: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One feed within a profile: ``tokens`` new ids after a random cache of ``past`` positions."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for name, (lo, _opt, _hi) in shapes.items():
        if name == "input_ids":
            feed[name] = rng.integers(3, vocab, (1, tokens)).astype(np.int64)
        elif name == "position_ids":
            feed[name] = np.arange(past, past + tokens, dtype=np.int64)[None]
        elif name == "attention_mask":
            feed[name] = np.ones((1, past + tokens), np.int64)
        elif name == COUNTS_INPUT:
            assert counts is not None
            feed[name] = np.asarray(counts, np.int32)
        elif len(lo) == 4:  # a cache input [1, heads, past, head_dim]
            feed[name] = (0.5 * rng.standard_normal((1, lo[1], past, lo[3]))).astype(np.float32)
        else:
            raise ValueError(f"no feed rule for input {name}")
    return feed


def motif_runner(
    engine: Any,
    motifs: dict[str, Any],
    counts: dict[str, list[int]],
    inputs: dict[str, Any],
    name: str = "motif-engine",
) -> Any:
    """A Polygraphy runner over the CPU motif engine, fed like the lowered graph (``inputs``: name →
    ``(numpy dtype, rank)``) and returning ``logits``. Evaluation mode: every position runs what a decode step
    would. Caches in the feeds must be empty (the motif engine starts from its own state).
    """
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class _Runner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name, prefix="cscompile-motif")

        def activate_impl(self) -> None:
            engine.sparse_prefill = True

        def deactivate_impl(self) -> None:
            engine.sparse_prefill = False

        def get_input_metadata_impl(self) -> Any:
            meta = TensorMetadata()
            for n, (dtype, rank) in inputs.items():
                meta.add(n, dtype=dtype, shape=[None] * rank)
            return meta

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict:
            start = time.perf_counter()
            key = tuple(int(c) for c in feed_dict[COUNTS_INPUT])
            motif = motifs[next(n for n, c in counts.items() if tuple(c) == key)]
            logits = engine.forward(feed_dict["input_ids"], engine.new_state(), motif)
            self.inference_time = time.perf_counter() - start
            return OrderedDict(logits=logits)

    return _Runner()
