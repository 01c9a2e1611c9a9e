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
from cscompile.native.points import (
    BITS,
    LayerChoice,
    NativeConfig,
    Ranking,
    Shape,
    choices,
    units,
)
from cscompile.passes.gptq import hessian
from cscompile.quant.gguf import QK
from cscompile.search.joint import FrontPoint, LinearLatency, TorchVariants, front_of, knapsack, unit_kls

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
    return front_of(points)


def sequential_front(quality: NativeQualityTable, latency: NativeLatencyTable) -> list[FrontPoint]:
    """Architecture first, precision after: width and depth per layer under one model-wide precision."""
    points: list[FrontPoint] = []
    for ab, fb, hb in itertools.product(BITS, BITS, (8, 4)):
        points += pareto_front(quality, latency, choices(quality.shape, (ab,), (fb,)), head_bits=(hb,))
    return front_of(points)
