"""The channel-sparse FFN kernel: loading the compiled library, packing weights, calling it.

The C source is ``csrc/sparse_ffn.c``; ``pip install`` compiles it (setup.py). When the
installed copy is missing (a wheel built elsewhere, a failed build) the first use compiles it
into the cache with the system C compiler, keyed by the source hash, or says what is missing.

Why a C library called through ctypes (measured, ../BENCHMARKS.md and ARCHITECTURE.md):
channel granularity is the only one where SmolLM2 keeps its quality, and at batch 1 a channel's
weights are contiguous rows, so a kernel that reads only the chosen rows needs no gather copy.
Stock ONNX Runtime ops either gather (5× slower than dense) or want 128-channel experts
(quality collapses); an ORT custom op needs the ORT C headers, which no registry package
ships; numba is ~15% slower; ctypes costs ~1 µs a call.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from cscompile.clib import load_library

_SOURCE = Path(__file__).parent / "csrc" / "sparse_ffn.c"
ABI_VERSION = 4
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None

_f32p = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
_i32p = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
_i64 = ctypes.c_int64


def library() -> ctypes.CDLL:
    """The loaded kernel library (compiled on first use if the install did not build it)."""
    global _lib
    with _lock:
        if _lib is None:
            vp, ci = ctypes.c_void_p, ctypes.c_int
            _lib = load_library("_csffn", _SOURCE, "sparse FFN kernel", "cs_abi_version", ABI_VERSION, {
                "cs_ffn_f32": (ci, [vp, _i64, _i64, _f32p, vp, _i64, _f32p, vp, _f32p, ci]),
                "cs_topk_sorted": (_i64, [_f32p, _i64, _i64, _i32p, _f32p]),
                "cs_ffn_q8": (ci, [vp, _i64, _i64, _f32p, vp, _i64, _f32p, vp, _f32p, ci]),
                "cs_sensed_ffn": (_i64, [vp, ci, _i64, _i64, _f32p, _f32p, _f32p, vp, _i64, _i64, _i64, _f32p, _i32p,
                                         _f32p, _f32p, _f32p, _f32p, ci]),
            })  # fmt: skip
        return _lib


def pack_channel_major(gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """``[I, 3, H]`` float32 from ``gate [I, H]``, ``up [I, H]`` (output rows) and ``down [H, I]``."""
    i, h = gate.shape
    if up.shape != (i, h) or down.shape != (h, i):
        raise ValueError(f"FFN shapes gate {gate.shape}, up {up.shape}, down {down.shape} do not match")
    return np.ascontiguousarray(np.stack([gate, up, down.T], axis=1), dtype=np.float32)


def ffn_reference(w: np.ndarray, x: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """Plain-numpy SwiGLU restricted to ``idx``: the parity reference of the kernel."""
    sel = w if idx is None else w[idx]
    g = sel[:, 0, :].astype(np.float64) @ x.astype(np.float64)
    u = sel[:, 1, :].astype(np.float64) @ x.astype(np.float64)
    a = g / (1.0 + np.exp(-g)) * u
    return (a @ sel[:, 2, :].astype(np.float64)).astype(np.float32)


Q8_BLOCK = 32
FORMATS = ("f32", "q8")


def q8_row_bytes(hidden: int) -> int:
    return hidden + (hidden // Q8_BLOCK) * 8


def pack_q8(w: np.ndarray) -> np.ndarray:
    """8-bit records ``[I, 3 · row_bytes]`` (int8) from fp32 records ``[I, 3, H]``.

    Each row: ``H`` int8 codes, then per block of 32 a float32 ``(scale, offset)`` with
    ``w ≈ scale · q + offset`` (asymmetric, 256 levels over the block's range).
    """
    i, three, h = w.shape
    if three != 3 or h % Q8_BLOCK:
        raise ValueError(f"8-bit records need [I, 3, H] with H a multiple of {Q8_BLOCK}; got {w.shape}")
    blocks = w.reshape(i, 3, h // Q8_BLOCK, Q8_BLOCK).astype(np.float64)
    lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0)
    q = np.clip(np.rint((blocks - lo) / scale) - 128, -128, 127).astype(np.int8)
    offset = lo + 128.0 * scale
    params = np.concatenate([scale, offset], axis=-1).astype(np.float32)  # [I, 3, nb, 2]
    rows = np.concatenate(
        [q.reshape(i, 3, h).view(np.uint8), params.reshape(i, 3, -1).view(np.uint8)], axis=-1
    )  # [I, 3, row_bytes]
    return np.ascontiguousarray(rows.reshape(i, -1).view(np.int8))


def unpack_q8(records: np.ndarray, hidden: int) -> np.ndarray:
    """fp32 ``[I, 3, H]`` that the 8-bit records encode (what the kernel computes with)."""
    i = records.shape[0]
    rows = records.view(np.uint8).reshape(i, 3, q8_row_bytes(hidden))
    q = rows[:, :, :hidden].view(np.int8).astype(np.float32).reshape(i, 3, -1, Q8_BLOCK)
    params = np.ascontiguousarray(rows[:, :, hidden:]).view(np.float32).reshape(i, 3, -1, 2)
    return (q * params[..., :1] + params[..., 1:]).reshape(i, 3, hidden).astype(np.float32)


class SparseFFN:
    """One layer's channel-major weights (fp32 or 8-bit records) and the buffers its kernel
    calls reuse (not thread-safe: one instance per concurrent generation).
    """

    def __init__(self, w: np.ndarray, threads: int = 1, fmt: str = "f32", hidden: int | None = None) -> None:
        if fmt == "f32":
            if w.ndim != 3 or w.shape[1] != 3 or w.dtype != np.float32 or not w.flags.c_contiguous:
                raise ValueError("SparseFFN wants a C-contiguous float32 [I, 3, H] array")
            self.intermediate, _, self.hidden = w.shape
        elif fmt == "q8":
            if hidden is None or w.dtype != np.int8 or w.ndim != 2 or w.shape[1] != 3 * q8_row_bytes(hidden):
                raise ValueError(
                    "SparseFFN(fmt='q8') wants int8 records [I, 3 * q8_row_bytes(H)] and hidden=H"
                )
            self.intermediate, self.hidden = w.shape[0], hidden
        else:
            raise ValueError(f"unknown kernel format {fmt!r}; expected one of {FORMATS}")
        self.w = np.ascontiguousarray(w)
        self.fmt = fmt
        self._fmt_code = FORMATS.index(fmt)
        self.threads = max(1, int(threads))
        self.lib = library()
        self._call = self.lib.cs_ffn_f32 if fmt == "f32" else self.lib.cs_ffn_q8
        self.scratch = np.zeros(self.threads * self.hidden, np.float32)
        self.act = np.zeros(self.intermediate, np.float32)
        self._idx = np.zeros(self.intermediate, np.int32)
        self._work = np.zeros(2 * self.intermediate + 256, np.float32)
        self._stat = np.zeros(1, np.float32)

    @property
    def nbytes(self) -> int:
        return int(self.w.nbytes)

    def dense_weights(self) -> np.ndarray:
        """fp32 ``[I, 3, H]`` (a view for fp32 records, a dequantized copy for 8-bit ones)."""
        return self.w if self.fmt == "f32" else unpack_q8(self.w, self.hidden)

    def add_to(self, resid: np.ndarray, x: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        """``resid += FFN_idx(x)`` in place (``idx`` sorted int32 channels; None = all)."""
        k = self.intermediate if idx is None else len(idx)
        ptr = None if idx is None else idx.ctypes.data
        if idx is not None and (idx.dtype != np.int32 or not idx.flags.c_contiguous):
            raise ValueError("idx must be a contiguous int32 array")
        rc = self._call(self.w.ctypes.data, self.hidden, self.intermediate, x, ptr, k, resid,
                        self.act.ctypes.data, self.scratch, self.threads)  # fmt: skip
        if rc != 0:
            raise ValueError(f"the {self.fmt} FFN kernel rejected its arguments")
        return resid

    def sensed_add_to(
        self,
        resid: np.ndarray,
        x: np.ndarray,
        phi: np.ndarray,
        decoder: np.ndarray,
        bias: np.ndarray | None,
        k: int,
        hot: int = 0,
    ) -> tuple[np.ndarray, float]:
        """Sense ``y = Φx``, score ``B y + bias``, run the top-``k`` channels (``[0, hot)`` always):
        ``resid += FFN_S(x)``. Returns ``(S, recovery residual)``.
        """
        if len(self._work) < phi.shape[0] + 2 * self.intermediate:
            self._work = np.zeros(phi.shape[0] + 2 * self.intermediate, np.float32)
        got = self.lib.cs_sensed_ffn(
            self.w.ctypes.data, self._fmt_code, self.hidden, self.intermediate, x, phi, decoder,
            None if bias is None else bias.ctypes.data, phi.shape[0], k, hot,
            resid, self._idx, self.act, self._work, self.scratch, self._stat, self.threads,
        )  # fmt: skip
        if got < 0:
            raise ValueError(
                f"the sensed FFN kernel rejected its arguments (k={k}, hot={hot}, m={phi.shape[0]})"
            )
        return self._idx[:got], float(self._stat[0])


def predicted_support(
    x: np.ndarray, phi: np.ndarray, decoder: np.ndarray, bias: np.ndarray | None, k: int, hot: int = 0
) -> np.ndarray:
    """Boolean ``[T, I]`` mask of what the sensed kernel executes for each row of ``x [T, H]``
    (numpy; the same scores and the same tie rule as the kernel).
    """
    scores = (x.astype(np.float32) @ phi.T) @ decoder.T
    if bias is not None:
        scores = scores + bias
    mask = np.zeros(scores.shape, bool)
    mask[:, :hot] = True
    for t in range(len(scores)):
        mask[t, hot + topk_sorted(scores[t, hot:], k - hot)] = True
    return mask


def topk_sorted(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores in increasing index order (the kernel's selection)."""
    s = np.ascontiguousarray(scores, dtype=np.float32)
    idx = np.zeros(max(0, min(k, len(s))), np.int32)
    tmp = np.zeros(len(s), np.float32)
    got = library().cs_topk_sorted(s, len(s), k, idx if len(idx) else np.zeros(1, np.int32), tmp)
    return idx[:got]
