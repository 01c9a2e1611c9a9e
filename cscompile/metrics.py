"""Perplexity over a text corpus in windows, through any causal scorer.

The scorer maps ``ids [1, L] -> logits [1, L, V]`` with no past (ONNX session, PyTorch model
or, later, a masked reference executor), so every system is scored by the same windowing code.
Windows follow the usual sliding scheme: window ``w`` tokens, advanced by ``stride``; each
window scores only the tokens the previous one did not (all of them when stride == window).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cscompile.errors import UserError

if TYPE_CHECKING:
    from cscompile.decode.session import DecoderSession

Scorer = Callable[[np.ndarray], np.ndarray]


def reference_corpus() -> str:
    """English prose every machine has: Python's ``pydoc_data.topics``, values in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens_scored: int
    windows: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "perplexity": self.perplexity,
            "nll": self.nll,
            "tokens_scored": self.tokens_scored,
            "windows": self.windows,
        }


def scoring_window(model_dir: Path, window: int = 512) -> int:
    """The perplexity window for a model: ``window`` tokens, shorter for a short-context model."""
    from cscompile.model_config import read_context_length

    return min(window, read_context_length(model_dir) or window)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window; position ``first_scored..end-1`` are targets."""
    if window < 2:
        raise UserError("window", str(window), "an integer >= 2")
    if not 1 <= stride <= window:
        raise UserError("stride", str(stride), f"an integer in [1, window={window}]")
    if n_tokens < 2:
        raise UserError("corpus", f"{n_tokens} tokens", "at least 2 tokens")
    spans = []
    prev_end = 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            spans.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return spans


def perplexity(
    scorer: Scorer,
    token_ids: list[int] | np.ndarray,
    window: int = 512,
    stride: int = 512,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``token_ids`` under ``scorer``."""
    ids = np.asarray(token_ids, dtype=np.int64)
    spans = window_spans(len(ids), window, stride)
    total_nll, count = 0.0, 0
    for i, (b, e, first) in enumerate(spans):
        logits = scorer(ids[None, b:e])[0]  # [e-b, V]
        lp = log_softmax(logits[first - 1 - b : e - 1 - b])  # predicts tokens first..e-1
        targets = ids[first:e]
        total_nll -= float(lp[np.arange(len(targets)), targets].sum())
        count += len(targets)
        if progress:
            progress(i + 1, len(spans))
    nll = total_nll / count
    return PerplexityResult(perplexity=float(np.exp(nll)), nll=nll, tokens_scored=count, windows=len(spans))


def onnx_scorer(session: DecoderSession) -> Scorer:
    """Scorer for a :class:`~cscompile.decode.session.DecoderSession` (fresh cache per window)."""

    def score(ids: np.ndarray) -> np.ndarray:
        return session.forward(ids, session.new_state(batch=ids.shape[0]))

    return score
