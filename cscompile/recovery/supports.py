"""Supports: top-k, energy fraction, block aggregation, and how well one support matches another."""

from __future__ import annotations

import numpy as np

from cscompile.errors import UserError


def topk_support(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` largest scores over the last axis (ties broken by index)."""
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise UserError("support size", str(k), f"0..{n}")
    mask = np.zeros(scores.shape, bool)
    if k == 0:
        return mask
    idx = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


def energy_support(scores: np.ndarray, eps: float) -> np.ndarray:
    """Smallest set of units holding ``(1 − eps)`` of the energy ``Σ score²`` (per row of the last axis)."""
    if not 0.0 <= eps < 1.0:
        raise UserError("energy fraction eps", str(eps), "0 <= eps < 1")
    e = scores.astype(np.float64) ** 2
    order = np.argsort(-e, axis=-1, kind="stable")
    sorted_e = np.take_along_axis(e, order, axis=-1)
    cum = np.cumsum(sorted_e, axis=-1)
    total = cum[..., -1:]
    keep_sorted = (cum - sorted_e) < (1.0 - eps) * total  # include the unit that crosses the line
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, order, keep_sorted, axis=-1)
    return mask


def block_scores(channel_scores: np.ndarray, block: int) -> np.ndarray:
    """Channel activities ``[..., I]`` → block activities ``[..., I/block]`` (L2 over each block)."""
    width = channel_scores.shape[-1]
    if block < 1 or width % block:
        raise UserError("block size", str(block), f"a divisor of {width}")
    x = channel_scores.reshape(*channel_scores.shape[:-1], width // block, block).astype(np.float64)
    return np.sqrt((x**2).sum(-1))


def support_f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    """F1 of predicted vs true supports (boolean masks of equal shape), pooled over all rows."""
    p, t = predicted.astype(bool), truth.astype(bool)
    tp = float((p & t).sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / p.sum(), tp / t.sum()
    return float(2 * precision * recall / (precision + recall))


def ffn_block_activity(act: np.ndarray, w_down: np.ndarray, block: int) -> np.ndarray:
    """Each FFN block's contribution norm ``‖W_down[B_j,:]ᵀ a_{B_j}‖``: ``act [T, I]``, ``w_down [I, H]`` → ``[T, I/b]``.

    The ground-truth activity of an FFN unit at granularity ``block`` (b = 1: ``|a_j|·‖W_down[j]‖``).
    """
    t, width = act.shape
    if block < 1 or width % block:
        raise UserError("block size", str(block), f"a divisor of {width}")
    a = act.astype(np.float32).reshape(t, width // block, block)
    w = w_down.astype(np.float32).reshape(width // block, block, -1)
    return np.linalg.norm(np.einsum("tnb,nbh->tnh", a, w), axis=-1)
