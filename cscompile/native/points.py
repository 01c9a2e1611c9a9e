"""Configurations of the native weights: a width × depth × precision point (``NativeConfig``),
the unit ranking it keeps by, and :func:`derive_config`, which makes its weights from the
native weights. Written by the search (:mod:`cscompile.search.native_search`), read at load.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cscompile.errors import UserError
from cscompile.quant.gguf import QK

HEAD_FRACTIONS = (1.0, 2 / 3, 1 / 3, 0.0)


FFN_FRACTIONS = (1.0, 7 / 8, 3 / 4, 1 / 2, 0.0)


BITS = (4, 8)


@dataclass(frozen=True)
class Shape:
    """The dimensions the space is built from."""

    n_layers: int
    n_heads: int
    ffn_blocks: int
    single_heads: bool = True  # False: head_dim is not whole grid blocks; attention kept or dropped whole

    @classmethod
    def of(cls, config: dict[str, Any]) -> Shape:
        """The space of a native config (``n_layers``, ``n_heads``, ``inter``, ``head_dim``)."""
        return cls(int(config["n_layers"]), int(config["n_heads"]), int(config["inter"]) // QK,
                   int(config["head_dim"]) % QK == 0)  # fmt: skip

    def head_levels(self) -> list[int]:
        if not self.single_heads:
            return [self.n_heads, 0]
        return sorted({round(f * self.n_heads) for f in HEAD_FRACTIONS}, reverse=True)

    def block_levels(self) -> list[int]:
        return sorted({round(f * self.ffn_blocks) for f in FFN_FRACTIONS}, reverse=True)


@dataclass(frozen=True)
class LayerChoice:
    """What one layer becomes: heads and FFN blocks kept, and their precisions."""

    heads: int
    blocks: int
    attn_bits: int = 4
    ffn_bits: int = 4

    @property
    def name(self) -> str:
        if self.heads == 0 and self.blocks == 0:
            return "drop"
        a = f"h{self.heads}" + (f"@{self.attn_bits}" if self.heads else "")
        f = f"f{self.blocks}" + (f"@{self.ffn_bits}" if self.blocks else "")
        return f"{a},{f}"

    @classmethod
    def parse(cls, name: str) -> LayerChoice:
        if name == "drop":
            return cls(0, 0)
        try:
            a, f = name.split(",")
            ha, _, ab = a[1:].partition("@")
            fb, _, fbits = f[1:].partition("@")
            return cls(int(ha), int(fb), int(ab or 4), int(fbits or 4))
        except ValueError:
            raise UserError("search config", f"layer choice {name!r}", "'drop' or 'hH@B,fF@B'") from None

    def units(self, shape: Shape) -> list[str]:
        """The proxy terms (each measured alone per layer) this choice is made of."""
        if self.heads == 0 and self.blocks == 0:
            return ["drop"]
        out = []
        if self.heads < shape.n_heads:
            out.append(f"heads-{self.heads}")
        if self.heads and self.attn_bits == 8:
            out.append("attn-q8")
        if self.blocks < shape.ffn_blocks:
            out.append(f"ffn-{self.blocks}")
        if self.blocks and self.ffn_bits == 8:
            out.append("ffn-q8")
        return out


def choices(
    shape: Shape, attn_bits: Sequence[int] = BITS, ffn_bits: Sequence[int] = BITS
) -> list[LayerChoice]:
    """Every layer choice of the space (precisions restricted to the given ones)."""
    out = []
    for h, b in itertools.product(shape.head_levels(), shape.block_levels()):
        for ab, fb in itertools.product(attn_bits if h else (4,), ffn_bits if b else (4,)):
            out.append(LayerChoice(h, b, ab, fb))
    return out


def units(shape: Shape) -> list[str]:
    out = [f"heads-{h}" for h in shape.head_levels() if h < shape.n_heads]
    out += [f"ffn-{b}" for b in shape.block_levels() if b < shape.ffn_blocks]
    return [*out, "attn-q8", "ffn-q8", "drop"]


@dataclass(frozen=True)
class NativeConfig:
    """One point of the space: a choice per layer and the LM head's bits."""

    layers: tuple[LayerChoice, ...]
    head_bits: int = 8

    def describe(self) -> dict[str, Any]:
        return {"layers": [c.name for c in self.layers], "head_bits": self.head_bits}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NativeConfig:
        if not isinstance(d, dict) or not isinstance(d.get("layers"), list):
            raise UserError("search config", f"{str(d)[:80]}", "{layers: [...], head_bits: 8|4}")
        layers = tuple(LayerChoice.parse(str(n)) for n in d["layers"])
        head_bits = d.get("head_bits", 8)
        if head_bits not in (4, 8):
            raise UserError("search config", f"head_bits {head_bits!r}", "4 or 8")
        return cls(layers, int(head_bits))

    def counts(self) -> dict[str, int]:
        """Query heads and FFN blocks kept, layers dropped, 8-bit unit types, over the model."""
        cs = self.layers
        return {
            "heads": sum(c.heads for c in cs),
            "blocks": sum(c.blocks for c in cs),
            "dropped": sum(c.heads == 0 and c.blocks == 0 for c in cs),
            "q8": sum((c.heads > 0 and c.attn_bits == 8) + (c.blocks > 0 and c.ffn_bits == 8) for c in cs),
        }

    def check(self, shape: Shape) -> None:
        """A clear error unless this configuration fits a model of ``shape``."""
        if len(self.layers) != shape.n_layers:
            raise UserError("search config", f"{len(self.layers)} layers", f"{shape.n_layers} (the model's)")
        for i, c in enumerate(self.layers):
            if not (0 <= c.heads <= shape.n_heads and 0 <= c.blocks <= shape.ffn_blocks) or {
                c.attn_bits,
                c.ffn_bits,
            } - set(BITS):
                raise UserError(
                    "search config",
                    f"layer {i}: {c.name}",
                    f"at most {shape.n_heads} heads and {shape.ffn_blocks} FFN blocks, at 4 or 8 bits",
                )
        if all(c.heads == 0 and c.blocks == 0 for c in self.layers):
            raise UserError("search config", "every layer dropped", "at least one layer kept")

    def plans(self, ranking: Ranking) -> list[Any]:
        """The :class:`~cscompile.native.engine.LayerPlan` of each layer (most important units kept)."""
        from cscompile.native.engine import LayerPlan

        self.check(ranking.shape)
        out = []
        for i, c in enumerate(self.layers):
            heads = ranking.heads[i][len(ranking.heads[i]) - c.heads :] if c.heads else []
            blocks = ranking.blocks[i][len(ranking.blocks[i]) - c.blocks :] if c.blocks else []
            out.append(LayerPlan(tuple(sorted(heads)), tuple(sorted(blocks)), c.attn_bits, c.ffn_bits))
        return out


def dense_config(shape: Shape) -> NativeConfig:
    return NativeConfig((LayerChoice(shape.n_heads, shape.ffn_blocks),) * shape.n_layers)


@dataclass
class Ranking:
    """Per layer, query heads and FFN blocks from least to most important."""

    heads: list[list[int]]
    blocks: list[list[int]]

    @property
    def shape(self) -> Shape:
        return Shape(len(self.heads), len(self.heads[0]), len(self.blocks[0]))

    def to_dict(self) -> dict[str, Any]:
        return {"heads": self.heads, "blocks": self.blocks}


def derive_config(
    base: Any, config: NativeConfig, ranking: Ranking, head: Any = None, keep_kv: bool = False
) -> Any:
    """The native weights of ``config`` (sliced from ``base``; see :func:`plugins.native.derive`);
    ``head``: the packed 4-bit LM head to use when the config asks for one (GPTQ; default RTN);
    ``keep_kv``: as a motif switched per token (dropped attention still writes its K/V).
    """
    from cscompile.native.engine import derive

    return derive(
        base,
        config.plans(ranking),
        head_bits=config.head_bits,
        head=head if config.head_bits == 4 else None,
        keep_kv=keep_kv,
    )
