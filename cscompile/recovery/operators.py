"""Random measurement operators Φ ∈ R^{m×n}: Gaussian, Rademacher, subsampled randomized Hadamard.

Seeded and serializable by their parameters (kind, m, n, seed): a bundle stores four numbers,
not the matrix, and every machine regenerates the same Φ. All are scaled so that
``E[ΦᵀΦ] = I`` (norms are preserved on average).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cscompile.errors import UserError

KINDS = ("gaussian", "rademacher", "srht")


def hadamard(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix of order ``n`` (a power of two), entries ±1."""
    if n < 1 or n & (n - 1):
        raise UserError("Hadamard order", str(n), "a power of two")
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


@dataclass(frozen=True)
class MeasurementOperator:
    kind: str
    m: int
    n: int
    seed: int = 0
    _cache: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError("measurement operator", f"kind '{self.kind}'", f"one of {', '.join(KINDS)}")
        if not 1 <= self.m <= max(self.n, 1) or self.n < 1:
            raise UserError("measurement operator", f"m={self.m}, n={self.n}", "1 <= m <= n")

    @property
    def matrix(self) -> np.ndarray:
        """Φ as float32 ``[m, n]`` (generated once, then cached)."""
        if "phi" not in self._cache:
            self._cache["phi"] = self._generate().astype(np.float32)
        return self._cache["phi"]

    def _generate(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        m, n = self.m, self.n
        if self.kind == "gaussian":
            return rng.standard_normal((m, n)) / np.sqrt(m)
        if self.kind == "rademacher":
            return rng.choice([-1.0, 1.0], size=(m, n)) / np.sqrt(m)
        # SRHT: sqrt(n_pad/m) · S · H/sqrt(n_pad) · D, columns beyond n dropped (zero padding of x)
        n_pad = 1 << (n - 1).bit_length()
        signs = rng.choice([-1.0, 1.0], size=n_pad)
        rows = np.sort(rng.choice(n_pad, size=m, replace=False))
        h = hadamard(n_pad)[rows] / np.sqrt(n_pad)
        return (np.sqrt(n_pad / m) * h * signs[None, :])[:, :n]

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``y = Φ x`` over the last axis: ``[..., n] -> [..., m]``."""
        return np.asarray(x, np.float32) @ self.matrix.T

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "m": self.m, "n": self.n, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MeasurementOperator:
        try:
            return cls(kind=str(d["kind"]), m=int(d["m"]), n=int(d["n"]), seed=int(d.get("seed", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                "measurement operator", f"malformed description ({exc})", "{kind, m, n, seed}"
            ) from None
