"""Sparse recovery from ``y = A α + e`` (``A = Φ D``): OMP, CoSaMP, group (F)ISTA, a sketch decoder.

Shapes: ``A [m, N]``, ``y [m]``; ``groups`` assigns each of the N coefficients to a unit
(``[N]`` ints, unit ids 0..G−1) so the penalty and the support are per unit. All solvers run a
bounded amount of work (fixed iterations) so they can be unrolled into a graph later.
"""

from __future__ import annotations

import numpy as np

from cscompile.errors import UserError


def _lstsq_on(a: np.ndarray, y: np.ndarray, support: np.ndarray) -> np.ndarray:
    coef = np.zeros(a.shape[1], np.float64)
    if support.size:
        sol, *_ = np.linalg.lstsq(a[:, support], y, rcond=None)
        coef[support] = sol
    return coef


def omp(a: np.ndarray, y: np.ndarray, k: int, tol: float = 1e-10) -> np.ndarray:
    """Orthogonal matching pursuit: at most ``k`` atoms, stops early when the residual vanishes."""
    a = np.asarray(a, np.float64)
    y = np.asarray(y, np.float64)
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    support: list[int] = []
    coef = np.zeros(a.shape[1])
    residual = y.copy()
    for _ in range(min(k, a.shape[0])):
        if np.linalg.norm(residual) <= tol * max(float(np.linalg.norm(y)), 1e-30):
            break
        corr = np.abs(a.T @ residual) / norms
        corr[support] = -1.0
        support.append(int(np.argmax(corr)))
        coef = _lstsq_on(a, y, np.array(support))
        residual = y - a @ coef
    return coef


def cosamp(a: np.ndarray, y: np.ndarray, k: int, iters: int = 20, tol: float = 1e-10) -> np.ndarray:
    """CoSaMP (Needell & Tropp): merge 2k candidates, least squares, prune to k; fixed iteration cap."""
    a = np.asarray(a, np.float64)
    y = np.asarray(y, np.float64)
    n = a.shape[1]
    if not 1 <= k <= n:
        raise UserError("sparsity k", str(k), f"1..{n}")
    coef = np.zeros(n)
    residual = y.copy()
    for _ in range(iters):
        if np.linalg.norm(residual) <= tol * max(float(np.linalg.norm(y)), 1e-30):
            break
        proxy = a.T @ residual
        candidates = np.union1d(np.argsort(-np.abs(proxy))[: 2 * k], np.flatnonzero(coef))
        b = _lstsq_on(a, y, candidates)
        keep = np.argsort(-np.abs(b))[:k]
        coef = np.zeros(n)
        coef[keep] = b[keep]
        residual = y - a @ coef
    return coef


def fista_group(
    a: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    lam: float,
    iters: int = 50,
    x0: np.ndarray | None = None,
    prev: np.ndarray | None = None,
    mu: float = 0.0,
    accelerate: bool = True,
) -> np.ndarray:
    """Minimize ``½‖y − Aα‖² + λ Σ_g ‖α_g‖₂ + (μ/2)‖α − α_prev‖²`` with a fixed number of (F)ISTA steps.

    ``x0`` warm-starts (the previous token's estimate); ``prev``/``mu`` add the temporal term.
    """
    a = np.asarray(a, np.float64)
    y = np.asarray(y, np.float64)
    groups = np.asarray(groups)
    n = a.shape[1]
    if groups.shape != (n,):
        raise UserError("groups", f"shape {groups.shape}", f"one unit id per coefficient ({n},)")
    n_groups = int(groups.max()) + 1
    lip = float(np.linalg.norm(a, 2) ** 2) + mu
    step = 1.0 / max(lip, 1e-30)
    x = np.zeros(n) if x0 is None else np.asarray(x0, np.float64).copy()
    z, t = x.copy(), 1.0
    p = np.zeros(n) if prev is None else np.asarray(prev, np.float64)
    for _ in range(iters):
        grad = a.T @ (a @ z - y) + mu * (z - p)
        u = z - step * grad
        norms = np.sqrt(np.bincount(groups, weights=u * u, minlength=n_groups))
        shrink = np.maximum(0.0, 1.0 - step * lam / np.maximum(norms, 1e-30))
        x_new = u * shrink[groups]
        if accelerate:
            t_new = (1.0 + np.sqrt(1.0 + 4.0 * t * t)) / 2.0
            z = x_new + ((t - 1.0) / t_new) * (x_new - x)
            t = t_new
        else:
            z = x_new
        x = x_new
    return x


def fista_batch(
    a: np.ndarray, y: np.ndarray, groups: np.ndarray, lam: np.ndarray, iters: int = 20
) -> np.ndarray:
    """:func:`fista_group` (no warm start or temporal term) for many signals at once.

    ``y [T, m]`` with one ``lam`` per row (``[T]``); returns ``[T, N]``. Row ``t`` equals
    ``fista_group(a, y[t], groups, lam[t], iters)``; batched, it runs at matrix-multiply speed
    (how the model-level experiments afford it on every token of every layer).
    """
    a = np.asarray(a, np.float32)
    y = np.asarray(y, np.float32)
    groups = np.asarray(groups)
    n = a.shape[1]
    n_groups = int(groups.max()) + 1
    onehot = np.zeros((n, n_groups), np.float32)
    onehot[np.arange(n), groups] = 1.0
    step = np.float32(1.0 / max(float(np.linalg.norm(a.astype(np.float64), 2) ** 2), 1e-30))
    thr = (step * np.asarray(lam, np.float32))[:, None]  # [T, 1]
    x = np.zeros((len(y), n), np.float32)
    z, t = x.copy(), 1.0
    for _ in range(iters):
        u = z - step * ((z @ a.T - y) @ a)
        norms = np.sqrt((u * u) @ onehot)  # [T, G]
        shrink = np.maximum(0.0, 1.0 - thr / np.maximum(norms, 1e-30))
        x_new = u * (shrink @ onehot.T)
        t_new = (1.0 + np.sqrt(1.0 + 4.0 * t * t)) / 2.0
        z = x_new + np.float32((t - 1.0) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x


def group_norms(coef: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """‖α_g‖₂ per unit g."""
    return np.sqrt(np.bincount(np.asarray(groups), weights=np.asarray(coef, np.float64) ** 2))


class SketchDecoder:
    """Ridge regression from measurements to unit scores: the learned baseline solver.

    ``fit(Y [T, m], S [T, N])`` then ``predict(Y) -> [T, N]``; an intercept is fitted.
    """

    def __init__(self, ridge: float = 1e-3) -> None:
        self.ridge = ridge
        self.weight: np.ndarray | None = None
        self.bias: np.ndarray | None = None

    def fit(self, y: np.ndarray, scores: np.ndarray) -> SketchDecoder:
        y = np.asarray(y, np.float64)
        s = np.asarray(scores, np.float64)
        if y.ndim != 2 or s.ndim != 2 or y.shape[0] != s.shape[0]:
            raise UserError(
                "sketch decoder data", f"Y {y.shape}, S {s.shape}", "Y [T, m] and S [T, N] with the same T"
            )
        ym, sm = y.mean(0), s.mean(0)
        yc, sc = y - ym, s - sm
        gram = yc.T @ yc + self.ridge * len(y) * np.eye(y.shape[1])
        self.weight = np.linalg.solve(gram, yc.T @ sc)
        self.bias = sm - ym @ self.weight
        return self

    def predict(self, y: np.ndarray) -> np.ndarray:
        if self.weight is None or self.bias is None:
            raise UserError("sketch decoder", "used before fit()", "fit(Y, S) first")
        return np.asarray(y, np.float64) @ self.weight + self.bias
