"""The quantization grid of a GGUF source model, read exactly (not re-estimated from fp32).

SmolLM2 ships as Q4_1 (``w = d·q + m`` per block of 32, ``q ∈ [0, 15]``, ``d``/``m`` fp16) with a
Q8_0 embedding (``w = d·q``, ``q ∈ [-128, 127]``). Re-rounding the dequantized fp32 weights
costs 36% perplexity; keeping this grid is lossless. GGUF rows may be stored in another order
than the exported weight's (llama's Q/K rows are permuted for interleaved RoPE), so each
tensor is matched to its exported weight row by row and the match is exact or refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cscompile.errors import UserError

QK = 32  # block size of Q4_1 and Q8_0
QK_K = 256  # super-block size of the K-quants

#: llama.cpp weight types a GGUF source may hold (decoded by the ``gguf`` package, bit for bit
#: llama.cpp's dequantization); others are refused, naming the tensor.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
#: the block-quantized types :meth:`GGUFGrid.grid` reads exactly as a :class:`BlockGrid` (the rest are floats)
GRID_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


@dataclass
class BlockGrid:
    """``w[n, k] = scale[n, b] * q[n, k] + offset[n, b]`` with ``b = k // sub``; rows ``n`` = output features.

    ``kind`` is the code width the native step runs: ``Q4_1`` (uint8 codes in 0..15, with
    offsets) or ``Q8_0`` (int8 codes, offsets optional). ``sub`` (the elements one scale
    covers) is 32, or 16 for Q6_K's sub-blocks (then there are no offsets). Scales and offsets
    are float32: a GGUF's fp16 ``d``/``m`` (Q4_0 … Q8_0), or the exact products ``d·sc`` and
    ``−dmin·m`` of a K-quant's fp16 super-block scale and its 6/8-bit sub-block scale (bit for
    bit llama.cpp's ``d1``/``m1``); either way :meth:`dequantize` is llama.cpp's dequantization.
    """

    kind: str  # "Q4_1" or "Q8_0"
    q: np.ndarray  # [N, K] integer codes (uint8 for Q4_1 in 0..15, int8 for Q8_0)
    scale: np.ndarray  # [N, K/sub] float32
    offset: np.ndarray | None  # [N, K/sub] float32, or None

    @property
    def sub(self) -> int:
        """Elements one scale covers: 32, or 16 (Q6_K)."""
        return int(self.q.shape[1] // max(1, self.scale.shape[1]))

    def dequantize(self) -> np.ndarray:
        n, k = self.q.shape
        sub = self.sub
        q = self.q.astype(np.float32).reshape(n, k // sub, sub)
        w = q * self.scale[:, :, None]
        if self.offset is not None:
            w = w + self.offset[:, :, None]
        return w.reshape(n, k)

    def permute_rows(self, order: np.ndarray) -> BlockGrid:
        return BlockGrid(
            self.kind, self.q[order], self.scale[order], None if self.offset is None else self.offset[order]
        )


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes (last axis) as the fp16 value they hold, in float32."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[..., 16]`` bytes → ``[..., 32]`` codes: low nibbles first (elements 0..15), then high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.uint8)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 packed bytes → 8 six-bit sub-block scales and 8 mins (``get_scale_min_k4``)."""
    s = scales.reshape(*scales.shape[:-1], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _decode(raw: np.ndarray, kind: str, n: int, k: int) -> BlockGrid:
    """A GGUF tensor's blocks → its codes and per-block scales/offsets, exactly (``ggml-quants.c``)."""
    if kind not in GRID_TYPES:
        raise UserError("GGUF tensor", f"type {kind}", f"one of {', '.join(GRID_TYPES)} (a block grid)")
    qk = QK_K if kind.endswith("_K") else QK
    if k % qk:
        raise UserError("GGUF tensor", f"type {kind} with rows of {k}", f"rows a multiple of {qk}")
    blocks = np.asarray(raw).view(np.uint8).reshape(n, k // qk, -1)
    if kind == "Q4_0":  # { half d; uint8 qs[16]; }: w = d·(q − 8) = d·q + (−8d)
        d = _f16(blocks[..., 0:2])
        return BlockGrid("Q4_1", _nibbles(blocks[..., 2:18]).reshape(n, k), d, -8.0 * d)
    if kind == "Q4_1":  # { half d; half m; uint8 qs[16]; }
        q = _nibbles(blocks[..., 4:20])
        return BlockGrid(kind, q.reshape(n, k), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]))
    if kind in ("Q5_0", "Q5_1"):  # { half d; [half m;] uint8 qh[4]; uint8 qs[16]; }: 5-bit codes
        o = 2 if kind == "Q5_0" else 4  # qh: bit j (little-endian) is element j's fifth bit
        high = np.unpackbits(np.ascontiguousarray(blocks[..., o : o + 4]), axis=-1, bitorder="little")
        q5 = (_nibbles(blocks[..., o + 4 : o + 20]) | (high << 4)).astype(np.int8)
        d = _f16(blocks[..., 0:2])
        if kind == "Q5_0":  # w = d·(q − 16): int8 codes q − 16, the same d
            return BlockGrid("Q8_0", (q5 - 16).reshape(n, k), d, None)
        return BlockGrid("Q8_0", q5.reshape(n, k), d, _f16(blocks[..., 2:4]))
    if kind == "Q8_0":  # { half d; int8 qs[32]; }
        q = blocks[..., 2:34].copy().view(np.int8)
        return BlockGrid(kind, q.reshape(n, k), _f16(blocks[..., 0:2]), None)
    if kind in ("Q4_K", "Q5_K"):  # { half d; half dmin; uint8 scales[12]; [uint8 qh[32];] uint8 qs[128]; }
        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        sc, mn = _k_scale_min(blocks[..., 4:16])
        scale = (d[..., None] * sc).reshape(n, -1)  # llama.cpp's d1 = d·sc: exact in fp32
        offset = -(dmin[..., None] * mn).reshape(n, -1)  # −m1 = −dmin·m: exact in fp32
        c = blocks[..., -128:].reshape(n, -1, 4, 32)  # qs: 4 chunks of 32 bytes, two sub-blocks each
        q = np.concatenate([c & 0x0F, c >> 4], axis=-1).reshape(n, -1, 8, 32)  # low nibbles, then high
        if kind == "Q5_K":  # the fifth bit of sub-block i's element l is bit i of qh[l]
            qh = blocks[..., 16:48][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]
            return BlockGrid("Q8_0", (q | ((qh & 1) << 4)).astype(np.int8).reshape(n, k), scale, offset)
        return BlockGrid("Q4_1", q.astype(np.uint8).reshape(n, k), scale, offset)
    # Q6_K { uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d; }: w = d·sc·(q − 32), sc per 16
    ql = blocks[..., 0:128].reshape(n, -1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
    qh = blocks[..., 128:192].reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    q6 = ((ql & 0x0F).reshape(n, -1, 8, 32) | ((qh & 0x03).reshape(n, -1, 8, 32) << 4)).astype(np.int16)
    sc = blocks[..., 192:208].copy().view(np.int8).astype(np.float32)
    scale = (_f16(blocks[..., 208:210])[..., None] * sc).reshape(n, -1)  # d·sc: exact in fp32
    return BlockGrid("Q8_0", (q6 - 32).astype(np.int8).reshape(n, k), scale, None)


class GGUFGrid:
    """Read a GGUF file's block-quantized tensors by name."""

    def __init__(self, path: Path | str) -> None:
        from cscompile.errors import require

        gguf = require("gguf", "export", "reading a GGUF quantization grid")
        p = Path(path)
        if not p.is_file():
            raise UserError("GGUF file", f"no file at {p}", "the GGUF the model was converted from")
        try:
            reader = gguf.GGUFReader(str(p))
        except Exception as exc:
            raise UserError(
                f"GGUF file {p}", f"could not be read ({str(exc)[:120]})", "a valid GGUF file"
            ) from None
        self.path = p
        self.reader = reader
        self._tensors = {t.name: t for t in reader.tensors}

    def names(self) -> list[str]:
        return list(self._tensors)

    def _tensor(self, name: str):  # type: ignore[no-untyped-def]
        t = self._tensors.get(name)
        if t is None:
            raise UserError(
                "GGUF tensor", f"'{name}' not in {self.path.name}", "a tensor of the source model"
            )
        return t

    def kind(self, name: str) -> str:
        """The llama.cpp weight type of ``name`` (``Q4_K``, ``F16``, …)."""
        return str(self._tensor(name).tensor_type.name)

    def tensor(self, name: str) -> np.ndarray:
        """``name`` dequantized to float32 with the ``gguf`` package, numpy order (``[ne1, ne0]`` for a matrix)."""
        from gguf import quants

        t = self._tensor(name)
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise UserError(f"GGUF tensor '{name}'", f"type {kind}", f"one of {', '.join(SUPPORTED_TYPES)}")
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists ne0 (innermost) first
        out = quants.dequantize(np.asarray(t.data), t.tensor_type)
        return np.asarray(out, np.float32).reshape(shape)

    def grid(self, name: str) -> BlockGrid:
        t = self._tensor(name)
        kind = t.tensor_type.name
        k, n = (int(x) for x in t.shape[:2])  # GGUF shape is [ne0 = in, ne1 = out]
        return _decode(np.asarray(t.data), kind, n, k)

    def matched(self, name: str, weight_out_in: np.ndarray) -> BlockGrid:
        """The grid of ``name`` with rows reordered to equal ``weight_out_in`` ([out, in]) exactly."""
        g = self.grid(name)
        deq = g.dequantize()
        if deq.shape != weight_out_in.shape:
            raise UserError(
                "GGUF tensor",
                f"'{name}' has shape {deq.shape}",
                f"the exported weight's {weight_out_in.shape}",
            )
        if np.allclose(deq, weight_out_in, rtol=0, atol=1e-6):
            return g
        index = {row.tobytes(): i for i, row in enumerate(np.round(deq, 6))}
        order = np.array([index.get(row.tobytes(), -1) for row in np.round(weight_out_in, 6)])
        if (order < 0).any() or len(set(order.tolist())) != len(order):
            raise UserError(
                "GGUF tensor", f"'{name}' does not match the exported weight row for row", "the same model"
            )
        matched = g.permute_rows(order)
        if not np.allclose(matched.dequantize(), weight_out_in, rtol=0, atol=1e-6):
            raise UserError("GGUF tensor", f"'{name}' rows match but values differ", "the same model")
        return matched


def gguf_name(layer: int | None, role: str) -> str:
    """GGUF tensor name of a llama projection role (q, k, v, o, gate, up, down, embedding)."""
    if layer is None:
        return {"embedding": "token_embd.weight", "lm_head": "output.weight"}[role]
    suffix = {
        "q": "attn_q",
        "k": "attn_k",
        "v": "attn_v",
        "o": "attn_output",
        "gate": "ffn_gate",
        "up": "ffn_up",
        "down": "ffn_down",
    }[role]
    return f"blk.{layer}.{suffix}.weight"
