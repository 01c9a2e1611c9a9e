"""Joint width × depth × precision search on the native decode step (seed 004, issue 8).

The space, per decoder layer, on the engine users run by default (``native/engine.py``):

* width: the ``h`` most important query heads kept (K/V stay whole: one cache layout), the ``b``
  most important FFN blocks of 32 channels kept (blocks of the down projection's source grid, so
  a kept block is exact); importance = the mean squared norm of the unit's contribution to the
  residual stream on calibration tokens (its output through O / down);
* depth: ``h = 0`` drops the attention, ``b = 0`` the FFN, both the layer;
* precision of what is kept, per unit type: 4-bit (Q4_1 — the source grid when the model came
  as Q4_1) or 8-bit (Q8_0); the LM head 8- or 4-bit.

Quality proxy: mean KL from the dense model per unit choice applied to one layer alone (PyTorch,
like :mod:`cscompile.search.joint`), summed; a layer dropped whole is its own measured unit.
Latency: a table fitted by least squares to the decode latency of native engines derived here
(never FLOPs): a fixed part, per-layer attention/FFN overheads and per-head / per-block costs,
each at 4 and 8 bits. Both are sums over layers, so the front is the same exact multiple-choice
knapsack as :func:`cscompile.search.joint.pareto_front`.

**Sequential** baseline (architecture first, precision after): the same search with each
precision fixed model-wide — the best width/depth choice for each uniform precision.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from cscompile.errors import UserError
from cscompile.native.engine import spans
from cscompile.passes.gptq import hessian
from cscompile.quant.gguf import QK
from cscompile.search.joint import FrontPoint, LinearLatency, TorchVariants, _front, knapsack, unit_kls

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


# -- latency ---------------------------------------------------------------------------------------

LAT_TERMS = (
    "base",
    "attn@4",
    "attn@8",
    "qhead@4",
    "qhead@8",
    "ffn@4",
    "ffn@8",
    "block@4",
    "block@8",
    "lmhead@4",
)


def latency_features(config: NativeConfig) -> np.ndarray:
    f = dict.fromkeys(LAT_TERMS, 0.0)
    f["base"] = 1.0
    for c in config.layers:
        if c.heads:
            f[f"attn@{c.attn_bits}"] += 1
            f[f"qhead@{c.attn_bits}"] += c.heads
        if c.blocks:
            f[f"ffn@{c.ffn_bits}"] += 1
            f[f"block@{c.ffn_bits}"] += c.blocks
    f["lmhead@4"] = 1.0 if config.head_bits == 4 else 0.0
    return np.array([f[t] for t in LAT_TERMS])


def probe_configs(shape: Shape) -> list[NativeConfig]:
    """Engines whose measured latencies determine the table (each term varies independently),
    then two mixed configurations the fit must predict.
    """
    L, nh, nb = shape.n_layers, shape.n_heads, shape.ffn_blocks
    h2, b2 = shape.head_levels()[-2], shape.block_levels()[-2]  # the narrowest non-zero widths

    def every(c: LayerChoice) -> NativeConfig:
        return NativeConfig((c,) * L)

    full = LayerChoice(nh, nb)
    half = L // 2
    mixed = choices(shape)
    probes = [
        every(full),
        every(LayerChoice(h2, nb)),
        every(LayerChoice(0, nb)),
        every(LayerChoice(nh, b2)),
        every(LayerChoice(nh, 0)),
        every(LayerChoice(nh, nb, 8, 4)),
        every(LayerChoice(h2, nb, 8, 4)),
        every(LayerChoice(nh, nb, 4, 8)),
        every(LayerChoice(nh, b2, 4, 8)),
        NativeConfig((full,) * L, head_bits=4),
        NativeConfig((full,) * half + (LayerChoice(0, 0),) * (L - half)),
        NativeConfig(tuple(mixed[(7 * i) % len(mixed)] for i in range(L))),
        NativeConfig(tuple(mixed[(5 * i + 3) % len(mixed)] for i in range(L)), head_bits=4),
    ]
    # heads kept or dropped whole (h2 == nh): the per-head terms are not separable and not needed
    return list(dict.fromkeys(probes))


@dataclass
class NativeLatencyTable(LinearLatency):
    TERMS: ClassVar[tuple[str, ...]] = LAT_TERMS

    @staticmethod
    def features(config: Any) -> np.ndarray:
        return latency_features(config)

    def choice_ms(self, c: LayerChoice) -> float:
        """What one layer choice adds to a token."""
        return self.predict(NativeConfig((c,))) - self.coef["base"]

    def predict_motif(self, config: NativeConfig) -> float:
        """``config`` as a motif of the switching runtime: a layer whose heads are all dropped
        still writes its K/V, priced as the attention's per-layer term (the K/V rows, the norm and
        the cache write; the per-head terms are the query rows, the scores and the O columns).
        """
        kv = sum(1 for c in config.layers if c.heads == 0)
        return self.predict(config) + kv * self.coef["attn@4"]


# -- quality proxy ---------------------------------------------------------------------------------


class NativeVariants(TorchVariants):
    """:class:`TorchVariants` with the native space's units: a layer's least important heads or
    FFN blocks removed (their O / down columns zeroed: what removing them computes), its
    projections re-rounded to Q8_0, the LM head to Q4_1, a layer dropped whole.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_grid: Any = None
        cfg = self.model.config
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.shape = Shape.of({"n_layers": len(self.layers), "n_heads": cfg.num_attention_heads,
                               "inter": cfg.intermediate_size, "head_dim": self.head_dim})  # fmt: skip
        self.ranking = self._rank()

    def _rank(self) -> Ranking:
        """Mean squared norm of each head's / block's contribution to the residual stream."""
        torch, hd = self.torch, self.head_dim
        nh, nb = self.shape.n_heads, self.shape.ffn_blocks
        h_score = np.zeros((len(self.layers), nh))
        b_score = np.zeros((len(self.layers), nb))
        hooks = []
        for i, lay in enumerate(self.layers):

            def on_o(mod: Any, inp: Any, i: int = i) -> None:
                x = inp[0].reshape(-1, nh, hd).double()  # [T, nh, hd]
                w = mod.weight.double().reshape(-1, nh, hd)  # [H, nh, hd]
                h_score[i] += (torch.einsum("thd,ohd->tho", x, w) ** 2).sum((0, 2)).numpy()

            def on_down(mod: Any, inp: Any, i: int = i) -> None:
                a = inp[0].reshape(-1, nb, QK).double()
                w = mod.weight.double().reshape(-1, nb, QK)
                b_score[i] += (torch.einsum("tbk,obk->tbo", a, w) ** 2).sum((0, 2)).numpy()

            hooks.append(lay.self_attn.o_proj.register_forward_pre_hook(on_o))
            hooks.append(lay.mlp.down_proj.register_forward_pre_hook(on_down))
        hidden = self.model.config.hidden_size
        self.head_hessian = np.zeros((hidden, hidden))

        def on_head(mod: Any, inp: Any) -> None:
            self.head_hessian += hessian(inp[0].reshape(-1, hidden).double().numpy())

        hooks.append(self.model.get_output_embeddings().register_forward_pre_hook(on_head))
        try:
            with torch.no_grad():
                for c in self.chunks:
                    self.model(torch.from_numpy(np.asarray(c[None], np.int64)))
        finally:
            for h in hooks:
                h.remove()
        return Ranking(
            [[int(j) for j in np.argsort(s, kind="stable")] for s in h_score],
            [[int(j) for j in np.argsort(s, kind="stable")] for s in b_score],
        )

    def _mask_cols(self, mod: Any, cols: np.ndarray) -> Callable[[], None]:
        def masked(w: np.ndarray) -> np.ndarray:
            w = w.copy()
            w[:, cols] = 0
            return w

        return self._reweight([mod], masked)

    def _regrid(self, mods: list[Any], kind: str) -> Callable[[], None]:
        from cscompile.native.engine import rtn_grid

        return self._reweight(mods, lambda w: rtn_grid(w, kind).dequantize())

    def apply(self, layer: int, unit: str) -> Callable[[], None]:
        lay = self.layers[layer]
        a, m = lay.self_attn, lay.mlp
        hd = self.head_dim
        if unit == "attn-q8":
            return self._regrid([a.q_proj, a.k_proj, a.v_proj, a.o_proj], "Q8_0")
        if unit == "ffn-q8":
            return self._regrid([m.gate_proj, m.up_proj, m.down_proj], "Q8_0")
        if unit.startswith("heads-"):
            kept = int(unit.split("-")[1])
            dropped = self.ranking.heads[layer][: self.shape.n_heads - kept]
            return self._mask_cols(a.o_proj, spans(dropped, hd))
        if unit.startswith("ffn-"):
            kept = int(unit.split("-")[1])
            dropped = self.ranking.blocks[layer][: self.shape.ffn_blocks - kept]
            return self._mask_cols(m.down_proj, spans(dropped, QK))
        if unit == "drop":
            return super().apply(layer, "drop")
        raise UserError("native search", f"unit {unit!r}", ", ".join(units(self.shape)))

    @property
    def head_grid(self) -> Any:
        """The LM head rounded to Q4_1 by GPTQ on the proxy tokens' final hidden states (computed once)."""
        if self._head_grid is None:
            from cscompile.passes.gptq import gptq_grid

            w = self.model.get_output_embeddings().weight.detach().float().numpy()
            self._head_grid = gptq_grid(w, self.head_hessian, "Q4_1")
        return self._head_grid

    def head_weights(self) -> np.ndarray:
        """The LM head re-rounded to Q4_1 by GPTQ (the embedding keeps its grid, as the engine does)."""
        return np.asarray(self.head_grid.dequantize())

    def changes(self, config: Any) -> tuple[list[tuple[int, str]], bool]:
        return [
            (i, u) for i, c in enumerate(config.layers) for u in c.units(self.shape)
        ], config.head_bits == 4


@dataclass
class NativeQualityTable:
    """Mean KL to the dense model of each unit applied to one layer alone; the 4-bit head's."""

    shape: Shape
    base_nll: float
    delta: dict[str, list[float]]
    head_q4: float

    def choice_delta(self, layer: int, c: LayerChoice) -> float:
        return float(sum(self.delta[u][layer] for u in c.units(self.shape)))

    def predict(self, config: NativeConfig) -> float:
        d = sum(self.choice_delta(i, c) for i, c in enumerate(config.layers))
        return d + (self.head_q4 if config.head_bits == 4 else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"base_nll": self.base_nll, "delta_kl": self.delta, "head_q4": self.head_q4,
                "shape": [self.shape.n_layers, self.shape.n_heads, self.shape.ffn_blocks]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NativeQualityTable:
        return cls(Shape(*d["shape"]), float(d["base_nll"]), d["delta_kl"], float(d["head_q4"]))


def quality_table(
    tv: NativeVariants, progress: Callable[[int, int], None] | None = None
) -> NativeQualityTable:
    """Each unit of the space applied to each layer alone, scored by KL to the dense model."""
    delta, head = unit_kls(tv, units(tv.shape), progress)
    return NativeQualityTable(tv.shape, tv.base_nll, delta, head)


# -- the fronts ------------------------------------------------------------------------------------


def pareto_front(quality: NativeQualityTable, latency: NativeLatencyTable, options: Sequence[LayerChoice] | None = None,
                 head_bits: Sequence[int] = (8, 4), bin_ms: float = 0.005) -> list[FrontPoint]:  # fmt: skip
    """Exact Pareto front (predicted latency vs predicted KL) over per-layer choices."""
    shape = quality.shape
    opts = list(options if options is not None else choices(shape))
    costs = [max(0, round(latency.choice_ms(c) / bin_ms)) for c in opts]
    table = knapsack(
        shape.n_layers,
        costs,
        lambda layer, j: quality.choice_delta(layer, opts[j]),
        [c.heads > 0 or c.blocks > 0 for c in opts],
    )
    points = []
    for hb in head_bits:
        for _b, (_q, picks) in table.items():
            cfg = NativeConfig(tuple(opts[j] for j in picks), hb)
            points.append(FrontPoint(cfg, latency.predict(cfg), quality.predict(cfg)))
    return _front(points)


def sequential_front(quality: NativeQualityTable, latency: NativeLatencyTable) -> list[FrontPoint]:
    """Architecture first, precision after: width and depth per layer under one model-wide precision."""
    points: list[FrontPoint] = []
    for ab, fb, hb in itertools.product(BITS, BITS, (8, 4)):
        points += pareto_front(quality, latency, choices(quality.shape, (ab,), (fb,)), head_bits=(hb,))
    return _front(points)
