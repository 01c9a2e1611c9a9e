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
from typing import Any

import numpy as np

from cscompile.errors import UserError
from cscompile.motifs.runtime import ControllerConfig, SwitchStats, choose_level
from cscompile.plugins.native import NativeDecoder, NativeState, NativeWeights, entropy


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


class NativeSwitchingSession:
    """``motifs`` ordered densest first (``motifs[0]`` runs prefill), with their ``names``."""

    def __init__(
        self,
        motifs: list[NativeWeights],
        names: list[str],
        config: ControllerConfig,
        threads: int | None = None,
        context_length: int | None = None,
    ) -> None:
        from cscompile.runtime.session import default_threads

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
        self.motifs = motifs
        self.names = names
        self.config = config
        self.threads = int(threads or default_threads())
        self.context_length = int(context_length or 2048)
        self.executed = [ffn_fraction(m) for m in motifs]
        self.last_state: NativeSwitchState | None = None

    def new_state(self, batch: int = 1) -> NativeSwitchState:
        if batch != 1:
            raise UserError("native engine", f"a batch of {batch}", "one sequence at a time (batch 1)")
        dec = NativeDecoder(self.motifs[0], self.threads, max_ctx=self.context_length, motifs=self.motifs[1:])
        st = NativeSwitchState(dec)
        self.last_state = st  # for a CLI's --stats after one generation (not meaningful across threads)
        return st

    def _run(self, ids: np.ndarray, st: NativeSwitchState, all_logits: bool) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise UserError("native engine", f"input_ids of shape {ids.shape}", "[1, S] (one sequence)")
        if (
            ids.shape[1] > 1 or st.decoder.pos == 0
        ):  # prefill (a prompt, or a sequence's first token): densest
            out = st.decoder.forward(ids[0], all_logits=all_logits)
            st.last_entropy = entropy(out[-1] if all_logits else out)
            return out.copy()
        t0 = time.perf_counter()
        level = choose_level(self.config, len(self.motifs), st)
        t1 = time.perf_counter()
        out = st.decoder.forward(ids[0], all_logits=all_logits, motif=level)
        t2 = time.perf_counter()
        st.last_entropy = entropy(out[-1] if all_logits else out)
        s = st.stats
        s.histogram[self.names[level]] += 1
        s.executed.append(self.executed[level])
        s.engine_s += t2 - t1
        s.control_s += (t1 - t0) + (time.perf_counter() - t2)
        s.steps += 1
        return out.copy()

    def forward(
        self, input_ids: np.ndarray, state: NativeSwitchState, attention_mask: Any = None
    ) -> np.ndarray:
        """``input_ids [1, S]`` after ``state`` → logits ``[1, S, V]``."""
        if attention_mask is not None and not np.all(attention_mask):
            raise UserError("native engine", "padding", "one unpadded sequence")
        return self._run(input_ids, state, all_logits=True)[None]

    def forward_last(self, input_ids: np.ndarray, state: NativeSwitchState) -> np.ndarray:
        """Logits ``[V]`` of the last position only."""
        return self._run(input_ids, state, all_logits=False)


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
            z = logits.astype(np.float64)
            m = z.max()
            nll += m + float(np.log(np.exp(z - m).sum())) - z[int(win[t + 1])]
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
