"""Task-conditioned measurement banks: cluster prompts by a cheap feature, one decoder per cluster.

Measured (``tools/exp_banks.py``, BENCHMARKS.md): on SmolLM2's shipped prompts, decoders fitted per
k-means cluster of the mean layer-0 FFN input recover almost all of the gain of per-family
decoders (+0.05–0.09 support F1 at equal m). A prompt picks its bank once, at prefill, by the
nearest centroid — no task label needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cscompile.errors import UserError


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations with k-means++ seeding: ``(centroids [k, d], labels [n])``. Deterministic
    for a given seed; empty clusters keep their previous centroid.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < k or k < 1:
        raise UserError(
            "bank clustering", f"{len(x)} prompt features for {k} banks", "at least one prompt per bank"
        )
    rng = np.random.default_rng(seed)
    cent = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min([((x - c) ** 2).sum(1) for c in cent], axis=0)
        total = d2.sum()
        cent.append(x[rng.choice(len(x), p=d2 / total)] if total > 0 else x[rng.integers(len(x))])
    c = np.array(cent)
    labels = np.zeros(len(x), int)
    for _ in range(iters):
        labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.array([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return c, labels


@dataclass
class BankSelector:
    """Nearest-centroid choice of a bank from a prompt feature."""

    centroids: np.ndarray  # [banks, d]

    def choose(self, feature: np.ndarray) -> int:
        return int(((self.centroids - np.asarray(feature, np.float64)) ** 2).sum(1).argmin())


def prompt_feature(layer0_inputs: np.ndarray) -> np.ndarray:
    """The cheap prompt feature: the mean over the prompt's positions of layer 0's FFN input."""
    return np.asarray(layer0_inputs, np.float64).reshape(-1, layer0_inputs.shape[-1]).mean(0)
