"""The feasible family: which per-layer densities to compile, chosen from calibration.

Layers differ in how much a missed channel costs (measured: on SmolLM2 a uniform 50% costs
+61% perplexity with a sketch predictor, and most of that comes from a few layers). The family
is built in three cheap steps, all on calibration text:

1. **error curves** — per layer ``l`` and density level ``d``, the relative error of the FFN
   output when only the predicted top-``d`` channels run: ``‖a⊙(1−mask) W_down‖ / ‖a W_down‖``
   (one dense pass, the predictor applied offline);
2. **sensitivity** — per layer, the KL divergence from the dense next-token distribution when
   that layer alone runs at a probe density (one pass per layer), which converts output error
   into model loss;
3. **allocation** — greedily lower the density of the layer whose next level costs the least
   predicted loss per channel saved, until the mean density reaches each target. Each target
   gives one motif; the motifs, their predictors and measured quality go into the bundle.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cscompile.motifs.engine import LayeredEngine, LayerPredictor, Motif
from cscompile.motifs.kernel import predicted_support

LEVELS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


def error_curves(
    engine: LayeredEngine,
    preds: Sequence[LayerPredictor],
    calib_ids: np.ndarray,
    levels: Sequence[float] = LEVELS,
    window: int = 512,
    max_tokens: int = 1024,
) -> np.ndarray:
    """``[L, len(levels)]`` relative FFN-output error of the predicted support at each level."""
    num = np.zeros((engine.num_layers, len(levels)))
    den = np.zeros(engine.num_layers)
    downs = [f.dense_weights()[:, 2, :] for f in engine.ffn]
    inter = engine.intermediate

    def record(li: int, x: np.ndarray, a: np.ndarray) -> None:
        p = preds[li]
        full = a @ downs[li]
        den[li] += float((full**2).sum())
        for j, d in enumerate(levels):
            k = min(inter, max(1, round(d * inter)))
            if k >= inter:
                continue
            mask = predicted_support(x, p.phi, p.decoder, p.bias, k, min(p.hot, k))
            miss = (a * ~mask) @ downs[li]
            num[li, j] += float((miss**2).sum())

    ids = np.asarray(calib_ids)[:max_tokens]
    engine.recorder = record
    try:
        for start in range(0, len(ids) - 1, window):
            engine.forward(ids[None, start : start + window], engine.new_state())
    finally:
        engine.recorder = None
    return np.sqrt(num / np.maximum(den, 1e-30)[:, None])


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(p ‖ q) between next-token distributions given as logits."""
    p = p_logits.reshape(-1, p_logits.shape[-1]).astype(np.float64)
    q = q_logits.reshape(-1, q_logits.shape[-1]).astype(np.float64)
    lp = p - p.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = q - q.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def sensitivities(
    logits: Callable[[Motif], np.ndarray],
    engine: LayeredEngine,
    preds: Sequence[LayerPredictor],
    probe: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Per layer: mean KL(dense ‖ that layer alone at ``probe`` density) over calibration positions.

    KL against the dense model's own distribution, not a perplexity difference: it is never
    negative and needs far fewer tokens (a single layer moves perplexity by less than its noise).
    """
    inter = engine.intermediate
    base = logits(Motif("dense", [None] * engine.num_layers))
    out = np.zeros(engine.num_layers)
    for li in range(engine.num_layers):
        k: list[int | None] = [None] * engine.num_layers
        k[li] = round(probe * inter)
        out[li] = mean_kl(base, logits(Motif(f"probe{li}", k, list(preds))))
        if progress:
            progress(li + 1, engine.num_layers)
    return out


def allocate(
    curves: np.ndarray, sens: np.ndarray, levels: Sequence[float], target: float, probe: float = 0.5
) -> list[float]:
    """Per-layer densities with mean ≤ ``target``, greedily minimizing predicted loss.

    Predicted loss of layer ``l`` at level ``d``: ``sens_l · (e_l(d) / e_l(probe))²`` (a layer's
    loss grows with the square of its output error, scaled to the measured probe).
    """
    levels = list(levels)
    j_probe = int(np.argmin([abs(x - probe) for x in levels]))
    scale = np.maximum(sens, 0.0) / np.maximum(curves[:, j_probe] ** 2, 1e-12)
    loss = curves**2 * scale[:, None]  # [L, levels]
    at = [0] * len(curves)  # index into levels (0 = densest)
    while np.mean([levels[j] for j in at]) > target + 1e-9:
        best, best_cost = None, np.inf
        for li, j in enumerate(at):
            if j + 1 >= len(levels):
                continue
            saved = levels[j] - levels[j + 1]
            cost = (loss[li, j + 1] - loss[li, j]) / saved
            if cost < best_cost:
                best, best_cost = li, cost
        if best is None:
            break
        at[best] += 1
    return [levels[j] for j in at]


@dataclass
class FamilyMember:
    """One motif of the family with what was measured for it."""

    name: str
    densities: list[float]
    perplexity: float | None = None
    decode_ms: float | None = None

    def motif(self, intermediate: int, preds: Sequence[LayerPredictor]) -> Motif:
        k = [None if d >= 1.0 else max(1, round(d * intermediate)) for d in self.densities]
        return Motif(self.name, k, list(preds))


@dataclass
class Family:
    """Motifs sharing one engine and one predictor set (serialized into a bundle)."""

    members: list[FamilyMember]
    m: int
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "m": self.m,
                "seed": self.seed,
                "meta": self.meta,
                "members": [vars(mb) for mb in self.members],
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Family:
        d = json.loads(text)
        return cls(
            members=[FamilyMember(**mb) for mb in d["members"]], m=d["m"], seed=d["seed"], meta=d["meta"]
        )


def predictors_to_arrays(preds: Sequence[LayerPredictor]) -> dict[str, np.ndarray]:
    """npz-ready arrays (no pickle): one shared Φ, stacked decoders/biases, hot sizes."""
    return {
        "phi": preds[0].phi,
        "decoder": np.stack([p.decoder for p in preds]),
        "bias": np.stack(
            [p.bias if p.bias is not None else np.zeros(len(p.decoder), np.float32) for p in preds]
        ),
        "hot": np.array([p.hot for p in preds], np.int64),
    }


def predictors_from_arrays(arrays: dict[str, np.ndarray]) -> list[LayerPredictor]:
    phi = np.ascontiguousarray(arrays["phi"], np.float32)
    return [
        LayerPredictor(
            phi=phi,
            decoder=np.ascontiguousarray(arrays["decoder"][i], np.float32),
            bias=np.ascontiguousarray(arrays["bias"][i], np.float32),
            hot=int(arrays["hot"][i]),
        )
        for i in range(len(arrays["decoder"]))
    ]
