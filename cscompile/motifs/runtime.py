"""The switching runtime: per token, pick a motif of the family; fall back when recovery is poor.

Policy (all signals come from the previous token, so the choice costs nothing up front):

- **uncertainty-driven sensing (UDS)**: the entropy of the previous next-token distribution
  picks the budget — confident steps run the sparsest motif, uncertain ones denser motifs
  (entropy thresholds are quantiles measured on calibration text);
- **fallback**: if the previous step's mean recovery residual exceeded its calibrated
  threshold, run one motif denser;
- **hysteresis**: after moving denser, hold that motif for ``hold`` tokens before moving sparser
  again, so the controller does not oscillate;
- prefill always runs dense (the method's default; the prompt is processed once).

The session has the ``forward(ids, state)`` / ``new_state(batch)`` interface of
:class:`~cscompile.decode.session.DecoderSession`, so :class:`~cscompile.decode.generate.TextModel`
runs on it unchanged. The controller's state lives in the KV state object: concurrent
generations do not share it (the engine itself serializes its kernel calls).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cscompile.decode.session import KVState, SessionBase
from cscompile.motifs.engine import LayeredEngine, Motif, StepStats


@dataclass
class ControllerConfig:
    entropy_thresholds: list[float]  # ascending; len = len(motifs) - 1 (sparsest motif below the first)
    residual_threshold: float = float("inf")
    hold: int = 4

    def to_dict(self) -> dict:
        return {
            "entropy_thresholds": self.entropy_thresholds,
            "residual_threshold": self.residual_threshold if np.isfinite(self.residual_threshold) else None,
            "hold": self.hold,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ControllerConfig:
        r = d.get("residual_threshold")
        return cls(
            [float(x) for x in d["entropy_thresholds"]],
            float("inf") if r is None else float(r),
            int(d["hold"]),
        )


@dataclass
class SwitchStats:
    """Per-generation statistics of the switching runtime."""

    histogram: Counter = field(default_factory=Counter)
    executed: list[float] = field(default_factory=list)
    fallbacks: int = 0
    switches: int = 0
    ort_s: float = 0.0
    ffn_s: float = 0.0
    control_s: float = 0.0
    engine_s: float = 0.0  # a single-call engine's step (the native one): ORT/FFN times do not apply
    steps: int = 0
    bank: int | None = None

    def summary(self) -> dict:
        return {
            "motif_histogram": dict(self.histogram),
            "bank": self.bank,
            "executed_fraction": float(np.mean(self.executed)) if self.executed else 1.0,
            "fallbacks": self.fallbacks,
            "switches": self.switches,
            "decode_steps": self.steps,
            "ort_ms_per_step": self.ort_s / max(1, self.steps) * 1e3,
            "ffn_ms_per_step": self.ffn_s / max(1, self.steps) * 1e3,
            "control_ms_per_step": self.control_s / max(1, self.steps) * 1e3,
            "engine_ms_per_step": self.engine_s / max(1, self.steps) * 1e3,
        }


class SwitchState(KVState):
    """A KV state that also carries the controller's memory for one generation."""

    level: int = 0
    hold_left: int = 0
    last_entropy: float = 0.0
    last_residual: float = 0.0
    stats: SwitchStats
    bank: int | None = None


def entropy(logits: np.ndarray) -> float:
    """Entropy (nats) of softmax(logits), in float32: H = log Z − Σ p·z with z = logits − max
    (one exp over the vocabulary, no log of probabilities; 49k entries in ~0.1 ms).
    """
    z = logits.astype(np.float32, copy=False) - np.float32(logits.max())
    e = np.exp(z)
    total = float(e.sum(dtype=np.float64))
    return float(np.log(total) - float(np.dot(e, z)) / total)


def choose_level(cfg: ControllerConfig, n: int, st: Any) -> int:
    """The controller's step: the motif index (0 = densest of ``n``) for the next decode step,
    from ``st``'s memory (``level``, ``hold_left``, ``last_entropy``, ``last_residual``, ``stats``),
    which it updates.
    """
    # UDS: low entropy → sparse; thresholds ascending, sparsest motif is the last
    want = n - 1 - int(np.searchsorted(cfg.entropy_thresholds, st.last_entropy, side="right"))
    if st.last_residual > cfg.residual_threshold and st.level > 0:
        want = min(want, st.level - 1)
        st.stats.fallbacks += 1
    if want > st.level and st.hold_left > 0:  # moving sparser: wait out the hold
        st.hold_left -= 1
        want = st.level
    elif want < st.level:
        st.hold_left = cfg.hold
    if want != st.level:
        st.stats.switches += 1
    st.level = want
    return want


class SwitchingSession(SessionBase):
    """Motifs ordered densest first; ``motifs[0]`` is usually the dense motif."""

    def __init__(
        self,
        engine: LayeredEngine,
        motifs: list[Motif],
        config: ControllerConfig,
        bank_motifs: list[list[Motif]] | None = None,
        selector: Any = None,
    ) -> None:
        """``bank_motifs[b]``: the motifs with bank ``b``'s predictors; ``selector.choose(feature)``
        picks the bank at prefill from the prompt's mean layer-0 FFN input.
        """
        if len(config.entropy_thresholds) != len(motifs) - 1:
            raise ValueError(f"{len(motifs)} motifs need {len(motifs) - 1} entropy thresholds")
        if (bank_motifs is None) != (selector is None):
            raise ValueError("bank motifs and a bank selector go together")
        self.engine = engine
        self.motifs = motifs
        self.bank_motifs = bank_motifs
        self.selector = selector
        self.config = config
        self.intermediate = engine.intermediate
        self.last_state: SwitchState | None = None

    def new_state(self, batch: int = 1) -> SwitchState:
        base = self.engine.new_state(batch)
        st = SwitchState(batch=base.batch, past=base.past, length=base.length, attention=base.attention)
        st.level, st.hold_left, st.last_entropy, st.last_residual = 0, 0, 0.0, 0.0
        st.stats = SwitchStats()
        st.bank = None
        self.last_state = st  # for a CLI's --stats after one generation (not meaningful across threads)
        return st

    def only(self, name: str) -> SwitchingSession:
        """A session that always runs the motif ``name`` (with its bank, if the family has banks)."""
        for i, motif in enumerate(self.motifs):
            if motif.name == name:
                banks = None if self.bank_motifs is None else [[bm[i]] for bm in self.bank_motifs]
                return SwitchingSession(self.engine, [motif], ControllerConfig([]), banks, self.selector)
        raise ValueError(f"no motif named {name!r} (have {[m.name for m in self.motifs]})")

    def choose(self, st: SwitchState) -> int:
        """Index into ``motifs`` for the next decode step (0 = densest)."""
        return choose_level(self.config, len(self.motifs), st)

    def forward(self, input_ids: np.ndarray, state: KVState) -> np.ndarray:
        st = state if isinstance(state, SwitchState) else None
        if input_ids.shape[1] > 1 or st is None:
            seen: list[np.ndarray] = []
            observe = (
                (lambda li, x: seen.append(x) if li == 0 else None)
                if self.selector and st is not None
                else None
            )
            logits = self.engine.forward(input_ids, state, observe=observe)  # dense prefill
            if st is not None:
                st.last_entropy = entropy(logits[0, -1])
                if seen and st.bank is None:  # the first prefill of a generation picks the bank
                    from cscompile.recovery.banks import prompt_feature

                    st.bank = self.selector.choose(prompt_feature(seen[0]))
                    st.stats.bank = st.bank
            return logits
        t0 = time.perf_counter()
        level = self.choose(st)
        motifs = (
            self.bank_motifs[st.bank] if self.bank_motifs is not None and st.bank is not None else self.motifs
        )
        motif = motifs[level]
        step = StepStats()
        t1 = time.perf_counter()
        logits = self.engine.forward(input_ids, st, motif, step)
        t2 = time.perf_counter()
        st.last_entropy = entropy(logits[0, -1])
        st.last_residual = float(np.mean(step.residuals)) if step.residuals else 0.0
        s = st.stats
        s.histogram[motif.name] += 1
        s.executed.append(float(np.sum(step.executed)) / (self.intermediate * self.engine.num_layers))
        s.ort_s += step.ort_s
        s.ffn_s += step.ffn_s
        s.control_s += (t1 - t0) + (time.perf_counter() - t2)
        s.steps += 1
        return logits


def calibrate_controller(
    engine: LayeredEngine,
    motifs: list[Motif],
    calib_ids: np.ndarray,
    quantiles: list[float] | None = None,
    residual_quantile: float = 0.95,
    steps: int = 128,
) -> ControllerConfig:
    """Entropy thresholds at ``quantiles`` of the next-token entropy on calibration text, and the
    residual threshold at ``residual_quantile`` of the sparsest motif's residuals.
    """
    n = len(motifs)
    quantiles = quantiles or [float(q) for q in np.linspace(0.5, 0.9, n - 1)] if n > 1 else []
    ids = np.asarray(calib_ids)[: steps + 1]
    logits = engine.forward(ids[None], engine.new_state())
    ents = [entropy(row) for row in logits[0]]
    thresholds = sorted(float(np.quantile(ents, q)) for q in quantiles)
    residuals: list[float] = []
    if n > 1:
        st = engine.new_state()
        engine.forward(ids[None, :1], st)
        for t in ids[1:steps]:
            step = StepStats()
            engine.forward(np.array([[t]]), st, motifs[-1], step)
            if step.residuals:
                residuals.append(float(np.mean(step.residuals)))
    thr = float(np.quantile(residuals, residual_quantile)) if residuals else float("inf")
    return ControllerConfig(entropy_thresholds=thresholds, residual_threshold=thr)
