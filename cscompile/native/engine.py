"""Native decode step: the whole token in one C call over the source model's exact GGUF grid.

Why this exists (measured, BENCHMARKS.md "Native decode step"): ONNX Runtime's fast 4-bit
kernel (``MatMulNBits``, accuracy level 4) has integer zero points only, so SmolLM2's Q4_1 grid
(``w = d·q + m``) costs four extra ops per projection input to stay exact, about a quarter of a
token; and its int8 activations cost ~0.4% perplexity. ``csrc/qdecode.c`` reads the grid as it
is (offsets included) with int16 activations, and runs the 30 layers in one OpenMP region.

Scope: Llama-family decoders (RMSNorm, RoPE, SwiGLU, grouped-query attention) and what
:func:`family_features` reads beyond them: RoPE scalings fixed at export (the graph's frequencies
and cos/sin factor in the tables), partial rotary, sliding windows, Q/K/V biases (Qwen2), QK-norm
(Qwen3, Gemma), Gemma 2/3's GeGLU, post-norms, scales and soft-caps. Weights: the GGUF grid the model was fetched from, exactly
(every block type: Q4_0 … Q8_0 and the K-quants, :func:`pack`), else round-to-nearest Q4_1/Q8_0
(:func:`weights_from_model`). Prefill runs chunks of 64 tokens through the same
forward; the fp32 KV cache belongs to each :class:`NativeDecoder` and doubles up to the context.
:meth:`NativeSession.forward_batch` steps several sequences (each its own cache) in one C call.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.clib import load_library
from cscompile.decode.session import SessionBase
from cscompile.errors import UserError
from cscompile.limits import INT32_MAX, check_threads, is_int32
from cscompile.quant.gguf import GRID_TYPES, QK, BlockGrid, GGUFGrid, gguf_name

ABI = 12
_SOURCE = Path(__file__).parent / "csrc" / "qdecode.c"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_vp = ctypes.c_void_p


class _QMat(ctypes.Structure):
    _fields_ = [("codes", _vp), ("d", _vp), ("m", _vp), ("n", ctypes.c_int32), ("k", ctypes.c_int32),
                ("bits", ctypes.c_int32), ("fmt", ctypes.c_int32),
                ("codes_len", ctypes.c_int64), ("d_len", ctypes.c_int64), ("m_len", ctypes.c_int64)]  # fmt: skip


_INTS = ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "inter", "vocab", "max_ctx", "nthreads", "pad")
_PTRS = ("attn_norm", "ffn_norm", "final_norm", "qkv", "o", "gu", "down", "head", "emb", "rope_cos", "rope_sin",
         "kc", "vc", "work", "layer_heads", "head_kv", "layer_inter")  # fmt: skip
#: elements each buffer holds, from the arrays themselves: the C step checks every size against them
_LENS = ("attn_norm_len", "ffn_norm_len", "final_norm_len", "mats_len", "rope_len", "kv_len", "work_len",
         "width_len", "head_kv_len")  # fmt: skip
#: the family features (cs_model's last block; all zero / NULL: Llama)
_FEATURE_PTRS = ("q_norm", "k_norm", "attn_out_norm", "ffn_out_norm", "layer_window", "layer_rope")
#: the optional per-layer arrays of :class:`NativeWeights` and the config flag that says they are there
_EXTRA_NORMS = {
    "q_norm": "qk_norm",
    "k_norm": "qk_norm",
    "attn_out_norm": "post_norms",
    "ffn_out_norm": "post_norms",
    "qkv_bias": "qkv_bias",
}


class _Model(ctypes.Structure):  # the C struct cs_model, field for field
    _fields_ = (
        [(f, ctypes.c_int32) for f in _INTS]
        + [("eps", ctypes.c_float), ("pad2", ctypes.c_float)]
        + [(f, ctypes.c_void_p) for f in _PTRS]
        + [(f, ctypes.c_int64) for f in _LENS]
        + [(f, ctypes.c_void_p) for f in _FEATURE_PTRS]
        + [(f + "_len", ctypes.c_int64) for f in _FEATURE_PTRS]
        + [("act", ctypes.c_int32), ("n_rope", ctypes.c_int32)]
        + [("emb_scale", ctypes.c_float), ("attn_scale", ctypes.c_float)]
        + [("qkv_bias", ctypes.c_void_p), ("qkv_bias_len", ctypes.c_int64)]
        + [("attn_softcap", ctypes.c_float), ("logit_softcap", ctypes.c_float)]
        + [("no_pre_norm", ctypes.c_int32), ("qk_norm_full", ctypes.c_int32)]
    )


_i32, _ci, _i64 = ctypes.c_int32, ctypes.c_int, ctypes.c_int64
#: the C functions and their ctypes signatures (name: (restype, argtypes)); every buffer is
#: passed with its length in elements, checked in C
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "cs_dec_forward": (_ci, [_vp, _vp, _i32, _i32, _vp, _i64, _i32]),
    "cs_dec_forward_sensed": (
        _ci,
        [
            _vp,
            _vp,
            _vp,
            _i64,
            _i32,
            _i32,
            _i32,
            ctypes.c_float,
            _vp,
            _i64,
            _vp,
            _i64,
            _vp,
            _i64,
            _vp,
            _i64,
            _vp,
            _i64,
        ],
    ),
    "cs_dec_gemm": (_ci, [_vp, _vp, _i64, _ci, _vp, _i64, _ci, _vp, _i64]),
    "cs_dec_gemv": (_ci, [_vp, _vp, _i64, _vp, _i64, _ci, _vp, _i64]),
    "cs_dec_forward_batch": (_ci, [_vp, _i32, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _i64]),
    "cs_dec_forward_batch_sensed": (
        _ci,
        [_vp, _i32, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _i64, _i32, ctypes.c_float, _vp]
        + [_vp, _i64] * 5,
    ),
    "cs_dec_max_batch": (_ci, []),
    "cs_dec_work_floats": (ctypes.c_int64, [_vp]),
    "cs_dec_simd": (_ci, []),
    "cs_dec_entropy": (ctypes.c_float, [_vp, _i32]),
}
SIMD_LEVELS = {3: "avx512-vnni", 2: "avx512", 1: "avx2", 0: "scalar"}
#: what the C step's refusals mean (qdecode.c model_error)
C_ERRORS = {
    -1: "a position or token out of range",
    -2: "model sizes that are inconsistent or overflow",
    -3: "a thread count out of range",
    -4: "a buffer smaller than the model needs",
    -5: "a matrix whose shape or buffers do not match its role",
    -6: "a per-layer width out of range",
    -7: "a sensed head (preview, K or tau) that does not fit the model",
    -8: "a family feature (activation, scale, RoPE table, window or norm) out of range",
    -9: "a batch size out of range, or sequences sharing a cache",
}


def _c_refused(what: str, rc: int) -> UserError:
    return UserError(what, f"the C step refused: {C_ERRORS.get(rc, f'code {rc}')}", "consistent sizes")


def library() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is None:
            _lib = load_library(
                "_csdec", _SOURCE, "native decode kernel", "cs_dec_abi_version", ABI, SIGNATURES
            )
        return _lib


def simd_level() -> str:
    """Which code path the installed kernel was compiled with (``-march`` of the install)."""
    return SIMD_LEVELS.get(int(library().cs_dec_simd()), "unknown")


def unavailable() -> str | None:
    """Why the native step should not be the default engine on this machine (None: it should be).

    A kernel that cannot be loaded, or one compiled without AVX2/AVX-512 (the scalar path is
    several times slower than ONNX Runtime), leaves the default to the dense engine.
    """
    try:
        level = simd_level()
    except (UserError, OSError, AttributeError) as exc:
        return f"its kernel could not be loaded ({str(exc)[:160]})"
    if level == "scalar":
        return "its kernel was compiled without AVX2 or AVX-512 (CSCOMPILE_CFLAGS), slower than ONNX Runtime here"
    return None


# -- packing ---------------------------------------------------------------------------------
@dataclass
class PackedMatrix:
    """A block grid in the kernel's row-group layout (see qdecode.c); rows padded to 16.

    Scales ``d`` (and offsets ``m``) are float16 ``[G, nb, 16]`` when the grid's are fp16 values
    (a GGUF's own ``d``/``m``, round-to-nearest), float32 ``[G, nb, 16]`` when not (a K-quant's
    exact ``d·sc`` / ``−dmin·m``), float32 ``[G, nb, 2, 16]`` for a scale per 16 codes (Q6_K;
    offsets then float32 ``[G, nb, 16]``): :attr:`fmt` 0, 1, 2, the C step's ``cs_qmat.fmt``.
    """

    codes: np.ndarray  # uint8
    d: np.ndarray  # float16 / float32 [G, nb, 16], or float32 [G, nb, 2, 16]
    m: np.ndarray | None  # like d ([G, nb, 16]); always for 4 bits, optional for 8
    n: int  # true rows
    k: int
    bits: int

    @property
    def n_padded(self) -> int:
        return int(self.d.shape[0]) * 16

    @property
    def fmt(self) -> int:
        return 0 if self.d.dtype == np.float16 else 2 if self.d.ndim == 4 else 1

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.d.nbytes + (0 if self.m is None else self.m.nbytes))

    def struct(self) -> _QMat:
        return _QMat(
            self.codes.ctypes.data,
            self.d.ctypes.data,
            None if self.m is None else self.m.ctypes.data,
            self.n_padded,
            self.k,
            self.bits,
            self.fmt,
            self.codes.size,
            self.d.size,
            0 if self.m is None else self.m.size,
        )


def _is_fp16(x: np.ndarray) -> bool:
    return bool(np.array_equal(x.astype(np.float16).astype(np.float32), x.astype(np.float32)))


def pack(grid: BlockGrid) -> PackedMatrix:
    """``grid`` ([N, K] codes, per-block scales/offsets) → the kernel's layout, exactly.

    Scales stay fp16 when every scale and offset is an fp16 value (the fast, compact case), else
    float32; a grid with a scale per 16 codes (Q6_K) gets ``fmt`` 2.
    """
    n, k = grid.q.shape
    if k % QK:
        raise UserError("native decoder", f"a matrix has K={k}", f"K a multiple of {QK}")
    nb, g = k // QK, -(-n // 16)
    pad = g * 16 - n
    sub = grid.sub
    if sub not in (16, QK) or grid.scale.shape != (n, k // sub):
        raise UserError(
            "native decoder", f"a grid with a scale per {k / grid.scale.shape[1]:g} codes", "32 or 16"
        )
    if sub == 16 and grid.kind != "Q8_0":
        raise UserError("native decoder", "4-bit codes with a scale per 16", "8-bit codes (Q6_K)")

    def rows(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a

    def per_block(a: np.ndarray) -> np.ndarray:  # [N, nb] → [G, nb, 16]
        return rows(a).reshape(g, 16, nb).transpose(0, 2, 1)

    offset = grid.offset
    if offset is not None and sub == 16:  # offsets are per 32 (the activation block sums)
        if not np.array_equal(offset[:, 0::2], offset[:, 1::2]):
            raise UserError("native decoder", "offsets that differ within a block of 32", "one offset per 32")
        offset = offset[:, 0::2]
    if sub == 16:
        d = np.ascontiguousarray(
            rows(grid.scale.astype(np.float32)).reshape(g, 16, nb, 2).transpose(0, 2, 3, 1)
        )
        dt: Any = np.float32
    else:
        dt = np.float16 if _is_fp16(grid.scale) and (offset is None or _is_fp16(offset)) else np.float32
        d = np.ascontiguousarray(per_block(grid.scale).astype(dt))
    m = None if offset is None else np.ascontiguousarray(per_block(offset).astype(dt))
    if grid.kind == "Q4_1":
        if m is None:
            raise UserError("native decoder", "a 4-bit grid without offsets", "Q4_1 (offsets)")
        q = rows(grid.q.astype(np.uint8)).reshape(g, 16, nb, 8, 4).transpose(0, 2, 3, 1, 4)
        codes = q[..., 0:2] | (q[..., 2:4] << 4)  # [G, nb, t, r, i]
        return PackedMatrix(np.ascontiguousarray(codes).reshape(-1), d, m, n, k, 4)
    if grid.kind == "Q8_0":
        q8 = rows(grid.q.astype(np.int8)).reshape(g, 16, nb, 16, 2).transpose(0, 2, 3, 1, 4)
        codes = np.ascontiguousarray(q8).view(np.uint8).reshape(-1)
        return PackedMatrix(codes, d, m, n, k, 8)
    raise UserError("native decoder", f"a {grid.kind} grid", "Q4_1 or Q8_0")


def unpack(p: PackedMatrix) -> BlockGrid:
    """The inverse of :func:`pack`: the ``[n, k]`` grid back from the kernel's layout."""
    if p.bits == PLANES:
        p = from_planes(p)
    g, nb = p.d.shape[0], p.k // QK
    if p.fmt == 2:  # [G, nb, 2, 16] → [N, 2·nb]
        scale = p.d.astype(np.float32).transpose(0, 3, 1, 2).reshape(g * 16, 2 * nb)[: p.n]
    else:
        scale = p.d.astype(np.float32).transpose(0, 2, 1).reshape(g * 16, nb)[: p.n]
    off = None if p.m is None else p.m.astype(np.float32).transpose(0, 2, 1).reshape(g * 16, nb)[: p.n]
    if off is not None and p.fmt == 2:
        off = np.repeat(off, 2, axis=1)
    off = None if off is None else np.ascontiguousarray(off)
    if p.bits == 4:
        assert off is not None
        c = p.codes.reshape(g, nb, 8, 16, 2)
        q = np.concatenate([c & 15, c >> 4], axis=-1)  # [G, nb, t, r, 4]: i = 0,1 low, 2,3 high
        q = q.transpose(0, 3, 1, 2, 4).reshape(g * 16, p.k)[: p.n]
        return BlockGrid("Q4_1", np.ascontiguousarray(q), np.ascontiguousarray(scale), off)
    q8 = p.codes.view(np.int8).reshape(g, nb, 16, 16, 2).transpose(0, 3, 1, 2, 4).reshape(g * 16, p.k)[: p.n]
    return BlockGrid("Q8_0", np.ascontiguousarray(q8), np.ascontiguousarray(scale), off)


#: ``bits`` of a Q8_0 head stored as two nibble planes (qdecode.c CS_PLANES): the high plane is
#: the sensed head's 4-bit preview, both planes the exact head; the LM head (and a tied
#: embedding) only
PLANES = 48


def to_planes(p: PackedMatrix) -> PackedMatrix:
    """A Q8_0 matrix's codes c = 16 h + l (h = c >> 4 in [-8, 7], l = c & 15) as two nibble planes
    in the Q4_1 byte order: the high plane (h, 4-bit two's complement) of every row group and
    block, then the low plane; the same bytes and scales (qdecode.c ``qgemv_planes``). Q8_0's
    byte [j][2r+i] holds column 2j + i, Q4_1's [t][2r+i] columns 4t + i and 4t + 2 + i: plane
    byte [t] = the nibbles of Q8_0 bytes [2t] (low) and [2t+1] (high), no transpose.
    """
    if p.bits != 8 or p.fmt != 0 or p.m is not None:
        raise UserError(
            "bit-plane head", f"a {p.bits}-bit matrix (scale format {p.fmt})", "a Q8_0 head with fp16 scales"
        )
    u = p.codes.reshape(-1, 8, 2, 32)  # [group x block, t, j - 2t, 2r + i]
    a, b = u[:, :, 0], u[:, :, 1]
    out = np.empty(p.codes.size, np.uint8)
    hi, lo = (x.reshape(a.shape) for x in np.split(out, 2))
    np.right_shift(a, 4, out=hi)
    hi |= b & 0xF0
    np.bitwise_and(a, 0x0F, out=lo)
    lo |= b << 4
    return PackedMatrix(out, p.d, None, p.n, p.k, PLANES)


def from_planes(p: PackedMatrix) -> PackedMatrix:
    """The inverse of :func:`to_planes`: the Q8_0 matrix."""
    hi, lo = (a.reshape(-1, 8, 32) for a in np.split(p.codes, 2))
    u = np.stack([(lo & 0x0F) | (hi << 4), (lo >> 4) | (hi & 0xF0)], axis=2)  # [gb, t, 2, 32]
    return PackedMatrix(u.reshape(-1), p.d, None, p.n, p.k, 8)


def head_as_planes(w: NativeWeights) -> NativeWeights:
    """``w`` with its LM head as bit planes (a tied embedding reads them too; an untied one keeps
    its grid); ``w`` itself when it already is.
    """
    if w.head.bits == PLANES:
        return w
    return dataclasses.replace(w, head=to_planes(w.head))


def regrid(grid: BlockGrid, bits: int) -> BlockGrid:
    """``grid`` at ``bits`` (4: Q4_1, 8: Q8_0): itself when it already is, else re-rounded from its values."""
    kind = "Q4_1" if bits == 4 else "Q8_0"
    return grid if grid.kind == kind else rtn_grid(grid.dequantize(), kind)


def stack(grids: list[BlockGrid]) -> BlockGrid:
    """Projections of one input as one grid, exactly: mixed code widths widen the 4-bit codes to
    8 bits, mixed scale granularities repeat the per-32 scales per 16, missing offsets are 0.
    """
    if len({g.kind for g in grids}) > 1:
        grids = [BlockGrid("Q8_0", g.q.astype(np.int8), g.scale, g.offset) for g in grids]
    if len({g.sub for g in grids}) > 1:
        grids = [g if g.sub == 16 else BlockGrid(g.kind, g.q, np.repeat(g.scale, 2, axis=1),
                 None if g.offset is None else np.repeat(g.offset, 2, axis=1)) for g in grids]  # fmt: skip
    off = None
    if any(g.offset is not None for g in grids):
        off = np.concatenate([np.zeros_like(g.scale) if g.offset is None else g.offset for g in grids])
    return BlockGrid(
        grids[0].kind, np.concatenate([g.q for g in grids]), np.concatenate([g.scale for g in grids]), off
    )


def entropy(logits: np.ndarray) -> float:
    """Entropy (nats) of softmax(``logits``) in one vectorized C pass (the switching controller's
    signal; :func:`cscompile.motifs.runtime.entropy` is the numpy version).
    """
    z = np.ascontiguousarray(logits, np.float32).reshape(-1)
    return float(library().cs_dec_entropy(z.ctypes.data, len(z)))


def gemv(mat: PackedMatrix, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """``W x`` through the kernel (one vector): for tests and the kernel benchmark."""
    lib = library()
    x = np.ascontiguousarray(x, np.float32)
    if x.shape != (mat.k,):
        raise UserError("native gemv", f"x of shape {x.shape}", f"({mat.k},)")
    threads = check_threads(threads, "native gemv threads")
    y = np.zeros(mat.n_padded, np.float32)
    work = np.zeros(mat.k + 64, np.float32)
    s = mat.struct()
    rc = lib.cs_dec_gemv(ctypes.addressof(s), x.ctypes.data, x.size, y.ctypes.data, y.size, threads,
                         work.ctypes.data, work.size)  # fmt: skip
    if rc:
        raise _c_refused("native gemv", rc)
    return y[: mat.n]


def gemm(mat: PackedMatrix, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """``X W^T`` through the multi-token (prefill) kernel: ``x [T, K]`` → ``[T, N]``."""
    lib = library()
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != mat.k:
        raise UserError("native gemm", f"x of shape {x.shape}", f"(T, {mat.k})")
    threads = check_threads(threads, "native gemm threads")
    t = x.shape[0]
    y = np.zeros((t, mat.n_padded), np.float32)
    work = np.zeros(t * (mat.k + 32) // 2 + 64 + 2 * t * (mat.k // QK + 1), np.float32)
    s = mat.struct()
    rc = lib.cs_dec_gemm(ctypes.addressof(s), x.ctypes.data, x.size, t, y.ctypes.data, y.size, threads,
                         work.ctypes.data, work.size)  # fmt: skip
    if rc:
        raise _c_refused("native gemm", rc)
    return y[:, : mat.n]


# -- weights of a model ------------------------------------------------------------------------
@dataclass
class NativeWeights:
    """Everything the decode step reads, as numpy arrays (kept alive by this object)."""

    # n_layers, hidden, n_heads, n_kv, head_dim, inter, vocab, eps, rope_theta[, width]
    config: dict[str, Any]
    attn_norm: np.ndarray  # [L, H] float32
    ffn_norm: np.ndarray
    final_norm: np.ndarray
    qkv: list[PackedMatrix | None]  # None: the layer's attention is dropped
    o: list[PackedMatrix | None]
    gu: list[PackedMatrix | None]  # None: the layer's FFN is dropped
    down: list[PackedMatrix | None]
    head: PackedMatrix
    emb: PackedMatrix | None = None  # None: the head's codes (tied)
    # family features (config "qk_norm" / "post_norms"; None: Llama)
    q_norm: np.ndarray | None = None  # [L, head_dim] float32: per-head RMSNorm of the queries
    k_norm: np.ndarray | None = None  # [L, head_dim]
    attn_out_norm: np.ndarray | None = None  # [L, H]: RMSNorm of the O-projection output
    ffn_out_norm: np.ndarray | None = None  # [L, H]: RMSNorm of the down output
    #: config "qkv_bias": [L, (n_heads + 2 n_kv) head_dim] float32, the bias added to each layer's
    #: Q/K/V rows (Qwen2); a narrowed layer's kept rows first, zeros after
    qkv_bias: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        mats = [*self.qkv, *self.o, *self.gu, *self.down, self.head, self.emb]
        extra = sum(a.nbytes for a in self.extra_norms().values())
        return (
            sum(m.nbytes for m in mats if m is not None)
            + self.attn_norm.nbytes * 2
            + self.final_norm.nbytes
            + extra
        )

    def extra_norms(self) -> dict[str, np.ndarray]:
        """The family arrays (norms, Q/K/V bias) this model has (name: array)."""
        return {k: getattr(self, k) for k in _EXTRA_NORMS if getattr(self, k) is not None}

    def width(self) -> tuple[list[list[int]], list[int]]:
        """Per layer: the query heads kept (source indices; [] = attention dropped) and the FFN
        channels kept (0 = FFN dropped). A model without ``config["width"]`` is whole.
        """
        return layer_width(self.config)


def matrix_shapes(c: dict[str, Any]) -> dict[str, list[tuple[int, int] | None]]:
    """Per layer matrix (qkv, o, gu, down): each layer's (rows, columns) under the config's width,
    None where the unit is dropped.
    """
    heads, ffn = layer_width(c)
    H, nkv, hd = c["hidden"], c["n_kv"], c["head_dim"]
    kv = keeps_kv(c)
    return {
        "qkv": [((len(h) + 2 * nkv) * hd, H) if h or kv else None for h in heads],
        "o": [(H, len(h) * hd) if h else None for h in heads],
        "gu": [(2 * f, H) if f else None for f in ffn],
        "down": [(H, f) if f else None for f in ffn],
    }


def keeps_kv(c: dict[str, Any]) -> bool:
    """Whether layers with every head dropped still write their K/V (``width.kv``: a motif the
    switching runtime runs for some tokens only, so the cache stays whole for the others).
    """
    wd = c.get("width")
    kv = wd.get("kv", False) if isinstance(wd, dict) else False
    if not isinstance(kv, bool):
        raise UserError("native weights: config width.kv", f"{kv!r}", "true or false")
    return kv


def layer_width(c: dict[str, Any]) -> tuple[list[list[int]], list[int]]:
    """The width recorded in a native config (see :meth:`NativeWeights.width`); checked."""
    L, nh, inter = c["n_layers"], c["n_heads"], c["inter"]
    wd = c.get("width")
    if wd is None:
        return [list(range(nh)) for _ in range(L)], [inter] * L
    bad = UserError(
        "native weights: config width",
        f"{str(wd)[:120]}",
        f"{{heads: {L} lists of distinct query heads in [0, {nh}), ffn: {L} multiples of {QK} in [0, {inter}]}}",
    )
    if (
        not isinstance(wd, dict)
        or not isinstance(wd.get("heads"), list)
        or not isinstance(wd.get("ffn"), list)
    ):
        raise bad
    heads, ffn = wd["heads"], wd["ffn"]
    if len(heads) != L or len(ffn) != L:
        raise bad
    for hs, f in zip(heads, ffn):
        if not isinstance(hs, list) or any(not isinstance(h, int) or isinstance(h, bool) for h in hs):
            raise bad
        if len(set(hs)) != len(hs) or any(not 0 <= h < nh for h in hs):
            raise bad
        if not isinstance(f, int) or isinstance(f, bool) or not 0 <= f <= inter or f % QK:
            raise bad
    return [list(h) for h in heads], list(ffn)


def _check_matrix(m: PackedMatrix, what: str, n: int, k: int, planes: bool = False) -> None:
    def bad(got: str, want: str) -> UserError:
        return UserError(f"native weights: {what}", got, want)

    if planes and m.bits == PLANES:  # the head's bit planes: Q8_0's bytes and fp16 scales
        if m.fmt != 0 or m.m is not None:
            raise bad(f"is bit planes with scale format {m.fmt}", "fp16 scales and no offsets")
        m = dataclasses.replace(m, bits=8)
    if m.n != n or m.k != k or k % QK or m.bits not in (4, 8):
        raise bad(f"is {m.n}×{m.k} at {m.bits} bits", f"{n}×{k} (K a multiple of {QK}) at 4 or 8 bits")
    g, nb = -(-n // 16), k // QK
    per16 = m.d.dtype == np.float32 and m.d.shape == (g, nb, 2, 16) and m.bits == 8
    if (
        m.d.dtype not in (np.float16, np.float32)
        or (m.d.shape != (g, nb, 16) and not per16)
        or not m.d.flags.c_contiguous
    ):
        raise bad(
            f"has scales {m.d.dtype} {m.d.shape}",
            f"float16 or float32 {(g, nb, 16)}, or float32 {(g, nb, 2, 16)} at 8 bits, contiguous",
        )
    if m.m is not None and (m.m.dtype != m.d.dtype or m.m.shape != (g, nb, 16) or not m.m.flags.c_contiguous):
        raise bad(
            f"has offsets {m.m.dtype} {m.m.shape}", f"{m.d.dtype} {(g, nb, 16)} like its scales, contiguous"
        )
    if m.bits == 4 and m.m is None:
        raise bad("has no offsets", f"{m.d.dtype} {(g, nb, 16)} offsets (4-bit codes)")
    size = g * nb * (256 if m.bits == 4 else 512)
    if m.codes.dtype != np.uint8 or m.codes.shape != (size,) or not m.codes.flags.c_contiguous:
        raise bad(f"has codes {m.codes.dtype} {m.codes.shape}", f"uint8 ({size},), contiguous")


#: a sane decoder's shape, relative to its hidden size (the widest published: attention ~1.3x,
#: FFN 8x); with ``hidden`` bounded by the weights file, every allocation sized from the config is too
MAX_ATTENTION_WIDTH, MAX_FFN_WIDTH = 8, 16
_CONFIG_INTS = ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "inter", "vocab")
#: the gated FFN's activation (config "activation"; absent: silu) and its code in the C struct
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
#: every setting a native config may have; another (e.g. a logit soft-cap) is one the step does not compute
_CONFIG_KEYS = frozenset(
    {*_CONFIG_INTS, "eps", "rope_theta", "weights", "width", "activation", "qk_norm", "post_norms",
     "embedding_scale", "attention_scale", "layer_window", "layer_rope_theta", "qkv_bias", "rotary_dim",
     "rope_inv_freq", "rope_factor", "layer_rope_table", "attention_softcap", "logit_softcap",
     "no_pre_norms", "qk_norm_full"}
)  # fmt: skip


def _positive_float(x: Any) -> bool:
    return isinstance(x, float) and bool(np.isfinite(x)) and x > 0


def _check_features(c: dict[str, Any], L: int) -> None:
    """The family settings of a native config (each absent: Llama's), checked like its integers."""

    def bad(what: str, got: Any, want: str) -> UserError:
        return UserError("native weights: config", f"{what} = {str(got)[:120]}", want)

    unknown = sorted(set(c) - _CONFIG_KEYS)
    if unknown:
        raise bad(
            "setting",
            unknown[0],
            f"only settings the native step computes ({', '.join(sorted(_CONFIG_KEYS))})",
        )
    act = c.get("activation", "silu")
    if act not in ACTIVATIONS:
        raise bad("activation", act, f"one of {list(ACTIVATIONS)}")
    for flag in ("qk_norm", "post_norms", "qkv_bias", "no_pre_norms", "qk_norm_full"):
        if not isinstance(c.get(flag, False), bool):
            raise bad(flag, c[flag], "true or false")
    if c.get("no_pre_norms") and not c.get("post_norms"):  # OLMo2: the branch outputs are normed instead
        raise bad("no_pre_norms", True, "only with post_norms (norms on the branch outputs)")
    if c.get("qk_norm_full") and not c.get("qk_norm"):
        raise bad("qk_norm_full", True, "only with qk_norm")
    heads = (c.get("width") or {}).get("heads") if isinstance(c.get("width"), dict) else None
    whole = [[], list(range(c.get("n_heads", 0)))]
    if c.get("qk_norm_full") and isinstance(heads, list) and any(h not in whole for h in heads):
        raise bad(
            "width heads", heads, "every layer's heads kept in order, or none (a QK-norm over the whole Q)"
        )
    for name in ("embedding_scale", "attention_scale", "attention_softcap", "logit_softcap"):
        if name in c and not _positive_float(c[name]):
            raise bad(name, c[name], "a positive float")
    win = c.get("layer_window")
    if win is not None and (
        not isinstance(win, list)
        or len(win) != L
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= INT32_MAX for x in win)
    ):
        raise bad("layer_window", win, f"{L} integers in [0, {INT32_MAX}] (0: the whole context)")
    thetas = c.get("layer_rope_theta")
    if thetas is not None and (
        not isinstance(thetas, list) or len(thetas) != L or not all(_positive_float(t) for t in thetas)
    ):
        raise bad("layer_rope_theta", thetas, f"{L} positive floats (each layer's RoPE base)")
    tables = ("rotary_dim", "rope_inv_freq", "rope_factor", "layer_rope_table")
    if any(k in c for k in tables):
        if not all(k in c for k in tables) or thetas is not None:
            raise bad("RoPE tables", sorted(k for k in c if k in tables),
                      f"all of {', '.join(tables)} and no layer_rope_theta")  # fmt: skip
        hd, rot, inv, fac, idx = (
            c["head_dim"],
            c["rotary_dim"],
            c["rope_inv_freq"],
            c["rope_factor"],
            c["layer_rope_table"],
        )
        if not is_int32(rot) or not 2 <= rot <= hd or rot % 2:
            raise bad("rotary_dim", rot, f"an even integer in [2, {hd}] (head_dim)")
        if (
            not isinstance(inv, list)
            or not 1 <= len(inv) <= L
            or not all(
                isinstance(t, list) and len(t) == rot // 2
                and all(isinstance(x, float) and np.isfinite(x) and x >= 0 for x in t)
                for t in inv
            )
        ):  # fmt: skip
            raise bad(
                "rope_inv_freq",
                inv,
                f"1 to {L} lists of {rot // 2} finite floats >= 0 (the tables' frequencies)",
            )
        if not isinstance(fac, list) or len(fac) != len(inv) or not all(_positive_float(f) for f in fac):
            raise bad("rope_factor", fac, f"{len(inv)} positive floats (each table's factor on cos and sin)")
        if (
            not isinstance(idx, list)
            or len(idx) != L
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(inv) for i in idx)
        ):
            raise bad("layer_rope_table", idx, f"{L} table indices in [0, {len(inv)})")


def rope_layout(c: dict[str, Any]) -> tuple[int, list[int]]:
    """How many RoPE tables a native config has, and each layer's table index."""
    if "rope_inv_freq" in c:
        return len(c["rope_inv_freq"]), list(c["layer_rope_table"])
    bases, index = rope_bases(c)
    return len(bases), index


def rope_bases(c: dict[str, Any]) -> tuple[list[float], list[int]]:
    """The distinct RoPE bases of a native config (table order) and each layer's table index."""
    L = c["n_layers"]
    per_layer = c.get("layer_rope_theta") or [float(c["rope_theta"])] * L
    bases: list[float] = []
    for t in per_layer:
        if t not in bases:
            bases.append(t)
    return bases, [bases.index(t) for t in per_layer]


def check_config(c: Any, file_bytes: int | None = None) -> None:
    """A native config's integers, checked before anything is sized from them: each fits the C
    step's int32 fields (ctypes would wrap it silently), so do the strides derived from them, the
    shape is a sane decoder's, and (weights on disk) the norms and head it implies fit in the
    ``file_bytes`` of ``weights.bin``.
    """
    if not isinstance(c, dict):
        raise UserError("native weights: config", f"{str(c)[:80]}", "an object")
    if not all(is_int32(c.get(key)) for key in _CONFIG_INTS):
        raise UserError("native weights: config", f"{ {key: c.get(key) for key in _CONFIG_INTS} }",
                        f"integers in [1, {INT32_MAX}]")  # fmt: skip
    L, H, nh, nkv, hd, inter, vocab = (int(c[key]) for key in _CONFIG_INTS)
    if H % 16 or nh % nkv or hd % 2 or inter % QK or H % QK:
        raise UserError(
            "native weights: config",
            f"hidden {H}, heads {nh}/{nkv}, head_dim {hd}, FFN {inter}",
            f"hidden a multiple of 32, heads a multiple of KV heads, even head_dim, FFN a multiple of {QK}",
        )
    if (nh + 2 * nkv) * hd + 16 > INT32_MAX or 2 * inter + 16 > INT32_MAX or vocab + 15 > INT32_MAX:
        raise UserError("native weights: config", f"heads {nh}/{nkv} of {hd}, FFN {inter}, vocab {vocab}",
                        "projection sizes below 2^31")  # fmt: skip
    if nh * hd > MAX_ATTENTION_WIDTH * H or inter > MAX_FFN_WIDTH * H:
        raise UserError(
            "native weights: config",
            f"attention width {nh}×{hd} and FFN {inter} for hidden {H}",
            f"at most {MAX_ATTENTION_WIDTH}× and {MAX_FFN_WIDTH}× hidden (a Llama-family decoder)",
        )
    _check_features(c, L)
    if file_bytes is not None and 4 * (2 * L + 1) * H + vocab * H // 2 > file_bytes:
        raise UserError(
            "native weights: config",
            f"{L} layers of hidden {H} and a vocabulary of {vocab} (at least "
            f"{4 * (2 * L + 1) * H + vocab * H // 2} bytes) in a {file_bytes}-byte weights file",
            "a config that matches its weights",
        )


def validate(w: NativeWeights) -> None:
    """Every size the C step relies on, checked (weights may come from a bundle on disk)."""
    c = w.config
    check_config(c)
    L, H, nh, nkv, hd, inter, vocab = (c[key] for key in _CONFIG_INTS)
    for name in ("eps",) if "rope_inv_freq" in c else ("eps", "rope_theta"):  # explicit tables: θ unused
        if not isinstance(c.get(name), float) or not np.isfinite(c[name]) or c[name] <= 0:
            raise UserError("native weights: config", f"{name} = {c.get(name)!r}", "a positive float")
    for name, shapes in matrix_shapes(c).items():
        mats = getattr(w, name)
        if len(mats) != L:
            raise UserError(f"native weights: {name}", f"has {len(mats)} layers", f"{L}")
        for i, (m, dims) in enumerate(zip(mats, shapes)):
            if dims is None:
                if m is not None:
                    raise UserError(
                        f"native weights: layer {i} {name}", "is present", "none (the unit is dropped)"
                    )
                continue
            if m is None:
                raise UserError(
                    f"native weights: layer {i} {name}", "is missing", f"a {dims[0]}×{dims[1]} matrix"
                )
            _check_matrix(m, f"layer {i} {name}", *dims)
    _check_matrix(w.head, "head", vocab, H, planes=True)
    if w.emb is not None:
        _check_matrix(w.emb, "embedding", vocab, H, planes=True)  # planes: a derived point's tied head
    for name, arr, shape in (("attn_norm", w.attn_norm, (L, H)), ("ffn_norm", w.ffn_norm, (L, H)),
                             ("final_norm", w.final_norm, (H,))):  # fmt: skip
        if arr.dtype != np.float32 or arr.shape != shape:
            raise UserError(f"native weights: {name}", f"is {arr.dtype} {arr.shape}", f"float32 {shape}")
    for name, flag in _EXTRA_NORMS.items():
        arr = getattr(w, name)
        if (arr is not None) != c.get(flag, False):
            raise UserError(f"native weights: {name}", "is present" if arr is not None else "is missing",
                            f"present exactly when the config's {flag} is true")  # fmt: skip
        full = bool(c.get("qk_norm_full"))
        shape = (L, {"q_norm": nh * hd if full else hd, "k_norm": nkv * hd if full else hd,
                     "qkv_bias": (nh + 2 * nkv) * hd}.get(name, H))  # fmt: skip
        if arr is not None and (arr.dtype != np.float32 or arr.shape != shape):
            raise UserError(f"native weights: {name}", f"is {arr.dtype} {arr.shape}", f"float32 {shape}")


def _rope_theta(model_dir: Path) -> float:
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    scaling = cfg.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise UserError("native decoder", f"RoPE scaling {scaling}", "plain RoPE (no scaling)")
    return float((cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def _config_rope(model_dir: Path) -> None:
    """config.json's RoPE settings: the kinds whose frequencies the exported graph holds (read from it)."""
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    params = cfg.get("rope_parameters") or {}
    items = (
        [*params.items()]
        if all(isinstance(p, dict) for p in params.values())
        else [("rope_parameters", params)]
    )
    for kind, p in [*items, ("rope_scaling", cfg.get("rope_scaling"))]:
        if not isinstance(p, dict):
            continue
        t = p.get("rope_type") or p.get("type")
        if t not in FIXED_ROPE:
            why = ROPE_REFUSED.get(t, "a RoPE scaling the step does not know")
            raise UserError("native decoder", f"RoPE scaling {kind} '{t}' ({why})",
                            f"RoPE fixed at export ({', '.join(k for k in FIXED_ROPE if k)})")  # fmt: skip


#: config.json RoPE kinds whose frequencies and cos/sin factor are fixed at export (the graph holds them)
FIXED_ROPE = (None, "default", "linear", "llama3", "yarn")
#: why the others are not run (the exporter refuses them too)
ROPE_REFUSED = {
    "dynamic": "frequencies that change with the sequence length past the original context",
    "longrope": "short/long frequency tables switched by the sequence length",
}


def _graph_rope_freqs(model: Any) -> list[np.ndarray]:
    """The distinct RoPE frequency constants of a graph: 1-D constants multiplied with the (cast,
    reshaped) position ids (``Mul``, or transformers' ``MatMul`` of inv_freq and positions).
    """
    from cscompile.passes.graph_utils import carried_const

    pos = next((v for v in model.graph.inputs if v.name == "position_ids"), None)
    found: list[np.ndarray] = []
    stack, seen = ([pos] if pos is not None else []), set()
    while stack:
        v = stack.pop()
        for node, _ in v.uses():
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in ("Mul", "MatMul"):
                for i in node.inputs:
                    arr = carried_const(i)  # optimum's export expands and casts the table first
                    if arr is not None and arr.size > 1 and np.issubdtype(arr.dtype, np.floating):
                        inv = np.asarray(arr, np.float64).reshape(-1)
                        if not any(inv.shape == f.shape and np.array_equal(inv, f) for f in found):
                            found.append(inv)
            if node.op_type in ("Cast", "Unsqueeze", "Reshape", "Expand", "MatMul", "Transpose"):
                stack.extend(node.outputs)
    return found


def _rope_features(um: Any, model: Any, model_dir: Path, refuse: Any) -> dict[str, Any]:
    """Each layer's RoPE, as discovery and the graph show it: plain bases (``layer_rope_theta``),
    or explicit tables (``rope_inv_freq``: the frequencies of the first ``rotary_dim`` channels,
    ``rope_factor``: the factor on cos/sin, e.g. YaRN's; ``layer_rope_table``).
    """
    _config_rope(model_dir)
    hd = um.layers[0].attention.head_dim
    rots = {layer.attention.rotary_dim for layer in um.layers}
    if len(rots) != 1 or None in rots:
        raise refuse(f"rotary widths {sorted(map(str, rots))} (not one, read from the graph)")
    rot = int(rots.pop())
    if not 2 <= rot <= hd or rot % 2:
        raise refuse(f"partial rotary ({rot} of {hd})")
    plain = [
        a.rope_base if a.rope_scale is None and rot == hd else None for a in (x.attention for x in um.layers)
    ]
    if all(b is not None for b in plain):
        thetas = [float(b) for b in plain]  # type: ignore[arg-type]
        full = [t for t, x in zip(thetas, um.layers) if not x.attention.window]  # the global layers' base
        return {"rope_theta": full[0] if full else thetas[0], "layer_rope_theta": thetas}
    graph_tables = None
    per_layer: list[tuple[tuple[float, ...], float]] = []
    for layer in um.layers:
        a = layer.attention
        if a.rope_base is not None:
            inv = 1.0 / (float(a.rope_base) ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
        else:
            if graph_tables is None:
                found = [] if model is None else _graph_rope_freqs(model)
                graph_tables = [f for f in found if f.size == rot // 2]
            odd = [f for f in graph_tables if not _geometric(f)]
            if len(odd) != 1:
                raise refuse(
                    f"layer {layer.index} RoPE frequencies not θ^(-2i/d): {len(odd)} such tables in the graph"
                )
            inv = odd[0]
        if not np.all(np.isfinite(inv)) or np.any(inv < 0):
            raise refuse(f"layer {layer.index} RoPE frequencies {inv[:4]}...")
        f = float(a.rope_scale) if a.rope_scale is not None else 1.0
        if not (np.isfinite(f) and f > 0):
            raise refuse(f"layer {layer.index} RoPE cos/sin scaled by {f:g}")
        per_layer.append((tuple(float(x) for x in inv), f))
    tables = list(dict.fromkeys(per_layer))
    return {
        "rotary_dim": rot,
        "rope_inv_freq": [list(t[0]) for t in tables],
        "rope_factor": [t[1] for t in tables],
        "layer_rope_table": [tables.index(p) for p in per_layer],
    }


def _geometric(inv: np.ndarray) -> bool:
    """Whether ``inv`` is θ^(-2i/d) for some θ (discovery's reading: a plain table)."""
    if inv.size < 2 or inv[0] != 1.0 or not np.all(inv > 0):
        return False
    rot = 2 * inv.size
    base = inv[-1] ** (-rot / (2 * (inv.size - 1)))
    return bool(np.allclose(inv, base ** (-np.arange(inv.size) * 2.0 / rot), rtol=1e-4))


def family_features(um: Any, model_dir: Path, model: Any = None) -> dict[str, Any]:
    """The config settings of the family features a decoder needs (none for a plain Llama), or a
    one-line refusal naming the first setting the native step does not compute.

    Read from what discovery found in the graph (docs/families.md): a SwiGLU (SiLU) or GeGLU
    (tanh GELU) FFN, weighted RMSNorms (QK-norm per head or over the whole projection, norms on
    the branch outputs, and no norms before the branches where those are there: OLMo2; each on
    every layer or none), one attention scale, the embedding scale, each layer's sliding window, biases on Q/K/V
    (none elsewhere), RoPE from each layer's frequencies and cos/sin factor (``model``: the graph,
    whose frequency constant a RoPE scaling's layers use) over the first ``rotary_dim`` channels.
    Refused: a logit soft-cap (Gemma 2), LayerNorm, other activations, anything unread.
    """
    biased = any(p.bias is not None for x in um.layers for p in (x.attention.q, x.attention.k, x.attention.v))
    if um.architecture == "llama" and not um.llama_deviations() and not biased:
        return {}
    want = "a decoder whose settings the native step computes (docs/families.md)"
    if um.architecture not in ("llama", "gemma3", "decoder"):
        raise UserError("native decoder", f"architecture '{um.architecture}'", want)

    def refuse(what: str) -> UserError:
        return UserError("native decoder", what, want)

    if um.logit_softcap is not None and not um.logit_softcap > 0:
        raise refuse(f"logit soft-cap {um.logit_softcap:g}")
    if um.embedding_scale is not None and not um.embedding_scale > 0:
        raise refuse(f"embedding scale {um.embedding_scale}")
    if um.final_norm.kind != "rms" or um.final_norm.weight is None or um.final_norm.bias is not None:
        raise refuse(f"final norm {um.final_norm}")
    mlps = {(x.mlp.kind, x.mlp.activation) for x in um.layers if x.ffn}
    for layer in um.layers:
        a, m, i = layer.attention, layer.mlp, layer.index
        if layer.ffn and (
            len(mlps) != 1 or (m.kind, m.activation) not in (("swiglu", "silu"), ("geglu", "gelu_tanh"))
        ):
            raise refuse(f"layer {i} MLP {m.kind} ({m.activation})")
        if not a.rope or a.fused_qkv:
            raise refuse(f"layer {i} attention without RoPE or with a fused QKV projection")
        l0_ = um.layers[0]
        pre = {layer.input_norm.kind, layer.post_attention_norm.kind}
        if (
            ("none" in pre) != (l0_.input_norm.kind == "none")
            or pre == {"none", "rms"}
            or ("none" in pre and (layer.attn_output_norm is None or layer.mlp_output_norm is None))
        ):
            raise refuse(f"layer {i} no norm before one branch only, or not on every layer")
        if a.qk_norm_full != l0_.attention.qk_norm_full:
            raise refuse(f"layer {i} QK-norm over the full projection width (not on every layer)")
        norms = (
            {}
            if "none" in pre
            else {"input norm": layer.input_norm, "pre-FFN norm": layer.post_attention_norm}
        )
        for what, opt in (("attention output norm", layer.attn_output_norm), ("FFN output norm", layer.mlp_output_norm),
                          ("Q norm", a.q_norm), ("K norm", a.k_norm)):  # fmt: skip
            first = um.layers[0]
            on = {"attention output norm": first.attn_output_norm, "FFN output norm": first.mlp_output_norm,
                  "Q norm": first.attention.q_norm, "K norm": first.attention.k_norm}[what]  # fmt: skip
            if (opt is None) != (on is None):
                raise refuse(f"layer {i} {what} {opt} (not on every layer)")
            if opt is not None:
                norms[what] = opt
        for what, n in norms.items():
            if n is None or n.kind != "rms" or n.weight is None or n.bias is not None:
                raise refuse(f"layer {i} {what} {n} (not a weighted RMSNorm)")
        if (layer.attn_output_norm is None) != (layer.mlp_output_norm is None):
            raise refuse(f"layer {i} norm on one branch output only")
        if (a.q_norm is None) != (a.k_norm is None):
            raise refuse(f"layer {i} a norm on Q or K only")
        if a.score_scale is None:
            raise refuse(f"layer {i} attention scale (not one constant)")
        if a.mask_group != 0 and a.window is None:
            raise refuse(f"layer {i} attention mask (group {a.mask_group}) whose window could not be read")
        if a.o.bias is not None:
            raise refuse(f"projection '{a.o.node}' has a bias")
    scales = {x.attention.score_scale for x in um.layers}
    if len(scales) != 1:
        raise refuse(f"attention scales {sorted(scales)} differ by layer")  # type: ignore[type-var]
    caps = {x.attention.attn_softcap for x in um.layers}
    if len(caps) != 1 or not all(c is None or c > 0 for c in caps):
        raise refuse(f"attention soft-caps {sorted(map(str, caps))} (not one on every layer)")
    cap = caps.pop()
    l0 = um.layers[0]
    out: dict[str, Any] = {
        "activation": "gelu_tanh" if ("geglu", "gelu_tanh") in mlps else "silu",
        "qk_norm": l0.attention.q_norm is not None,
        "post_norms": l0.attn_output_norm is not None,
        **({"no_pre_norms": True} if l0.input_norm.kind == "none" else {}),
        **({"qk_norm_full": True} if l0.attention.qk_norm_full else {}),
        "attention_scale": float(scales.pop()),  # type: ignore[arg-type]
        "layer_window": [int(x.attention.window or 0) for x in um.layers],
    }
    if um.embedding_scale is not None:
        out["embedding_scale"] = float(um.embedding_scale)
    if cap is not None:
        out["attention_softcap"] = float(cap)
    if um.logit_softcap is not None:
        out["logit_softcap"] = float(um.logit_softcap)
    out.update(_rope_features(um, model, model_dir, refuse))
    if biased:
        out["qkv_bias"] = True
    return out


def rtn_grid(w_out_in: np.ndarray, kind: str) -> BlockGrid:
    """Round-to-nearest into a GGUF block format (fp16 scales, as a GGUF stores them).

    ``Q4_1``: ``w ≈ d·q + m`` with ``m`` the block minimum and ``d`` = range / 15 (asymmetric,
    what llama.cpp's own quantizer does); ``Q8_0``: ``w ≈ d·q``, ``d`` = max |w| / 127.
    """
    n, k = w_out_in.shape
    if k % QK:
        raise UserError("native decoder", f"a matrix has K={k}", f"K a multiple of {QK}")
    blocks = w_out_in.reshape(n, k // QK, QK).astype(np.float64)
    if kind == "Q4_1":
        lo, hi = blocks.min(-1), blocks.max(-1)
        m = lo.astype(np.float16).astype(np.float64)
        d = ((hi - m) / 15).astype(np.float16).astype(np.float64)
        safe = np.where(d > 0, d, 1.0)
        q = np.clip(np.rint((blocks - m[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
        return BlockGrid(kind, q.reshape(n, k), d.astype(np.float32), m.astype(np.float32))
    if kind == "Q8_0":
        d = (np.abs(blocks).max(-1) / 127).astype(np.float16).astype(np.float64)
        safe = np.where(d > 0, d, 1.0)
        q = np.clip(np.rint(blocks / safe[..., None]), -127, 127).astype(np.int8)
        return BlockGrid(kind, q.reshape(n, k), d.astype(np.float32), None)
    raise UserError("native decoder", f"format {kind}", "Q4_1 or Q8_0")


#: the native config's ``weights`` note when every projection keeps its source GGUF grid
EXACT_NOTE = "source GGUF grid (exact)"


def _weights_note(grid: bool, not_kept: dict[str, int], bits: int) -> str:
    rtn = f"RTN {'Q4_1' if bits == 4 else 'Q8_0'}, Q8_0 head"
    if not grid:
        return rtn
    if not not_kept:
        return EXACT_NOTE
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(not_kept.items()))
    return f"source GGUF grid where block-quantized; {rtn} for its {kinds} tensors"


def weights_from_model(
    onnx_path: Path,
    gguf: Path | None = None,
    eps: float | None = None,
    bits: int = 4,
    graph: Any = None,
    source_grid: bool = True,
    head_bits: int = 8,
) -> NativeWeights:
    """A model's native weights: its source GGUF grid exactly when there is one, else RTN.

    Without a source grid the projections are rounded to ``Q4_1`` (``bits=4``) or ``Q8_0``
    (``bits=8``) and the LM head/embedding to ``Q8_0``. ``graph``: an analyzed ``(model, unit
    map)`` to read instead of ``onnx_path`` (e.g. after dropping layers; then ``gguf`` tensors
    are looked up through the graph's ``cscompile.source_layers``). ``source_grid=False``
    ignores a source GGUF (round-to-nearest even when there is one: for comparisons).
    ``head_bits=4`` rounds the LM head (and a tied embedding) to Q4_1 instead of keeping its
    8-bit grid: a third fewer bytes per token, lossy (BENCHMARKS.md).
    """
    from cscompile.passes.pipeline import analyze
    from cscompile.passes.precision import find_source_gguf

    onnx_path = Path(onnx_path)
    if bits not in (4, 8):
        raise UserError("native decoder", f"{bits}-bit weights", "4 or 8")
    gguf = (gguf or find_source_gguf(onnx_path.parent)) if source_grid else None
    model, um = graph if graph is not None else analyze(onnx_path)
    features = family_features(um, onnx_path.parent, model)
    grid = GGUFGrid(gguf) if gguf is not None else None
    not_kept: dict[str, int] = {}  # source GGUF tensor types the step cannot run (round-to-nearest)
    inits = model.graph.initializers
    props = getattr(model, "metadata_props", None) or {}
    source_layers = (
        json.loads(props["cscompile.source_layers"]) if "cscompile.source_layers" in props else None
    )

    def value(name: str | None) -> np.ndarray:
        if name is None or name not in inits:
            raise UserError("native decoder", f"initializer '{name}' missing", "the exported model's weights")
        return np.asarray(inits[name].const_value.numpy(), np.float32)  # type: ignore[union-attr]

    if head_bits not in (4, 8):
        raise UserError("native decoder", f"a {head_bits}-bit head", "4 or 8")

    def matched(proj: Any, layer: int | None, role: str) -> BlockGrid:
        if proj.bias is not None and not (features.get("qkv_bias") and role in ("q", "k", "v")):
            raise UserError("native decoder", f"projection '{proj.node}' has a bias", "bias-free projections")
        w = value(proj.weight)
        w = np.ascontiguousarray(w.T if proj.weight_layout == "in_out" else w)
        if layer is None and head_bits == 4:
            return rtn_grid(w, "Q4_1")
        src = layer if layer is None or not source_layers else int(source_layers[layer])
        kind = grid.kind(gguf_name(src, role)) if grid is not None else None
        if grid is None or kind not in GRID_TYPES:
            if kind is not None:
                not_kept[kind] = not_kept.get(kind, 0) + 1
            return rtn_grid(w, "Q8_0" if layer is None or bits == 8 else "Q4_1")
        return grid.matched(gguf_name(src, role), w)

    def stacked(grids: list[BlockGrid]) -> PackedMatrix:
        """One matrix of several projections (mixed kinds widened exactly, :func:`stack`)."""
        return pack(stack(grids))

    qkv: list[PackedMatrix | None] = []
    o: list[PackedMatrix | None] = []
    gu: list[PackedMatrix | None] = []
    down: list[PackedMatrix | None] = []
    an, fn = [], []
    extra: dict[str, list[np.ndarray]] = {k: [] for k in _EXTRA_NORMS}
    a0 = um.layers[0].attention
    hd = a0.head_dim
    # partial rotary (the first rotary_dim channels of a head rotate, pairs (i, i + rotary_dim/2)):
    # each Q/K head's channels reordered so that the pairs are (j, j + head_dim/2) with the
    # rotating ones first, the pass-through ones paired with cos 1, sin 0; Q·K is unchanged by a
    # permutation shared by Q and K (and their norms), and a grid's rows are independent
    rot = int(features.get("rotary_dim", hd))
    r2, p2 = rot // 2, (hd - rot) // 2
    perm = np.concatenate([np.arange(r2), rot + np.arange(p2), r2 + np.arange(r2), rot + p2 + np.arange(p2)])
    permuted = rot != hd

    def heads_perm(g: BlockGrid, heads: int) -> BlockGrid:
        return _rows(g, (np.arange(heads)[:, None] * hd + perm[None]).reshape(-1)) if permuted else g

    def bias(proj: Any, n: int, heads: int = 0) -> np.ndarray:
        b = np.zeros(n, np.float32) if proj.bias is None else value(proj.bias).reshape(-1)
        if b.shape != (n,):
            raise UserError("native decoder", f"bias '{proj.bias}' of shape {b.shape}", f"({n},)")
        return b.reshape(heads, hd)[:, perm].reshape(-1) if permuted and heads else b

    biases: list[np.ndarray] = []
    for layer in um.layers:
        a, m = layer.attention, layer.mlp
        if not layer.ffn or m.gate is None or not a.rope or a.fused_qkv:
            raise UserError(
                "native decoder",
                f"layer {layer.index} is not plain RoPE + a gated FFN",
                "an unmodified Llama or Gemma 3 layer",
            )
        i = layer.index
        nh_, nkv_ = a.num_heads, a.num_kv_heads
        qkv.append(stacked([heads_perm(matched(a.q, i, "q"), nh_), heads_perm(matched(a.k, i, "k"), nkv_),
                            matched(a.v, i, "v")]))  # fmt: skip
        if features.get("qkv_bias"):
            biases.append(np.concatenate([bias(a.q, nh_ * hd, nh_), bias(a.k, nkv_ * hd, nkv_),
                                          bias(a.v, nkv_ * hd)]))  # fmt: skip
        o.append(pack(matched(a.o, i, "o")))
        gu.append(stacked([matched(m.gate, i, "gate"), matched(m.up, i, "up")]))
        down.append(pack(matched(m.down, i, "down")))
        if features.get("no_pre_norms"):  # unused by the step (cs_model.no_pre_norm)
            an.append(np.ones(um.hidden_size, np.float32))
            fn.append(np.ones(um.hidden_size, np.float32))
        else:
            an.append(value(layer.input_norm.weight))
            fn.append(value(layer.post_attention_norm.weight))
        if features.get("qk_norm"):
            assert a.q_norm is not None and a.k_norm is not None  # family_features checked
            full = features.get("qk_norm_full", False)  # the whole Q / K: each head's channels reordered
            extra["q_norm"].append(value(a.q_norm.weight).reshape(-1, hd)[:, perm].reshape(-1) if full
                                   else value(a.q_norm.weight)[perm])  # fmt: skip
            extra["k_norm"].append(value(a.k_norm.weight).reshape(-1, hd)[:, perm].reshape(-1) if full
                                   else value(a.k_norm.weight)[perm])  # fmt: skip
        if features.get("post_norms"):
            assert layer.attn_output_norm is not None and layer.mlp_output_norm is not None
            extra["attn_out_norm"].append(value(layer.attn_output_norm.weight))
            extra["ffn_out_norm"].append(value(layer.mlp_output_norm.weight))
    head = pack(matched(um.lm_head, None, "embedding" if um.lm_head_tied else "lm_head"))
    emb = None
    if not um.lm_head_tied:
        table = value(um.embedding)
        emb_name = gguf_name(None, "embedding")
        keep = grid is not None and grid.kind(emb_name) in GRID_TYPES
        emb = pack(grid.matched(emb_name, table) if keep and grid is not None else rtn_grid(table, "Q8_0"))
    cfg_path = onnx_path.parent / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    config = {
        "n_layers": len(um.layers),
        "hidden": um.hidden_size,
        "n_heads": a0.num_heads,
        "n_kv": a0.num_kv_heads,
        "head_dim": a0.head_dim,
        "inter": um.layers[0].mlp.intermediate_size,
        "vocab": um.vocab_size,
        "eps": float(eps if eps is not None else cfg.get("rms_norm_eps", 1e-5)),
        "rope_theta": _rope_theta(onnx_path.parent) if not features else 0.0,
        "weights": _weights_note(grid is not None, not_kept, bits),
        **features,
    }
    w = NativeWeights(
        config, np.stack(an), np.stack(fn), value(um.final_norm.weight), qkv, o, gu, down, head, emb,
        **{k: np.stack(v).astype(np.float32) for k, v in extra.items() if v},
        qkv_bias=np.stack(biases).astype(np.float32) if biases else None,
    )  # fmt: skip
    validate(w)
    return w


# -- width, depth and precision of a model's native weights ------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    """What one layer of :func:`derive`'s result keeps.

    ``heads``: query heads kept (source indices; ``()`` drops the attention; None keeps all);
    ``ffn_blocks``: FFN channel blocks of 32 kept (source block indices — the down projection's
    grid blocks, so the source grid stays exact; ``()`` drops the FFN; None keeps all);
    ``attn_bits`` / ``ffn_bits``: 4 (Q4_1) or 8 (Q8_0), None keeps the source grid.
    """

    heads: tuple[int, ...] | None = None
    ffn_blocks: tuple[int, ...] | None = None
    attn_bits: int | None = None
    ffn_bits: int | None = None


def spans(starts: Any, width: int) -> np.ndarray:
    """The indices of units ``starts`` (unit indices) of ``width`` consecutive indices each:
    ``[s*width, ..., s*width + width - 1]`` for every s, in order.
    """
    return (np.asarray(starts, np.int64)[:, None] * width + np.arange(width)).reshape(-1)


def _rows(g: BlockGrid, rows: np.ndarray) -> BlockGrid:
    return BlockGrid(g.kind, g.q[rows], g.scale[rows], None if g.offset is None else g.offset[rows])


def _cols(g: BlockGrid, blocks: np.ndarray) -> BlockGrid:
    cols, sb = spans(blocks, QK), spans(blocks, QK // g.sub)  # scales: per 32 or per 16 codes
    return BlockGrid(g.kind, g.q[:, cols], g.scale[:, sb], None if g.offset is None else g.offset[:, sb])


def derive(
    base: NativeWeights,
    layers: list[LayerPlan],
    head_bits: int | None = None,
    head: PackedMatrix | None = None,
    keep_kv: bool = False,
) -> NativeWeights:
    """``base`` (whole) with per-layer width, depth and precision: matrices sliced from the packed
    grids (a kept block keeps its codes, scale and offset exactly), re-rounded only where a
    precision differs from the base's; untouched matrices are shared with ``base``, not copied.
    ``head_bits=4`` re-rounds the LM head only (the embedding keeps the base grid): round to
    nearest, or ``head`` when given (e.g. the GPTQ-rounded head of a front; checked like any matrix).
    ``keep_kv``: a layer whose heads are all dropped keeps its K/V rows and still writes the cache
    (a motif switched per token: the tokens it runs leave the cache whole for the other motifs).
    """
    c = base.config
    if "width" in c:
        raise UserError("native derive", "weights that are already narrowed", "the whole model's weights")
    L, nh, nkv, hd, inter = c["n_layers"], c["n_heads"], c["n_kv"], c["head_dim"], c["inter"]
    if len(layers) != L:
        raise UserError("native derive", f"{len(layers)} layer plans", f"{L} (one per layer)")
    for bits in (head_bits, *(p.attn_bits for p in layers), *(p.ffn_bits for p in layers)):
        if bits not in (None, 4, 8):
            raise UserError("native derive", f"{bits}-bit weights", "4 or 8")
    nb = inter // QK
    if hd % QK and any(p.heads is not None and len(p.heads) not in (0, nh) for p in layers):
        raise UserError("native derive", f"single heads dropped with head_dim {hd}",
                        f"head_dim a multiple of {QK} (a head's O-projection columns are whole grid blocks)")  # fmt: skip
    Mat = PackedMatrix | None
    qkv: list[Mat] = []
    o: list[Mat] = []
    gu: list[Mat] = []
    down: list[Mat] = []
    heads_kept: list[list[int]] = []
    ffn_kept: list[int] = []
    extra = base.extra_norms()
    bias = None if base.qkv_bias is None else np.zeros_like(base.qkv_bias)  # each layer's kept rows first
    for i, p in enumerate(layers):
        hs = tuple(range(nh)) if p.heads is None else tuple(sorted(p.heads))
        fb = tuple(range(nb)) if p.ffn_blocks is None else tuple(sorted(p.ffn_blocks))
        if len(set(hs)) != len(hs) or any(not 0 <= h < nh for h in hs):
            raise UserError("native derive", f"layer {i} heads {hs}", f"distinct heads in [0, {nh})")
        if len(set(fb)) != len(fb) or any(not 0 <= b < nb for b in fb):
            raise UserError("native derive", f"layer {i} FFN blocks {fb}", f"distinct blocks in [0, {nb})")
        heads_kept.append(list(hs))
        ffn_kept.append(len(fb) * QK)
        mq, mo, mg, md = base.qkv[i], base.o[i], base.gu[i], base.down[i]
        assert mq is not None and mo is not None and mg is not None and md is not None
        new_q: Mat = None
        new_o: Mat = None
        rows = np.concatenate([spans(hs, hd), nh * hd + np.arange(2 * nkv * hd)])
        if bias is not None and base.qkv_bias is not None and (hs or keep_kv):
            bias[i, : len(rows)] = base.qkv_bias[i, rows]
        if len(hs) == nh and p.attn_bits in (None, mq.bits) and p.attn_bits in (None, mo.bits):
            new_q, new_o = mq, mo
        elif hs or keep_kv:
            new_q = pack(regrid(_rows(unpack(mq), rows), p.attn_bits or mq.bits))
            if hs:
                new_o = pack(regrid(_cols(unpack(mo), spans(hs, hd // QK)), p.attn_bits or mo.bits))
        new_g: Mat = None
        new_d: Mat = None
        if len(fb) == nb and p.ffn_bits in (None, mg.bits) and p.ffn_bits in (None, md.bits):
            new_g, new_d = mg, md
        elif fb:
            ch = spans(fb, QK)
            new_g = pack(regrid(_rows(unpack(mg), np.concatenate([ch, inter + ch])), p.ffn_bits or mg.bits))
            new_d = pack(regrid(_cols(unpack(md), np.asarray(fb)), p.ffn_bits or md.bits))
        qkv.append(new_q)
        o.append(new_o)
        gu.append(new_g)
        down.append(new_d)
    if not any(heads_kept) and not any(ffn_kept):
        raise UserError("native derive", "every layer dropped", "at least one attention or FFN kept")
    lm, emb = base.head, base.emb
    if head_bits not in (None, 8 if base.head.bits == PLANES else base.head.bits):  # planes: Q8_0's numbers
        lm = head if head is not None else pack(regrid(unpack(base.head), head_bits))
        if lm.bits != head_bits:
            raise UserError(
                "native derive", f"a {lm.bits}-bit head given for head_bits={head_bits}", "the same bits"
            )
        emb = base.emb or base.head
    config = dict(c)
    if any(len(h) != nh for h in heads_kept) or any(f != inter for f in ffn_kept):
        config["width"] = {"heads": heads_kept, "ffn": ffn_kept}
        if keep_kv and not all(heads_kept):
            config["width"]["kv"] = True
    w = NativeWeights(config, base.attn_norm, base.ffn_norm, base.final_norm, qkv, o, gu, down, lm, emb,
                      **{**extra, **({} if bias is None else {"qkv_bias": bias})})  # fmt: skip
    validate(w)
    return w


# -- threads on shared cores (docs/design.md "Native engine on shared cores") ---------------------
class ThreadGovernor:
    """How many threads the next decode step gets: ``threads`` while that is fast, 1 when it is not.

    The C step has ~10 OpenMP barriers per layer; on cores another process also wants, one
    descheduled thread stalls the others at every barrier and a token can take 100x its time
    (issue 25). One thread has no barriers. Rules, over single-token steps only (``record``):

    1. At ``threads``: ``patience`` steps in a row slower than ``slow`` x the best of the last
       ``window`` steps at ``threads``, and than the median of the last steps at 1 thread if
       there were any, switch to 1 thread (the probe interval restarts). The second condition
       keeps a merely noisy ``threads`` (still faster than 1 thread) where it is.
    2. Every ``interval`` steps one step runs at the other count (a probe); a probe faster than
       ``1 - gain`` x the median of the current count's last ``window`` steps switches to it and
       restarts the interval at ``probe_every``, else the interval doubles (up to ``max_interval``
       at ``threads``, ``max_back`` = 32 at 1 thread), so a lasting state costs ever fewer probes. The
       cap at 1 thread bounds how long the engine stays slow after the cores free up: measured
       (``tools/bench_contention.py``), a governor backed off to 1,024 steps during load still ran
       at 1 thread, 1.6x slower, through a whole idle measurement after it.
    3. The probe of 1 thread from ``threads`` starts at ``max_interval`` / 4: on idle cores it
       always fails, so it costs one slower step in that many.

    Thread-safe (one governor serves every sequence of a session: concurrent sequences are what
    share the cores). Timings are injected, so the rules are unit-tested without a clock.
    """

    def __init__(self, threads: int, slow: float = 2.0, patience: int = 2, window: int = 8,
                 gain: float = 0.1, probe_every: int = 16, max_interval: int = 1024,
                 max_back: int = 32) -> None:  # fmt: skip
        self.threads = check_threads(threads, "native engine threads")
        self.slow, self.patience, self.gain = float(slow), int(patience), float(gain)
        self.probe_every, self.max_interval = int(probe_every), int(max_interval)
        self.max_back = max(int(max_back), self.probe_every)
        self.current = self.threads
        self._times: dict[int, deque[float]] = {1: deque(maxlen=window), self.threads: deque(maxlen=window)}
        self._interval = max(self.probe_every, self.max_interval // 4)
        self._since = 0
        self._slow_run = 0
        self._lock = threading.Lock()
        #: switches made, for ``--stats``-style reports and tests
        self.switches = 0

    def choose(self) -> int:
        """The thread count of the next single-token step (pass it back to :meth:`record`)."""
        if self.threads == 1:
            return 1
        with self._lock:
            self._since += 1
            if self._since >= self._interval:
                self._since = 0
                return 1 if self.current == self.threads else self.threads
            return self.current

    def record(self, threads: int, ms: float) -> None:
        """The step run at ``threads`` (from :meth:`choose`) took ``ms``."""
        if self.threads == 1 or threads not in self._times:
            return
        with self._lock:
            if threads != self.current:  # a probe
                ref = _median(self._times[self.current]) if self._times[self.current] else np.inf
                self._times[threads].append(ms)
                if ms < (1.0 - self.gain) * ref:
                    self._switch(threads)
                else:
                    cap = self.max_back if self.current == 1 else self.max_interval
                    self._interval = min(2 * self._interval, cap)
                return
            times, single = self._times[threads], self._times[1]
            limit = max(self.slow * min(times), _median(single) if single else 0.0) if times else np.inf
            if threads > 1 and len(times) >= 2 and ms > limit:
                self._slow_run += 1
                if self._slow_run >= self.patience:
                    self._switch(1)
            else:
                self._slow_run = 0
            times.append(ms)

    def _switch(self, threads: int) -> None:
        self.current = threads
        self._since = self._slow_run = 0
        self._interval = self.probe_every if threads == 1 else max(self.probe_every, self.max_interval // 4)
        self.switches += 1


def _median(xs: deque[float]) -> float:
    """np.median of a few floats without numpy's per-call overhead (tens of us: once a decode step)."""
    s = sorted(xs)
    h = len(s) // 2
    return s[h] if len(s) % 2 else (s[h - 1] + s[h]) / 2.0


# -- the decoder -------------------------------------------------------------------------------
class _Struct:
    """The C ``cs_model`` of one set of weights, with the arrays it points into kept alive."""

    def __init__(self, weights: NativeWeights, threads: int) -> None:
        c = weights.config
        L = c["n_layers"]
        threads = check_threads(threads, "native decoder threads")
        self.mats = {
            name: (_QMat * L)(*[_QMat() if m is None else m.struct() for m in getattr(weights, name)])
            for name in ("qkv", "o", "gu", "down")
        }
        heads, ffn = weights.width()
        rep = c["n_heads"] // c["n_kv"]
        self.width = (
            np.array([len(h) for h in heads], np.int32),
            np.array([[h // rep for h in hs] + [0] * (c["n_heads"] - len(hs)) for hs in heads], np.int32),
            np.array(ffn, np.int32),
        )
        self.head = weights.head.struct()
        self.emb = weights.emb.struct() if weights.emb is not None else self.head
        self.norms = [
            np.ascontiguousarray(a, np.float32)
            for a in (weights.attn_norm, weights.ffn_norm, weights.final_norm)
        ]
        self.model = _Model(
            L, c["hidden"], c["n_heads"], c["n_kv"], c["head_dim"], c["inter"], c["vocab"], 0, int(threads), 0,
            c["eps"], 0.0, *(a.ctypes.data for a in self.norms),
            *(ctypes.addressof(self.mats[n]) for n in ("qkv", "o", "gu", "down")),
            ctypes.addressof(self.head), ctypes.addressof(self.emb), None, None, None, None, None,
            *(a.ctypes.data for a in self.width),
            *(a.size for a in self.norms), min(len(a) for a in self.mats.values()), 0, 0, 0,
            min(self.width[0].size, self.width[2].size), self.width[1].size,
        )  # fmt: skip
        # the family features (absent: Llama's zero / NULL)
        m = self.model
        self.extra = {k: np.ascontiguousarray(a, np.float32) for k, a in weights.extra_norms().items()}
        for k, a in self.extra.items():
            setattr(m, k, a.ctypes.data)
            setattr(m, k + "_len", a.size)
        n_tables, table = rope_layout(c)
        self.layer_rope = np.array(table, np.int32)
        m.layer_rope, m.layer_rope_len, m.n_rope = self.layer_rope.ctypes.data, L, n_tables
        if c.get("layer_window") is not None:
            self.layer_window = np.array(c["layer_window"], np.int32)
            m.layer_window, m.layer_window_len = self.layer_window.ctypes.data, L
        m.act = ACTIVATIONS[c.get("activation", "silu")]
        m.emb_scale = float(c.get("embedding_scale", 0.0))
        m.attn_scale = float(c.get("attention_scale", 0.0))
        m.attn_softcap = float(c.get("attention_softcap", 0.0))
        m.logit_softcap = float(c.get("logit_softcap", 0.0))
        m.no_pre_norm = int(bool(c.get("no_pre_norms", False)))
        m.qk_norm_full = int(bool(c.get("qk_norm_full", False)))


def rope_tables(theta: float, head_dim: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """RoPE's cos and sin for positions ``[0, n)``: float32 ``[n, head_dim / 2]`` each."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
    return np.ascontiguousarray(np.cos(ang), np.float32), np.ascontiguousarray(np.sin(ang), np.float32)


def model_rope_tables(c: dict[str, Any], n: int) -> tuple[np.ndarray, np.ndarray]:
    """A native config's RoPE tables for positions ``[0, n)``: float32 ``[tables, n, head_dim / 2]``,
    one per distinct base (:func:`rope_bases`; the C step finds a table's rows from its length).
    """
    hd = int(c["head_dim"])
    if "rope_inv_freq" in c:  # explicit tables: factor · cos/sin of the rotating pairs, then cos 1, sin 0
        cos = np.ones((len(c["rope_inv_freq"]), n, hd // 2), np.float64)
        sin = np.zeros_like(cos)
        for t, (inv, f) in enumerate(zip(c["rope_inv_freq"], c["rope_factor"])):
            ang = np.arange(n, dtype=np.float64)[:, None] * np.asarray(inv, np.float64)[None, :]
            cos[t, :, : len(inv)], sin[t, :, : len(inv)] = f * np.cos(ang), f * np.sin(ang)
        return np.ascontiguousarray(cos, np.float32), np.ascontiguousarray(sin, np.float32)
    pairs = [rope_tables(b, hd, n) for b in rope_bases(c)[0]]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _base_config(c: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in c.items() if k != "width"}


def check_sensed(sensed: SensedHead, head: PackedMatrix, vocab: int) -> None:
    """``sensed`` fits ``head`` (K, its preview's shape or the head's bit planes, e_n, tau), or one
    line saying what does not: the checks the solo and the batched sensed steps make before C.
    """
    if not 1 <= sensed.k <= vocab:
        raise UserError("sensed head", f"K = {sensed.k}", f"K in [1, {vocab}]")
    if sensed.preview is None and head.bits != PLANES:
        raise UserError(
            "sensed head", "a bit-plane preview of a head stored as Q8_0", "head_as_planes(weights)"
        )
    p = sensed.preview or head
    if p.n_padded != head.n_padded or p.k != head.k or sensed.rowerr.size < vocab:
        raise UserError("sensed head", "a preview of another head's shape", "build_preview(the head)")
    if not sensed.tau >= 0:
        raise UserError("sensed head", f"tau = {sensed.tau}", "a margin >= 0 (inf: always the full head)")


class NativeDecoder:
    """One sequence decoded by the C step; the KV cache lives here (fp32).

    The cache starts at ``capacity`` positions and doubles as needed up to ``max_ctx`` (the
    model's context), so a short chat does not pay for the longest one. ``motifs``: further
    weights of the same model (e.g. from :func:`derive` with ``keep_kv``) that
    :meth:`forward` may run instead of ``weights`` for any token — all share this one cache.
    ``governor``: picks each step's thread count (:class:`ThreadGovernor`); None: ``threads`` always.
    """

    def __init__(
        self,
        weights: NativeWeights,
        threads: int = 2,
        max_ctx: int = 2048,
        capacity: int = 256,
        motifs: list[NativeWeights] | None = None,
        lib: ctypes.CDLL | None = None,
        rope: tuple[np.ndarray, np.ndarray] | None = None,
        governor: ThreadGovernor | None = None,
    ) -> None:
        validate(weights)
        self.lib = lib or library()  # another build of the kernel: tools/ab_native.py
        self.w = weights
        c = weights.config
        if not is_int32(max_ctx):
            raise UserError(
                "native decoder", f"a context of {max_ctx!r} positions", f"an integer in [1, {INT32_MAX}]"
            )
        self.max_ctx = int(max_ctx)
        self.vocab = int(c["vocab"])
        for i, m in enumerate(motifs or []):
            validate(m)
            if _base_config(m.config) != _base_config(c) or m.head.n_padded != weights.head.n_padded:
                raise UserError(
                    "native decoder", f"motif {i + 1} of another model shape", "the weights' model"
                )
            if not keeps_kv(m.config) and any(not h for h in m.width()[0]):
                raise UserError("native decoder", f"motif {i + 1} drops attention without its K/V",
                                "motifs derived with keep_kv=True (the cache stays whole)")  # fmt: skip
        #: RoPE tables of at least max_ctx positions shared with others (:func:`model_rope_tables`), or None
        self._rope = rope
        tables = rope_layout(c)[0]
        if rope is not None and (
            any(r.dtype != np.float32 or not r.flags.c_contiguous for r in rope)
            or rope[0].shape != rope[1].shape
            or rope[0].ndim != 3
            or rope[0].shape[0] != tables
            or rope[0].shape[1] < self.max_ctx
            or rope[0].shape[2] != c["head_dim"] // 2
        ):
            raise UserError("native decoder", "RoPE tables of another shape",
                            f"float32 [{tables}, >= {self.max_ctx}, {c['head_dim'] // 2}] (model_rope_tables)")  # fmt: skip
        self._structs = [_Struct(w, threads) for w in [weights, *(motifs or [])]]
        self.governor = governor
        self.model = self._structs[0].model
        self.kc = self.vc = np.zeros(0, np.float32)
        self.capacity = 0
        self._grow(min(max(16, int(capacity)), self.max_ctx))
        self._logits = np.zeros(weights.head.n_padded, np.float32)
        self._preview: np.ndarray | None = None
        self._cand = np.zeros(0, np.int32)
        self._out, self._stats = np.zeros(2, np.int32), np.zeros(3, np.float32)  # step_greedy's results
        self._pv: tuple[tuple[Any, ...], _QMat] | None = None
        self.pos = 0

    @property
    def n_motifs(self) -> int:
        """How many weight sets :meth:`forward` can run (``motif`` in ``[0, n_motifs)``)."""
        return len(self._structs)

    def _grow(self, cap: int) -> None:
        """Room for ``cap`` positions: cache, RoPE tables and scratch re-made, the cache copied over."""
        c = self.w.config
        L, nkv, hd = c["n_layers"], c["n_kv"], c["head_dim"]
        kc = np.zeros((L, nkv, cap, hd), np.float32)
        vc = np.zeros_like(kc)
        if self.capacity:
            kc[:, :, : self.pos] = self.kc[:, :, : self.pos]
            vc[:, :, : self.pos] = self.vc[:, :, : self.pos]
        if self._rope is not None:  # the session's tables (whole: the C step reads a table's rows
            self._cos, self._sin = self._rope  # from its length): the numbers of its batched steps
        else:
            self._cos, self._sin = model_rope_tables(c, cap)
        self.kc, self.vc, self.capacity = kc, vc, cap
        self.model.max_ctx = cap  # the scratch size depends on it (and is the same for every motif)
        floats = int(self.lib.cs_dec_work_floats(ctypes.byref(self.model)))
        if floats < 0:
            raise _c_refused("native decoder", floats)
        self._work = np.zeros(floats, np.float32)
        for st in self._structs:  # every motif reads and writes the one cache and scratch
            m = st.model
            m.max_ctx = cap
            m.rope_cos, m.rope_sin = self._cos.ctypes.data, self._sin.ctypes.data
            m.kc, m.vc = kc.ctypes.data, vc.ctypes.data
            m.work = self._work.ctypes.data
            m.rope_len, m.kv_len, m.work_len = self._cos.size, kc.size, self._work.size

    def _room(self, n: int) -> None:
        need = self.pos + n
        if need > self.max_ctx:
            raise UserError(
                "native decoder", f"{need} tokens of context", f"at most {self.max_ctx} (the model's context)"
            )
        if need > self.capacity:
            cap = self.capacity
            while cap < need:
                cap *= 2
            self._grow(min(cap, self.max_ctx))

    def reset(self) -> None:
        self.pos = 0

    def forward(self, ids: list[int] | np.ndarray, all_logits: bool = False, motif: int = 0) -> np.ndarray:
        """Feed ``ids`` at the next positions: logits ``[n, V]`` (``all_logits``) or ``[V]`` of the last;
        ``motif`` picks the weights (0: the decoder's own, i: its i-th motif).
        """
        if not 0 <= motif < len(self._structs):
            raise UserError("native decoder", f"motif {motif}", f"a motif in [0, {len(self._structs)})")
        tokens = np.ascontiguousarray(np.asarray(ids).reshape(-1), np.int32)
        n = len(tokens)
        if n == 0:
            raise UserError("native decoder", "no tokens to run", "at least one token")
        bad = tokens[(tokens < 0) | (tokens >= self.vocab)]
        if len(bad):
            raise UserError("native decoder", f"token id {int(bad[0])}", f"ids in [0, {self.vocab})")
        self._room(n)
        out = np.zeros((n, self.w.head.n_padded), np.float32) if all_logits else self._logits
        model = self._structs[motif].model
        threads, t0 = self._threads(model, n), time.perf_counter()
        rc = self.lib.cs_dec_forward(
            ctypes.byref(model),
            tokens.ctypes.data,
            n,
            self.pos,
            out.ctypes.data,
            out.size,
            int(all_logits),
        )
        if self.governor is not None and n == 1 and rc == 0:
            self.governor.record(threads, (time.perf_counter() - t0) * 1e3)
        if rc != 0:  # guarded above: the C step's own checks are the last line
            raise _c_refused(f"native decoder at position {self.pos}", rc)
        self.pos += n
        return out[:, : self.vocab] if all_logits else out[: self.vocab]

    def _threads(self, model: _Model, n: int) -> int:
        """The governor's thread count for a step of ``n`` tokens, set on ``model`` (a prompt chunk
        runs at the current count: only single-token steps are timed and compared).
        """
        if self.governor is None:
            return int(model.nthreads)
        model.nthreads = self.governor.choose() if n == 1 else self.governor.current
        return int(model.nthreads)

    def step(self, token: int) -> np.ndarray:
        """Feed one token at the next position; the logits for the position after it (a view)."""
        return self.forward([token])

    def prefill(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Feed a prompt (64 tokens per chunk); the logits after its last token (a copy)."""
        return self.forward(ids).copy()

    def logits_all(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Teacher-forced logits at every position of ``ids`` from position 0 ([T, V])."""
        self.reset()
        return self.forward(ids, all_logits=True)

    def step_greedy(self, token: int, sensed: SensedHead) -> GreedyStep:
        """Feed one token; the greedy next token through the sensed head (qdecode.c
        cs_dec_forward_sensed). The exact logits of the candidates (all on fallback) are in
        ``self._logits``, the preview scores in ``self._preview``.
        """
        if not 0 <= token < self.vocab:
            raise UserError("native decoder", f"token id {token}", f"ids in [0, {self.vocab})")
        check_sensed(sensed, self.w.head, self.vocab)
        self._room(1)
        if self._preview is None or len(self._cand) < sensed.k + 1:
            self._preview = np.zeros(self.w.head.n_padded, np.float32)
            self._cand = np.zeros(sensed.k + 1, np.int32)
        out, stats = self._out, self._stats
        pv = None
        if sensed.preview is not None:  # a separate preview (else the head's high bit plane)
            q = sensed.preview
            key = (q, q.codes, q.d, q.m)  # its C struct, made once per preview (a decode step's cost)
            if self._pv is None or any(x is not y for x, y in zip(self._pv[0], key)):
                self._pv = (key, q.struct())
            pv = self._pv[1]
        threads, t0 = self._threads(self.model, 1), time.perf_counter()
        rc = self.lib.cs_dec_forward_sensed(
            ctypes.byref(self.model), None if pv is None else ctypes.addressof(pv), sensed.rowerr.ctypes.data, sensed.rowerr.size,
            int(token), self.pos, int(sensed.k),
            float(sensed.tau), self._logits.ctypes.data, self._logits.size, self._preview.ctypes.data,
            self._preview.size, self._cand.ctypes.data, self._cand.size, out.ctypes.data, out.size,
            stats.ctypes.data, stats.size,
        )  # fmt: skip
        if rc != 0:
            raise _c_refused(f"native decoder (sensed head) at position {self.pos}", rc)
        if self.governor is not None:
            self.governor.record(threads, (time.perf_counter() - t0) * 1e3)
        self.pos += 1
        return GreedyStep(int(out[0]), bool(out[1]), float(stats[0]), float(stats[1]), float(stats[2]))

    def step_sensed_logits(self, token: int, sensed: SensedHead) -> tuple[np.ndarray, GreedyStep]:
        """Feed one token; logits for sampling through the sensed head: the candidates' exact
        logits and the preview scores p_n elsewhere (the full head's logits when the rule fell
        back). An approximation of the full distribution whose total-variation distance
        ``tools/bench_vocab.py`` measures; only ``--head sensed`` samples this way.
        """
        st = self.step_greedy(token, sensed)
        cap = float(self.w.config.get("logit_softcap", 0.0))  # the C rule runs before the cap (monotone)
        if cap > 0:
            z, _ = self._sensed_z(sensed, st)
            return (cap * np.tanh(z / cap)).astype(np.float32), st
        return self._sensed_z(sensed, st)[0], st

    def _sensed_z(self, sensed: SensedHead, st: GreedyStep) -> tuple[np.ndarray, GreedyStep]:
        V = self.vocab
        if st.fell_back:
            return self._logits[:V].copy(), st
        assert self._preview is not None
        e = sensed.rowerr[:V]
        z = self._preview[:V] - np.float32(sensed.tau) * e * np.float32(st.xnorm)  # back to p_n
        cand = self._cand[: sensed.k]
        z[cand] = self._logits[cand]
        return z, st

    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        eos: set[int] | None = None,
        sensed: SensedHead | None = None,
    ) -> list[int]:
        """Greedy continuation of ``prompt`` (from position 0); ``sensed``: the decode steps end
        with the sensed head (the prompt's step keeps the full head).
        """
        self.reset()
        logits = self.prefill(prompt)
        out: list[int] = []
        tok = int(np.argmax(logits))
        for i in range(max_new_tokens):
            out.append(tok)
            if (eos and tok in eos) or i == max_new_tokens - 1:
                break
            if sensed is None:
                tok = int(np.argmax(self.step(tok)))
            else:
                tok = self.step_greedy(tok, sensed).token
        return out


# -- the sensed vocabulary head (docs/design.md "Sensed vocabulary head"; the preview, its
# calibration and the bundle section: cscompile/native/vocab.py) --------------------------------
@dataclass
class SensedHead:
    """The preview (None: the head's high bit plane), each row's preview error norm ``rowerr`` (e_n = |W_n - P_n|, float32), the
    candidates kept (``k``) and the rule's margin ``tau`` (per unit of e_n times the normalized
    hidden state's 2-norm; ``inf``: always the full head).
    """

    preview: PackedMatrix | None  # None: the high plane of the head's bit planes (PLANES)
    k: int
    tau: float
    rowerr: np.ndarray

    def __post_init__(self) -> None:
        e = np.ascontiguousarray(self.rowerr, dtype=np.float32).reshape(-1)
        if e.size == 0 or not np.all(np.isfinite(e)) or float(e.min()) <= 0.0:
            raise UserError(
                "sensed head", "row error norms that are empty, not finite or <= 0", "e_n > 0 per row"
            )
        self.rowerr = e


@dataclass
class GreedyStep:
    token: int
    fell_back: bool
    best: float  # z*: the best exact candidate logit
    left_out: float  # p_(K+1): the best preview score outside the candidates
    xnorm: float


# -- the bundle's native engine -----------------------------------------------------------------
PREFIX = "native/"
ENGINE_JSON = PREFIX + "engine.json"
WEIGHTS_BIN = "weights.bin"
FORMAT_VERSION = 1
ENGINE_NAME = "native"


def _arrays(w: NativeWeights) -> tuple[dict[str, np.ndarray], dict[str, dict[str, int]]]:
    arrays: dict[str, np.ndarray] = {
        "attn_norm": w.attn_norm,
        "ffn_norm": w.ffn_norm,
        "final_norm": w.final_norm,
        **w.extra_norms(),
    }
    mats: dict[str, dict[str, int]] = {}
    named = [
        (f"L{i:03d}.{kind}", m)
        for kind in ("qkv", "o", "gu", "down")
        for i, m in enumerate(getattr(w, kind))
        if m is not None
    ]
    named += [("head", w.head)] + ([("emb", w.emb)] if w.emb is not None else [])
    for name, m in named:
        mats[name] = {"n": m.n, "k": m.k, "bits": m.bits, "offsets": m.m is not None}
        arrays[f"{name}.codes"], arrays[f"{name}.d"] = m.codes, m.d
        if m.m is not None:
            arrays[f"{name}.m"] = m.m
    return arrays, mats


def engine_files(w: NativeWeights) -> dict[str, bytes]:
    """``native/engine.json`` (config, matrix shapes, array index) and ``native/weights.bin``."""
    from cscompile.bundle.blobs import pack_arrays

    validate(w)
    arrays, mats = _arrays(w)
    blob, index = pack_arrays(arrays)
    meta = {"format_version": FORMAT_VERSION, "config": w.config, "matrices": mats, "arrays": index}
    return {
        ENGINE_JSON: (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode(),
        PREFIX + WEIGHTS_BIN: blob,
    }


def part_from_weights(w: NativeWeights) -> Any:
    """The bundle part (files, engine entry, section) of the native engine with weights ``w``."""
    from cscompile.bundle.parts import BundlePart

    engine = {
        "name": ENGINE_NAME,
        "file": ENGINE_JSON,
        "kind": "native",
        "params": {
            "weights": w.config["weights"],
            "activations": "int16 per block of 32",
        },
        "profile": {},
    }
    return BundlePart(files=dict(engine_files(w)), engines=[engine], sections={"native": ENGINE_JSON})


def load_weights(root: Path, meta: dict[str, Any], label: str) -> NativeWeights:
    """The weights of a verified bundle's native engine (``weights.bin`` mapped read-only)."""
    from cscompile.bundle import BundleError
    from cscompile.bundle.blobs import array_views

    def fail(got: str, want: str) -> BundleError:
        return BundleError(f"bundle {label}: {ENGINE_JSON}", got, want)

    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise fail(f"has format_version {meta.get('format_version') if isinstance(meta, dict) else None!r}",
                   f"{FORMAT_VERSION} (rebuild the bundle with this cscompile)")  # fmt: skip
    cfg, mats, index = meta.get("config"), meta.get("matrices"), meta.get("arrays")
    if not isinstance(cfg, dict) or not isinstance(mats, dict) or not isinstance(index, dict):
        raise fail("lacks config, matrices or arrays", "the objects cscompile build writes")
    try:  # before anything is sized from the config
        check_config(cfg, (root / PREFIX / WEIGHTS_BIN).stat().st_size)
    except UserError as exc:
        raise fail(f"{exc.subject}: {exc.received}", exc.expected) from None
    except OSError as exc:
        raise fail(f"has no readable {WEIGHTS_BIN} ({exc.strerror})", "an untampered bundle") from None
    try:
        views = array_views(root / PREFIX / WEIGHTS_BIN, index)
    except (ValueError, TypeError, KeyError) as exc:
        raise fail(
            f"has an array index that does not fit weights.bin ({str(exc)[:120]})", "an untampered bundle"
        ) from None

    def array(name: str) -> np.ndarray:
        if name not in views:
            raise fail(f"has no array {name!r}", "every array the engine reads")
        return views[name]

    def matrix(name: str) -> PackedMatrix:
        spec = mats.get(name)
        if not isinstance(spec, dict) or not all(is_int32(spec.get(k)) for k in ("n", "k", "bits")):
            raise fail(f"has no valid matrix {name!r}", f"n, k and bits in [1, {INT32_MAX}] for every matrix")
        m = views.get(f"{name}.m")
        if (m is not None) != spec.get(
            "offsets", spec["bits"] == 4
        ):  # absent: a bundle of before 8-bit offsets
            raise fail(
                f"has matrix {name!r} {'with' if m is not None else 'without'} offsets", "what its spec says"
            )
        return PackedMatrix(array(f"{name}.codes"), array(f"{name}.d"), m, spec["n"], spec["k"], spec["bits"])

    try:
        shapes = matrix_shapes(cfg)
        qkv, o, gu, down = (
            [matrix(f"L{i:03d}.{kind}") if shape else None for i, shape in enumerate(shapes[kind])]
            for kind in ("qkv", "o", "gu", "down")
        )
        w = NativeWeights(
            dict(cfg), array("attn_norm"), array("ffn_norm"), array("final_norm"), qkv, o, gu, down,
            matrix("head"), matrix("emb") if "emb" in mats else None,
            **{k: array(k) for k, flag in _EXTRA_NORMS.items() if cfg.get(flag, False)},
        )  # fmt: skip
        used = {"head", "emb"} | {f"L{i:03d}.{k}" for k, s in shapes.items() for i, d in enumerate(s) if d}
        if set(mats) - used:  # e.g. a width that drops a unit whose matrices are there
            raise fail(f"has matrices its config does not use ({sorted(set(mats) - used)[:4]})",
                       "the matrices of the config's width, exactly")  # fmt: skip
        validate(w)
    except UserError as exc:
        if isinstance(exc, BundleError):
            raise
        raise fail(f"{exc.subject}: {exc.received}", exc.expected) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise fail(f"is malformed ({str(exc)[:120]})", "an untampered bundle") from None
    return w


@dataclass
class NativeState:
    """A sequence's cache in the native engine (batch 1)."""

    decoder: NativeDecoder
    batch: int = 1
    #: greedy steps through the sensed head, and how many of them ran the full head
    head_steps: int = 0
    head_fallbacks: int = 0

    @property
    def length(self) -> int:
        return self.decoder.pos


def adaptive_threads(adaptive: bool | None = None) -> bool:
    """Whether native sessions adapt their thread count (:class:`ThreadGovernor`): ``adaptive``, else
    ``$CSCOMPILE_ADAPTIVE_THREADS`` (``1`` on, the default; ``0`` off: every step at ``threads``).
    """
    if adaptive is not None:
        return bool(adaptive)
    env = os.environ.get("CSCOMPILE_ADAPTIVE_THREADS", "1").strip()
    if env not in ("0", "1"):
        raise UserError("CSCOMPILE_ADAPTIVE_THREADS", f"'{env}'", "0 (fixed thread count) or 1 (adaptive)")
    return env == "1"


class NativeSession(SessionBase):
    """The native engine behind the runtime's session interface (``new_state`` / ``forward``)."""

    def __init__(
        self,
        weights: NativeWeights,
        threads: int | None = None,
        context_length: int | None = None,
        sensed: SensedHead | None = None,
        adaptive: bool | None = None,
    ) -> None:
        from cscompile.decode.session import default_threads

        validate(weights)
        self.weights = weights
        #: greedy decode steps (temperature 0) end with this sensed head; None: the full head
        self.sensed = sensed
        #: sampling steps also use it (candidates exact, the preview elsewhere: an approximation)
        self.sensed_sampling = False
        self.vocab_size = int(weights.config["vocab"])
        self.threads = check_threads(
            default_threads() if threads is None else threads, "native engine threads"
        )
        #: picks each decode step's thread count (None: always ``threads``); see :class:`ThreadGovernor`
        self.governor = (
            ThreadGovernor(self.threads) if adaptive_threads(adaptive) and self.threads > 1 else None
        )
        self.context_length = int(context_length or 2048)
        if not is_int32(self.context_length):
            raise UserError(
                "native engine", f"a context of {context_length!r}", f"at most {INT32_MAX} positions"
            )
        self._lock = threading.Lock()
        self._rope: tuple[np.ndarray, np.ndarray] | None = None
        self._batch: _Struct | None = None
        #: a governor per batch size (a step's time depends on it), made on first use
        self.batch_governors: dict[int, ThreadGovernor] = {}
        #: the same for batched steps that end with the sensed head (:meth:`forward_batch_sensed`)
        self.sensed_governors: dict[int, ThreadGovernor] = {}
        self._batch_work = np.zeros(0, np.float32)

    #: prompt tokens per chunk of the C step's forward (qdecode.c CH): a prompt fed in calls of
    #: this many tokens from position 0 gives the numbers of one call (the same chunks)
    prefill_chunk = 64

    @property
    def max_batch(self) -> int:
        """Sequences :meth:`forward_batch` steps in one call (1: this session does not batch —
        motifs switched per token, or sampling through a sensed head). With a sensed head, the
        greedy rows of a batched step end with it (:meth:`forward_batch_sensed`: each its solo
        :meth:`greedy_step`) and the sampled rows with the full head (read once for all of them).
        Sampling through the sensed head (``sensed_sampling``) reads its approximate logits per
        step, which the batched step does not give, so such a session does not batch.
        """
        if self.sensed is not None and self.sensed_sampling:
            return 1
        return int(library().cs_dec_max_batch())

    def rope(self) -> tuple[np.ndarray, np.ndarray]:
        """The RoPE tables of the whole context, shared by every state and the batched step."""
        with self._lock:
            if self._rope is None:
                c = self.weights.config
                self._rope = model_rope_tables(c, self.context_length)
            return self._rope

    def new_state(self, batch: int = 1) -> NativeState:
        if batch != 1:
            raise UserError("native engine", f"a batch of {batch}", "one sequence at a time (batch 1)")
        return self._new_state()

    def _new_state(self) -> NativeState:
        return NativeState(
            NativeDecoder(
                self.weights,
                self.threads,
                max_ctx=self.context_length,
                rope=self.rope(),
                governor=self.governor,
            )  # fmt: skip
        )

    def forward_batch(self, tokens: list[int] | np.ndarray, states: list[NativeState]) -> np.ndarray:
        """One token for each of ``states``, each at its own position, in one C call
        (qdecode.c ``cs_dec_forward_batch``): logits ``[B, V]``, row ``b`` what
        ``forward_last([[tokens[b]]], states[b])`` returns; every state advances by one.
        """
        toks, decs = self._batch_args(tokens, states)
        B = len(decs)
        out = np.zeros((B, self.weights.head.n_padded), np.float32)

        def call(lib: ctypes.CDLL, m: _Model, args: tuple[Any, ...]) -> int:
            return int(lib.cs_dec_forward_batch(ctypes.byref(m), *args, out.ctypes.data, out.size))

        self._batch_call(toks, decs, self.batch_governors, call)
        return out[:, : self.vocab_size]

    def forward_batch_sensed(
        self, tokens: list[int] | np.ndarray, states: list[NativeState], greedy: list[bool]
    ) -> tuple[np.ndarray, list[int]]:
        """:meth:`forward_batch` whose greedy rows (``greedy[b]``) end with the session's sensed
        head (qdecode.c ``cs_dec_forward_batch_sensed``): ``(logits [B, V], tokens)``; a greedy
        row's token is what :meth:`greedy_step` gives that sequence alone (its head counters move
        alike), the other rows' logits are the full head's (their ``tokens`` entry: the argmax).
        A greedy row's logits hold its candidates' only (all of them when the rule fell back).
        """
        sensed = self.sensed
        if sensed is None or len(greedy) != len(states):
            raise UserError("native batch", "greedy rows without a sensed head, or not one flag per sequence",
                            "a session with a sensed head and a flag per sequence")  # fmt: skip
        toks, decs = self._batch_args(tokens, states)
        check_sensed(sensed, self.weights.head, self.vocab_size)
        B, n = len(decs), self.weights.head.n_padded
        logits, preview = np.zeros((B, n), np.float32), np.zeros((B, n), np.float32)
        cand = np.zeros((B, sensed.k + 1), np.int32)
        out, stats = np.zeros((B, 2), np.int32), np.zeros((B, 3), np.float32)
        rows = np.array([bool(g) for g in greedy], np.int32)
        pv = None if sensed.preview is None else sensed.preview.struct()  # None: the head's high plane

        def call(lib: ctypes.CDLL, m: _Model, args: tuple[Any, ...]) -> int:
            return int(lib.cs_dec_forward_batch_sensed(
                ctypes.byref(m), *args, None if pv is None else ctypes.addressof(pv), sensed.rowerr.ctypes.data, sensed.rowerr.size,
                int(sensed.k), float(sensed.tau), rows.ctypes.data, logits.ctypes.data, logits.size,
                preview.ctypes.data, preview.size, cand.ctypes.data, cand.size, out.ctypes.data, out.size,
                stats.ctypes.data, stats.size,
            ))  # fmt: skip

        self._batch_call(toks, decs, self.sensed_governors, call)
        for st, g, fell in zip(states, rows, out[:, 1]):
            if g:
                st.head_steps += 1
                st.head_fallbacks += int(fell)
        return logits[:, : self.vocab_size], [int(t) for t in out[:, 0]]

    def _batch_args(self, tokens: list[int] | np.ndarray, states: list[NativeState]) -> tuple[np.ndarray, list[NativeDecoder]]:  # fmt: skip
        """The batch's tokens (int32) and decoders, checked: this session's distinct states."""
        toks = np.ascontiguousarray(np.asarray(tokens).reshape(-1), np.int32)
        B = len(states)
        if len(toks) != B or not 1 <= B <= self.max_batch:
            raise UserError("native batch", f"{len(toks)} tokens for {B} sequences",
                            f"one token for each of 1 to {self.max_batch} sequences")  # fmt: skip
        rope = self.rope()
        for st in states:
            dec = getattr(st, "decoder", None)
            if (
                type(st) is not NativeState
                or dec is None
                or dec.w is not self.weights
                or dec._rope is not rope
            ):
                raise UserError("native batch", f"a {type(st).__name__} of another session",
                                "states made by this session's new_state")  # fmt: skip
        if len({id(st.decoder) for st in states}) != B:
            raise UserError("native batch", "one sequence twice", "distinct sequences")
        bad = toks[(toks < 0) | (toks >= self.vocab_size)]
        if len(bad):
            raise UserError("native batch", f"token id {int(bad[0])}", f"ids in [0, {self.vocab_size})")
        decs = [st.decoder for st in states]
        for dec in decs:
            dec._room(1)
        return toks, decs

    def _batch_call(self, toks: np.ndarray, decs: list[NativeDecoder], governors: dict[int, ThreadGovernor],
                    call: Callable[[ctypes.CDLL, _Model, tuple[Any, ...]], int]) -> None:  # fmt: skip
        """Run ``call(lib, model, batch arguments)`` (a batched C entry) on the session's batch
        struct, the thread count from ``governors`` (one per batch size); every decoder advances.
        """
        B = len(decs)
        lib = library()
        rope = self.rope()  # takes the lock itself
        with self._lock:
            if self._batch is None:
                self._batch = _Struct(self.weights, self.threads)
                m = self._batch.model
                m.max_ctx = self.context_length
                m.rope_cos, m.rope_sin, m.rope_len = rope[0].ctypes.data, rope[1].ctypes.data, rope[0].size
                floats = int(lib.cs_dec_work_floats(ctypes.byref(m)))
                if floats < 0:
                    raise _c_refused("native batch", floats)
                self._batch_work = np.zeros(floats, np.float32)
                m.work, m.work_len = self._batch_work.ctypes.data, self._batch_work.size
            gov = None
            if self.governor is not None:
                gov = governors.setdefault(B, ThreadGovernor(self.threads))
            threads = gov.choose() if gov is not None else self.threads
            self._batch.model.nthreads = threads
            t0 = time.perf_counter()
            kcs = (ctypes.c_void_p * B)(*[d.kc.ctypes.data for d in decs])
            vcs = (ctypes.c_void_p * B)(*[d.vc.ctypes.data for d in decs])
            pos = np.array([d.pos for d in decs], np.int32)
            caps = np.array([d.capacity for d in decs], np.int32)
            lens = np.array([min(d.kc.size, d.vc.size) for d in decs], np.int64)
            args = (B, toks.ctypes.data, pos.ctypes.data, ctypes.addressof(kcs), ctypes.addressof(vcs),
                    caps.ctypes.data, lens.ctypes.data)  # fmt: skip
            rc = call(lib, self._batch.model, args)
            if gov is not None and rc == 0:
                gov.record(threads, (time.perf_counter() - t0) * 1e3)
        if rc != 0:  # guarded above: the C step's own checks are the last line
            raise _c_refused("native batch", rc)
        for dec in decs:
            dec.pos += 1

    def _run(self, ids: np.ndarray, state: NativeState, all_logits: bool) -> np.ndarray:
        """``ids`` (one sequence, checked) after ``state``: what :meth:`NativeDecoder.forward` returns."""
        return state.decoder.forward(ids, all_logits=all_logits)

    @staticmethod
    def _sequence(input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise UserError("native engine", f"input_ids of shape {ids.shape}", "[1, S] (one sequence)")
        return ids[0]

    def forward(self, input_ids: np.ndarray, state: NativeState, attention_mask: np.ndarray | None = None,
                positions: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
        """``input_ids [1, S]`` after ``state`` → logits ``[1, S, V]`` (all positions)."""
        ids = self._sequence(input_ids)
        if positions is not None or (attention_mask is not None and not np.all(attention_mask)):
            raise UserError("native engine", "padding or explicit positions", "one unpadded sequence")
        return self._run(ids, state, all_logits=True)[None]

    def forward_last(self, input_ids: np.ndarray, state: NativeState) -> np.ndarray:
        """The hot path: logits ``[V]`` of the last position only (prefill skips the other heads)."""
        return self._run(self._sequence(input_ids), state, all_logits=False).copy()

    def greedy_step(self, token: int, state: NativeState) -> int:
        """Feed ``token``; the greedy next token (through the sensed head when the session has one)."""
        if self.sensed is None:
            return int(np.argmax(state.decoder.step(int(token))))
        st = state.decoder.step_greedy(int(token), self.sensed)
        state.head_steps += 1
        state.head_fallbacks += st.fell_back
        return st.token

    def sensed_logits(self, token: int, state: NativeState) -> np.ndarray:
        """Feed ``token``; the sensed head's logits for sampling (see
        :meth:`NativeDecoder.step_sensed_logits`); the full head's when the session has none.
        """
        if self.sensed is None:
            return state.decoder.step(int(token)).copy()
        z, st = state.decoder.step_sensed_logits(int(token), self.sensed)
        state.head_steps += 1
        state.head_fallbacks += st.fell_back
        return z
