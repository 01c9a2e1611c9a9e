"""Per-token switching among native motifs: one C step, several derived weight sets, one cache.

A native motif is a width × depth × precision configuration of the model's native weights (a
point of the native front, :mod:`cscompile.search.native_search`), derived with ``keep_kv`` so that
a layer whose attention it skips still writes that token's K/V: every motif reads and writes the
same cache, and switching costs nothing but the choice. The controller is the motif runtime's
(:func:`~cscompile.motifs.runtime.choose_level`): the entropy of the previous next-token
distribution picks the motif (confident steps run the cheaper motifs), with hysteresis; prefill
runs the densest motif. There is no recovery residual on this engine (the support is static per
motif), so no residual fallback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from cscompile.errors import UserError
from cscompile.metrics import log_softmax
from cscompile.motifs.runtime import ControllerConfig, SwitchStats, choose_level
from cscompile.native.engine import NativeDecoder, NativeSession, NativeState, NativeWeights, entropy


@dataclass
class NativeSwitchState(NativeState):
    """A native sequence plus the controller's memory for one generation."""

    level: int = 0
    hold_left: int = 0
    last_entropy: float = 0.0
    last_residual: float = 0.0
    stats: SwitchStats = field(default_factory=SwitchStats)


def ffn_fraction(w: NativeWeights) -> float:
    """The fraction of the model's FFN channels ``w`` executes."""
    _, ffn = w.width()
    return float(sum(ffn)) / (w.config["inter"] * w.config["n_layers"])


class NativeSwitchingSession(NativeSession):
    """``motifs`` ordered densest first (``motifs[0]`` runs prefill), with their ``names``; the
    input checks and the session interface are :class:`NativeSession`'s.
    """

    def __init__(
        self,
        motifs: list[NativeWeights],
        names: list[str],
        config: ControllerConfig,
        threads: int | None = None,
        context_length: int | None = None,
    ) -> None:
        if len(motifs) != len(names) or not motifs:
            raise UserError(
                "native switching", f"{len(motifs)} motifs, {len(names)} names", "one name per motif"
            )
        if len(config.entropy_thresholds) != len(motifs) - 1:
            raise UserError(
                "native switching",
                f"{len(config.entropy_thresholds)} entropy thresholds for {len(motifs)} motifs",
                f"{len(motifs) - 1} (one between each pair of motifs)",
            )
        super().__init__(motifs[0], threads, context_length)
        self.motifs = motifs
        self.names = names
        self.config = config
        self.executed = [ffn_fraction(m) for m in motifs]
        self.last_state: NativeSwitchState | None = None

    @property
    def max_batch(self) -> int:
        """1: each sequence's motif is chosen per token from its own entropy (no batched step)."""
        return 1

    def new_state(self, batch: int = 1) -> NativeSwitchState:
        return cast(NativeSwitchState, super().new_state(batch))

    def _new_state(self) -> NativeSwitchState:
        dec = NativeDecoder(self.weights, self.threads, max_ctx=self.context_length, motifs=self.motifs[1:],
                            governor=self.governor)  # fmt: skip
        st = NativeSwitchState(dec)
        self.last_state = st  # for a CLI's --stats after one generation (not meaningful across threads)
        return st

    def _run(self, ids: np.ndarray, st: NativeState, all_logits: bool) -> np.ndarray:
        # a prompt, or a sequence's first token, runs the densest motif
        if not isinstance(st, NativeSwitchState) or len(ids) > 1 or st.decoder.pos == 0:
            out = super()._run(ids, st, all_logits)
            if isinstance(st, NativeSwitchState):
                st.last_entropy = entropy(out[-1] if all_logits else out)
            return out
        t0 = time.perf_counter()
        level = choose_level(self.config, len(self.motifs), st)
        t1 = time.perf_counter()
        out = st.decoder.forward(ids, all_logits=all_logits, motif=level)
        t2 = time.perf_counter()
        st.last_entropy = entropy(out[-1] if all_logits else out)
        s = st.stats
        s.histogram[self.names[level]] += 1
        s.executed.append(self.executed[level])
        s.engine_s += t2 - t1
        s.control_s += (t1 - t0) + (time.perf_counter() - t2)
        s.steps += 1
        return out


def calibrate_entropy(
    dense: NativeWeights, ids: np.ndarray, quantiles: list[float], threads: int = 2
) -> list[float]:
    """Entropy thresholds at ``quantiles`` of the dense model's next-token entropy on ``ids``
    (teacher-forced): with thresholds at q, about a fraction q of the steps run the cheapest motif.
    """
    logits = NativeDecoder(dense, threads, max_ctx=max(16, len(ids))).logits_all(ids)
    ents = np.array([entropy(row) for row in logits])
    return sorted(float(np.quantile(ents, q)) for q in quantiles)


@dataclass
class SteppedResult:
    """A policy run teacher-forced one token per step (:func:`stepped_perplexity`)."""

    perplexity: float
    tokens_scored: int
    ms_per_step: float  # mean wall time of a decode step, controller included
    ms_per_step_median: float
    control_ms_per_step: float
    histogram: dict[str, int]

    def share(self, name: str) -> float:
        """The fraction of decode steps motif ``name`` ran."""
        return self.histogram.get(name, 0) / max(1, sum(self.histogram.values()))


def stepped_perplexity(sess: NativeSwitchingSession, ids: np.ndarray, window: int = 512) -> SteppedResult:
    """Teacher-forced, one token per step, in windows of ``window`` tokens each starting a new
    sequence (whose first token runs dense, as a prompt does): the perplexity of every predicted
    token, the wall time of the decode steps and the motifs they ran.
    """
    ids = np.asarray(ids, np.int64)
    nll, n, control = 0.0, 0, 0.0
    times: list[float] = []
    hist: dict[str, int] = {}
    for w0 in range(0, len(ids) - 1, window):
        win = ids[w0 : w0 + window + 1]
        st = sess.new_state()
        for t in range(len(win) - 1):
            t0 = time.perf_counter()
            logits = sess.forward_last(win[None, t : t + 1], st)
            if t:
                times.append(time.perf_counter() - t0)
            nll -= float(log_softmax(logits)[int(win[t + 1])])
            n += 1
        for k, v in st.stats.histogram.items():
            hist[k] = hist.get(k, 0) + v
        control += st.stats.control_s
    if not n:
        raise UserError("stepped perplexity", f"{len(ids)} tokens", "at least 2")
    steps = max(1, sum(hist.values()))
    return SteppedResult(
        perplexity=float(np.exp(nll / n)),
        tokens_scored=n,
        ms_per_step=float(np.mean(times)) * 1e3 if times else float("nan"),
        ms_per_step_median=float(np.median(times)) * 1e3 if times else float("nan"),
        control_ms_per_step=control / steps * 1e3,
        histogram=hist,
    )
