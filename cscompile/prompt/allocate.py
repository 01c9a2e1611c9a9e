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
        """Least squares ``a + b·n + c·n²``; a negative ``c`` (noise: attention is not cheaper per
        token at length) falls back to the linear fit.
        """
        n = np.asarray(lengths, np.float64)
        y = np.asarray(ms, np.float64)
        coef, *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n, n * n], 1), y)
        if coef[2] < 0:
            lin, *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), y)
            coef = np.array([lin[0], lin[1], 0.0])
        return float(coef[0]), float(coef[1]), float(coef[2])

    @staticmethod
    def fit_linear(lengths: Sequence[int], ms: Sequence[float]) -> tuple[float, float]:
        n = np.asarray(lengths, np.float64)
        coef, *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), np.asarray(ms, np.float64))
        return float(coef[0]), float(coef[1])

    @classmethod
    def from_dict(cls, d: Any) -> CostModel:
        try:
            return cls(
                (float(d["scorer"][0]), float(d["scorer"][1])),
                {str(k): (float(v[0]), float(v[1]), float(v[2])) for k, v in d["prefill"].items()},
                {str(k): float(v) for k, v in d["decode"].items()},
                str(d["dense"]),
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            raise UserError("cost table", "is malformed", "scorer, prefill, decode, dense") from None

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
    lam: float = 0.25

    def score(self, r: float, e: str, objective: str = "task") -> float:
        """``task``: accuracy − lam·KL (the calibration task's quality); ``faithful``: −KL only."""
        if objective == "faithful":
            return -self.kl[(r, e)]
        return self.accuracy[(r, e)] - self.lam * self.kl[(r, e)]

    @classmethod
    def from_dict(cls, d: Any, where: str = "quality grid") -> QualityGrid:
        try:
            ratios = [float(r) for r in d["ratios"]]
            engines = [str(e) for e in d["engines"]]
            acc = {(r, e): float(d["accuracy"][f"{r:g}|{e}"]) for r in ratios for e in engines}
            kl = {(r, e): float(d["kl"][f"{r:g}|{e}"]) for r in ratios for e in engines}
            grid = cls(ratios, engines, acc, kl, float(d["lam"]))
        except (KeyError, TypeError, ValueError):
            raise UserError(
                where, "is malformed", "ratios, engines, lam and an accuracy/kl entry per pair"
            ) from None
        if not ratios or not engines or not all(0 < r <= 1 for r in ratios):
            raise UserError(where, f"has ratios {ratios} / engines {engines}", "ratios in (0, 1] and engines")
        return grid

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
             n_protected: int, new_tokens: int, objective: str = "task") -> Choice:  # fmt: skip
    """The ``policy``'s pair for a request of ``n_prompt`` tokens (``n_protected`` never dropped).

    ``objective`` ``task`` maximizes calibrated accuracy − lam·KL; ``faithful`` minimizes the KL to
    the dense engine on the full prompt (the runtime's choice: it does not know the user's task,
    and on the shipped distractor-heavy sets less context scores *higher*, which would not
    transfer to, say, a summary).
    """
    if policy not in POLICIES:
        raise UserError("allocation policy", f"'{policy}'", f"one of {', '.join(POLICIES)}")
    if objective not in ("task", "faithful"):
        raise UserError("allocation objective", f"'{objective}'", "task or faithful")
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


# -- measuring ---------------------------------------------------------------------------------
@dataclass
class PairResult:
    """One request run with a prompt ratio on one engine."""

    correct: bool | None
    first: np.ndarray  # log-probs of the first answer token
    ms: float  # scorer + prefill + greedy decode
    new_tokens: int
    text: str
    n_prompt: int
    n_kept: int


def run_pair(tm: Any, compressor: Any, ex: Any, ratio: float, order: str = "original",
             new_tokens: int = 32) -> PairResult:  # fmt: skip
    """Run example ``ex`` (a :class:`~cscompile.data.longctx.LongExample`) at ``ratio`` on ``tm``."""
    import time

    from cscompile.metrics import log_softmax
    from cscompile.prompt.compress import PromptBudget, layout

    t0 = time.perf_counter()
    full = layout(compressor.tokenizer, ex.context, ex.question, ex.instruction)
    if ratio >= 1.0:
        ids = full.ids
    else:
        c = compressor.compress(
            ex.context, ex.question, PromptBudget(ratio=ratio, order=order), ex.instruction
        )
        ids = c.ids
    state = tm.session.new_state()
    logits = tm.prefill(ids, state)
    first = log_softmax(np.asarray(logits))
    out: list[int] = []
    for _ in range(new_tokens):
        tok = int(np.argmax(logits))
        if tok in tm.tokenizer.eos_token_ids:
            break
        out.append(tok)
        logits = tm.decode_one_token(tok, state)
    ms = (time.perf_counter() - t0) * 1e3
    text = tm.tokenizer.decode(out)
    return PairResult(ex.correct(text), first, ms, len(out), text, len(full.ids), len(ids))


def measure_costs(text_models: dict[str, Any], scorer: Any, lengths: Sequence[int] = (128, 256, 512, 768, 1024, 1280),
                  reps: int = 3, dense: str = "dense", say: Any = None) -> CostModel:  # fmt: skip
    """Time prefill at ``lengths`` and decode per engine, and the scorer; the least disturbed of
    ``reps`` runs counts (spikes on a shared machine are other processes).
    """
    from cscompile.decode.session import decode_step_seconds

    rng = np.random.default_rng(0)
    vocab = min(40000, int(getattr(next(iter(text_models.values())).tokenizer, "vocab_size", 40000)))
    low = min(1000, vocab // 4)
    prefill, decode = {}, {}
    for name, tm in text_models.items():
        lens = [n for n in lengths if tm.context_length is None or n < tm.context_length]
        ms = []
        for n in lens:
            ids = rng.integers(low, vocab, n).tolist()
            ms.append(_least_ms(reps, tm.session.new_state, lambda st, ids=ids, tm=tm: tm.prefill(ids, st)))
        prefill[name] = CostModel.fit_prefill(lens, ms)
        decode[name] = float(np.median(decode_step_seconds(tm.session, lens[len(lens) // 2], 16))) * 1e3
        if say:
            say(
                f"cost {name}: prefill {dict(zip(lens, np.round(ms, 1).tolist()))} ms, decode {decode[name]:.2f} ms/token"
            )
    lens = [n for n in lengths if n <= scorer.max_positions]
    sc = []
    for n in lens:
        ids = rng.integers(low, vocab, n).tolist()
        sc.append(_least_ms(reps, lambda: None, lambda _, ids=ids: scorer.run(ids)))
    if say:
        say(f"cost scorer: {dict(zip(lens, np.round(sc, 1).tolist()))} ms")
    return CostModel(CostModel.fit_linear(lens, sc), prefill, decode, dense)


def _least_ms(reps: int, prepare: Any, run: Any) -> float:
    """The fastest of ``reps`` timed ``run(prepare())`` calls in ms (``prepare`` is not timed)."""
    import time

    best = float("inf")
    for _ in range(reps):
        arg = prepare()
        t = time.perf_counter()
        run(arg)
        best = min(best, (time.perf_counter() - t) * 1e3)
    return best


def calibrate_grid(text_models: dict[str, Any], compressor: Any, examples: Sequence[Any], ratios: Sequence[float],
                   order: str = "original", new_tokens: int = 32, lam: float = 0.25, dense: str = "dense",
                   say: Any = None) -> tuple[QualityGrid, int]:  # fmt: skip
    """Accuracy and first-token KL to ``dense`` on the full prompt for every (ratio, engine);
    also the mean answer length of the dense engine (the planning value for decode).
    """
    ref = {ex.id: run_pair(text_models[dense], compressor, ex, 1.0, order, new_tokens) for ex in examples}
    acc, kl = {}, {}
    for r in ratios:
        for e, tm in text_models.items():
            runs = [ref[ex.id] if (r >= 1.0 and e == dense) else run_pair(tm, compressor, ex, r, order, new_tokens)
                    for ex in examples]  # fmt: skip
            scored = [x.correct for x in runs if x.correct is not None]
            acc[(r, e)] = float(np.mean(scored)) if scored else 0.0
            kl[(r, e)] = float(np.mean([np.sum(np.exp(ref[ex.id].first) * (ref[ex.id].first - x.first))
                                        for ex, x in zip(examples, runs)]))  # fmt: skip
            if say:
                say(f"calib r={r:g} {e}: accuracy {acc[(r, e)]:.0%}, KL {kl[(r, e)]:.3f}")
    plan = int(round(np.mean([x.new_tokens for x in ref.values()]))) if ref else new_tokens
    return QualityGrid(list(ratios), list(text_models), acc, kl, lam), plan
