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

#: llama.cpp weight types a GGUF source may hold (decoded by the ``gguf`` package, bit for bit
#: llama.cpp's dequantization); others are refused, naming the tensor.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


@dataclass
class BlockGrid:
    """``w[n, k] = scale[n, b] * q[n, k] + offset[n, b]`` with ``b = k // 32``; rows ``n`` = output features."""

    kind: str  # "Q4_1" or "Q8_0"
    q: np.ndarray  # [N, K] integer codes (uint8 for Q4_1 in 0..15, int8 for Q8_0)
    scale: np.ndarray  # [N, K/32] float32
    offset: np.ndarray | None  # [N, K/32] float32 (Q4_1), None (Q8_0)

    def dequantize(self) -> np.ndarray:
        n, k = self.q.shape
        q = self.q.astype(np.float32).reshape(n, k // QK, QK)
        w = q * self.scale[:, :, None]
        if self.offset is not None:
            w = w + self.offset[:, :, None]
        return w.reshape(n, k)

    def permute_rows(self, order: np.ndarray) -> BlockGrid:
        return BlockGrid(
            self.kind, self.q[order], self.scale[order], None if self.offset is None else self.offset[order]
        )


def _decode(raw: np.ndarray, kind: str, n: int, k: int) -> BlockGrid:
    blocks = raw.reshape(n, k // QK, -1)
    if kind == "Q4_1":  # struct { half d; half m; uint8 qs[16]; }: low nibbles = elements 0..15
        d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[:, :, 4:20]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.uint8)  # [N, nb, 32]
        return BlockGrid(kind, q.reshape(n, k), d, m)
    if kind == "Q8_0":  # struct { half d; int8 qs[32]; }
        d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = blocks[:, :, 2:34].copy().view(np.int8)
        return BlockGrid(kind, q.reshape(n, k), d, None)
    raise UserError("GGUF tensor", f"type {kind}", "Q4_1 or Q8_0 (the grids the native step runs)")


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
