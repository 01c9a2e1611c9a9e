"""One latency budget, two levers: how much prompt to keep (r) and which engine to run (e).

End-to-end time of a request is ``scorer(n) + prefill_e(kept) + T · decode_e``: the prompt lever
shrinks the prefill (and costs the scorer), the model lever (a front point of a ``--pareto``
bundle: re-rounded projections, dropped layers) shrinks prefill and decode per token. Both
are measured here, never derived from FLOPs: prefill as ``a + b·n + c·n²`` fitted to timed
prefills, decode as ms/token, the scorer as ``a + b·n``.

Quality of a pair ``(r, e)`` is measured on calibration examples (disjoint from evaluation):
exact-match accuracy, minus ``lam`` times the faithfulness term — the KL divergence of the
first answer token's distribution from the dense engine's on the full prompt.

Policies, each choosing from the same grid under the same predicted budget:

- ``prompt-only``: the dense engine, the best ratio;
- ``model-only``: the full prompt, the best engine;
- ``sequential``: the prompt is compressed first, on its own — the ratio that alone would
  bring the request to ``√(dense / budget)`` of the way (half the speedup in log terms), as a
  prompt compressor tuned without the model would — then the best engine that meets the
  budget with that prompt;
- ``joint``: the best pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cscompile.errors import UserError

POLICIES = ("prompt-only", "model-only", "sequential", "joint")


@dataclass
class CostModel:
    """Measured costs (ms) on one machine."""

    scorer: tuple[float, float]  # a + b·n over the whole prompt
    prefill: dict[str, tuple[float, float, float]]  # engine -> a + b·n + c·n² over the kept prompt
    decode: dict[str, float]  # engine -> ms per generated token
    dense: str = "dense"

    def e2e(self, engine: str, n_prompt: int, n_kept: int, new_tokens: int) -> float:
        a, b, c = self.prefill[engine]
        ms = a + b * n_kept + c * n_kept**2 + new_tokens * self.decode[engine]
        if n_kept < n_prompt:
            ms += self.scorer[0] + self.scorer[1] * n_prompt
        return float(ms)

    @staticmethod
    def fit_prefill(lengths: Sequence[int], ms: Sequence[float]) -> tuple[float, float, float]:
        n = np.asarray(lengths, np.float64)
        coef, *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n, n * n], 1), np.asarray(ms, np.float64))
        return float(coef[0]), float(coef[1]), float(coef[2])

    @staticmethod
    def fit_linear(lengths: Sequence[int], ms: Sequence[float]) -> tuple[float, float]:
        n = np.asarray(lengths, np.float64)
        coef, *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), np.asarray(ms, np.float64))
        return float(coef[0]), float(coef[1])

    def to_dict(self) -> dict[str, Any]:
        return {"scorer": list(self.scorer), "prefill": {k: list(v) for k, v in self.prefill.items()},
                "decode": dict(self.decode), "dense": self.dense}  # fmt: skip


@dataclass
class QualityGrid:
    """Calibrated quality of every (ratio, engine) pair; ratio 1.0 = the full prompt."""

    ratios: list[float]
    engines: list[str]
    accuracy: dict[tuple[float, str], float]
    kl: dict[tuple[float, str], float]
    lam: float = 0.1

    def score(self, r: float, e: str) -> float:
        return self.accuracy[(r, e)] - self.lam * self.kl[(r, e)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratios": self.ratios,
            "engines": self.engines,
            "lam": self.lam,
            "accuracy": {f"{r:g}|{e}": v for (r, e), v in self.accuracy.items()},
            "kl": {f"{r:g}|{e}": v for (r, e), v in self.kl.items()},
        }


@dataclass(frozen=True)
class Choice:
    policy: str
    ratio: float
    engine: str
    predicted_ms: float
    score: float
    notes: tuple[str, ...] = field(default=())


def allocate(policy: str, budget_ms: float, costs: CostModel, grid: QualityGrid, n_prompt: int,
             n_protected: int, new_tokens: int) -> Choice:  # fmt: skip
    """The ``policy``'s pair for a request of ``n_prompt`` tokens (``n_protected`` never dropped)."""
    if policy not in POLICIES:
        raise UserError("allocation policy", f"'{policy}'", f"one of {', '.join(POLICIES)}")
    if not budget_ms > 0:
        raise UserError("--latency-budget", f"{budget_ms}", "a positive number of ms")
    dense = costs.dense

    def kept(r: float) -> int:
        return n_protected + int(np.floor(r * (n_prompt - n_protected)))

    def ms(r: float, e: str) -> float:
        return costs.e2e(e, n_prompt, kept(r), new_tokens)

    if policy == "prompt-only":
        cands = [(r, dense) for r in grid.ratios]
    elif policy == "model-only":
        cands = [(1.0, e) for e in grid.engines]
    elif policy == "joint":
        cands = [(r, e) for r in grid.ratios for e in grid.engines]
    else:  # sequential: the prompt stage takes half the speedup (log terms) on its own
        full = ms(1.0, dense)
        stage = full / np.sqrt(max(full / budget_ms, 1.0))
        fits = [r for r in grid.ratios if ms(r, dense) <= stage]
        r_seq = max(fits) if fits else min(grid.ratios)
        cands = [(r_seq, e) for e in grid.engines]
    feasible = [(r, e) for r, e in cands if ms(r, e) <= budget_ms]
    if not feasible:
        r, e = min(cands, key=lambda c: ms(*c))
        return Choice(
            policy, r, e, ms(r, e), grid.score(r, e), (f"no pair within {budget_ms:.0f} ms: the fastest",)
        )
    r, e = max(feasible, key=lambda c: (grid.score(*c), -ms(*c)))
    return Choice(policy, r, e, ms(r, e), grid.score(r, e))
