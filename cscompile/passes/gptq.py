"""GPTQ rounding into a GGUF block grid (Frantar et al., 2022): calibration-aware, instead of RTN.

Round-to-nearest minimizes each weight's own error; GPTQ minimizes the layer's output error on
calibration inputs ``X`` — ``‖X Wᵀ − X Qᵀ‖`` — by quantizing one input column at a time and
spreading that column's rounding error over the columns not yet quantized, weighted by the
inverse Hessian ``H = Xᵀ X`` (Cholesky form, lazy batched updates). Block parameters (Q4_1's
scale and minimum, Q8_0's scale; fp16 as a GGUF stores them) are fixed when the sweep reaches a
block's first column, from the weights as updated so far; columns keep their order so every
block of 32 stays a grid block the kernels read.

Used where a projection must be re-rounded (the native engine's 4-bit LM head; models without a
source grid); a source grid kept exactly needs none.
"""

from __future__ import annotations

import numpy as np

from cscompile.errors import UserError
from cscompile.quant.gguf import QK, BlockGrid


def _block_params(w: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(scale, offset) per row for one block of columns ``w [N, 32]``, as ``rtn_grid`` picks them."""
    if kind == "Q4_1":
        m = w.min(-1).astype(np.float16).astype(np.float64)
        d = ((w.max(-1) - m) / 15).astype(np.float16).astype(np.float64)
        return d, m
    d = (np.abs(w).max(-1) / 127).astype(np.float16).astype(np.float64)
    return d, None


def _round(col: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    safe = np.where(d > 0, d, 1.0)
    if m is not None:
        return np.clip(np.rint((col - m) / safe), 0, 15)
    return np.clip(np.rint(col / safe), -127, 127)


def hessian(x: np.ndarray) -> np.ndarray:
    """``Xᵀ X`` of calibration inputs ``x [T, K]`` (float64), the statistic GPTQ needs."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return x.T @ x


def gptq_grid(
    w_out_in: np.ndarray, h: np.ndarray, kind: str, damp: float = 0.01, batch: int = 128
) -> BlockGrid:
    """``w [N, K]`` rounded into ``kind`` (``Q4_1`` / ``Q8_0``) minimizing the output error under ``h = XᵀX``."""
    if kind not in ("Q4_1", "Q8_0"):
        raise UserError("gptq", f"format {kind}", "Q4_1 or Q8_0")
    n, k = w_out_in.shape
    if k % QK or h.shape != (k, k) or batch % QK:
        raise UserError(
            "gptq", f"a {n}×{k} matrix with a {h.shape} Hessian", f"K a multiple of {QK}, H of ({k}, {k})"
        )
    w = np.array(w_out_in, np.float64)
    h = np.array(h, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    # the upper Cholesky factor of H⁻¹: row j holds how column j's error moves the later columns
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros((n, k), np.int16)
    scale = np.zeros((n, k // QK))
    offset = np.zeros((n, k // QK)) if kind == "Q4_1" else None
    for b0 in range(0, k, batch):
        b1 = min(b0 + batch, k)
        err = np.zeros((n, b1 - b0))
        for j in range(b0, b1):
            if j % QK == 0:
                d, m = _block_params(w[:, j : j + QK], kind)
                scale[:, j // QK] = d
                if offset is not None and m is not None:
                    offset[:, j // QK] = m
            qj = _round(w[:, j], d, m)
            q[:, j] = qj
            wq = d * qj + (m if m is not None else 0.0)
            e = (w[:, j] - wq) / hinv[j, j]
            w[:, j + 1 : b1] -= np.outer(e, hinv[j, j + 1 : b1])
            err[:, j - b0] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    codes = q.astype(np.uint8) if kind == "Q4_1" else q.astype(np.int8)
    return BlockGrid(
        kind, codes, scale.astype(np.float32), None if offset is None else offset.astype(np.float32)
    )
