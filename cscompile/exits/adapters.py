"""Exit adapters: multinomial logistic regression on pooled hidden states, in numpy.

Features are the RMS-normalized residual stream at an exit depth, mean-pooled over the tokens
read so far; the adapter standardizes them with training statistics and applies a softmax
regression fitted by full-batch gradient descent with L2 (deterministic: no sampling). Stored
as plain arrays (``.npz`` without pickle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cscompile.errors import UserError


def normalize_rows(hidden: np.ndarray) -> np.ndarray:
    """Per-token RMS normalization of a residual stream ``[S, H]`` (float64)."""
    h = np.asarray(hidden, np.float64)
    return np.asarray(h / np.sqrt((h * h).mean(axis=-1, keepdims=True) + 1e-6))


def pool_features(hidden: np.ndarray) -> np.ndarray:
    """``[S, H]`` residual stream → ``[H]``: per-token RMS normalization, then the mean over tokens."""
    return np.asarray(normalize_rows(hidden).mean(axis=0))


@dataclass
class Adapter:
    mean: np.ndarray  # [H]
    scale: np.ndarray  # [H]
    weight: np.ndarray  # [H, K]
    bias: np.ndarray  # [K]

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, classes: int, l2: float = 1e-2, iters: int = 500,
            weights: np.ndarray | None = None) -> Adapter:  # fmt: skip
        """Fit on features ``x [N, H]`` and labels ``y [N]``; ``weights [N]`` (default equal) weigh
        the rows in the loss (normalized to sum to one).
        """
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.int64)
        if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
            raise UserError(
                "adapter training data", f"features {x.shape} and {len(y)} labels", "[N, H] and N labels"
            )
        if classes < 2 or y.min() < 0 or y.max() >= classes:
            raise UserError(
                "adapter labels", f"values in {y.min()}..{y.max()}", f"0..{classes - 1}, at least 2 classes"
            )
        r = np.full(len(x), 1.0) if weights is None else np.asarray(weights, np.float64)
        if r.shape != (len(x),) or r.min() < 0 or r.sum() <= 0:
            raise UserError("adapter weights", f"shape {r.shape}", f"[{len(x)}] non-negative, not all zero")
        r = r / r.sum()
        mean = r @ x
        scale = np.sqrt(r @ (x - mean) ** 2) + 1e-6
        z = (x - mean) / scale
        # accelerated gradient descent with the step 1/L (L bounds the loss's curvature: the
        # softmax Hessian is at most 1/2 of the weighted second moment, plus the L2 term). A fixed
        # step diverges on correlated features: standardized residual streams have λmax in the
        # hundreds, and then more L2 meant *more* confident, chance-level adapters.
        zb = np.concatenate([z, np.ones((len(z), 1))], axis=1)
        curv = 0.5 * float(np.linalg.eigvalsh((zb * r[:, None]).T @ zb)[-1]) + l2
        step = 1.0 / curv
        theta = np.zeros((zb.shape[1], classes))
        prev, mom = theta, theta
        onehot = np.eye(classes)[y]
        reg = np.ones((zb.shape[1], 1))
        reg[-1] = 0.0  # no penalty on the bias
        for t in range(1, iters + 1):
            g = zb.T @ ((_softmax(zb @ mom) - onehot) * r[:, None]) + l2 * reg * mom
            theta = mom - step * g
            mom = theta + (t - 1) / (t + 2) * (theta - prev)
            prev = theta
        w, b = theta[:-1], theta[-1]
        return cls(mean, scale, w, b)

    def proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``[..., K]`` of features ``[..., H]``."""
        return _softmax(((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.weight + self.bias)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{k}": getattr(self, k) for k in ("mean", "scale", "weight", "bias")}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> Adapter:
        try:
            a = cls(
                *(
                    np.asarray(arrays[f"{prefix}.{k}"], np.float64)
                    for k in ("mean", "scale", "weight", "bias")
                )
            )
        except KeyError as exc:
            raise UserError(
                "exit adapters", f"missing array {exc}", "mean, scale, weight, bias per exit"
            ) from None
        h, k = a.weight.shape if a.weight.ndim == 2 else (-1, -1)
        if a.mean.shape != (h,) or a.scale.shape != (h,) or a.bias.shape != (k,) or k < 2:
            raise UserError("exit adapters", f"inconsistent shapes for {prefix}", "[H], [H], [H, K], [K]")
        return a


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))
