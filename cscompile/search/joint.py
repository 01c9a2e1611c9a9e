"""Joint per-layer depth × precision search with a measured latency table (seed 004, issue 8).

The space, per decoder layer (all layers of a decoder have the same shapes):

* depth: keep the layer, drop only its FFN, or drop it whole (:class:`DropLayersPass`);
* precision of what is kept, per unit type: ``int4`` (the source grid kept exactly when the
  model came from a GGUF — lossless here, but ORT needs block-sum correction ops) or
  ``int4-rtn`` (re-rounded: no correction ops, faster, lossy);

plus the LM head: the source's 8-bit grid, or 4-bit RTN (half the bytes of the largest matrix).

Quality proxy: the mean KL divergence from the dense model's next-token distributions on
calibration tokens (≈ the NLL increase; never negative, and far less noisy than NLL for small
changes) when one choice is applied to one layer alone, summed over layers (additive; how well
it predicts held-out perplexity is measured and reported). Latency: a table fitted by least squares to the decode latency of real
engines built here (never FLOPs). Because both are sums over layers, the Pareto front under
the proxy is a multiple-choice knapsack: :func:`pareto_front` solves it exactly by dynamic
programming over latency bins.

The **sequential** baseline (architecture first, precision after) is the same search with the
precision fixed model-wide: the best depth choice for each uniform precision assignment.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cscompile.errors import UserError

EXACT, RTN = "int4", "int4-rtn"
HEADS = {"q8": "int8", "int4-rtn": "int4-rtn"}


@dataclass(frozen=True)
class Option:
    """What one layer becomes."""

    depth: str  # "keep" | "drop-ffn" | "drop"
    attn: str | None  # precision of Q/K/V/O, None when the layer is dropped
    ffn: str | None  # precision of gate/up/down, None when the FFN is dropped

    @property
    def name(self) -> str:
        if self.depth == "drop":
            return "drop"
        parts = [f"attn={'exact' if self.attn == EXACT else 'rtn'}"]
        parts.append("ffn=dropped" if self.ffn is None else f"ffn={'exact' if self.ffn == EXACT else 'rtn'}")
        return ",".join(parts)

    def units(self) -> list[str]:
        """The additive proxy terms this option is made of (each measured alone per layer)."""
        if self.depth == "drop":
            return ["drop"]
        out = ["drop-ffn"] if self.ffn is None else ([] if self.ffn == EXACT else ["ffn-rtn"])
        if self.attn == RTN:
            out.append("attn-rtn")
        return out


OPTIONS: tuple[Option, ...] = (
    *(Option("keep", a, f) for a, f in itertools.product((EXACT, RTN), repeat=2)),
    Option("drop-ffn", EXACT, None),
    Option("drop-ffn", RTN, None),
    Option("drop", None, None),
)
UNITS = ("attn-rtn", "ffn-rtn", "drop-ffn", "drop")


@dataclass(frozen=True)
class Config:
    """One point of the space: an option per layer and the LM head's precision."""

    layers: tuple[Option, ...]
    head: str = "q8"

    def describe(self) -> dict[str, Any]:
        return {"layers": [o.name for o in self.layers], "head": self.head}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        by_name = {o.name: o for o in OPTIONS}
        try:
            layers = tuple(by_name[n] for n in d["layers"])
        except KeyError as e:
            raise UserError("search config", f"unknown option {e}", f"one of {', '.join(by_name)}") from None
        if not any(o.depth != "drop" for o in layers):
            raise UserError("search config", "every layer dropped", "at least one layer kept")
        return cls(layers, d.get("head", "q8"))

    def plan(self) -> tuple[list[int], list[int], Any, list[int]]:
        """(layers to drop, FFNs to drop, precision plan in the *new* layer indices, source layers)."""
        from cscompile.passes.quantize import PrecisionPlan

        drop = [i for i, o in enumerate(self.layers) if o.depth == "drop"]
        drop_ffn = [i for i, o in enumerate(self.layers) if o.depth == "drop-ffn"]
        source = [i for i, o in enumerate(self.layers) if o.depth != "drop"]
        overrides = {}
        for new, src in enumerate(source):
            o = self.layers[src]
            overrides[new] = {"attn": o.attn or EXACT, "ffn": o.ffn or EXACT}
        plan = PrecisionPlan(attn=EXACT, ffn=EXACT, lm_head=HEADS[self.head], layers=overrides)
        return drop, drop_ffn, plan, source


# -- latency ----------------------------------------------------------------------------------

#: the latency table's terms: what each kept unit costs per token, plus the fixed part
LAT_TERMS = ("base", "attn-exact", "attn-rtn", "ffn-exact", "ffn-rtn", "head-int4-rtn")


def option_terms(o: Option) -> list[str]:
    """The per-layer latency terms one layer option costs."""
    out = []
    if o.attn is not None:
        out.append("attn-exact" if o.attn == EXACT else "attn-rtn")
    if o.ffn is not None:
        out.append("ffn-exact" if o.ffn == EXACT else "ffn-rtn")
    return out


def latency_features(config: Config) -> np.ndarray:
    """Counts of each latency term in ``config`` (the design matrix row)."""
    f = dict.fromkeys(LAT_TERMS, 0.0)
    f["base"] = 1.0
    for o in config.layers:
        for t in option_terms(o):
            f[t] += 1
    f["head-int4-rtn"] = 1.0 if config.head == "int4-rtn" else 0.0
    return np.array([f[t] for t in LAT_TERMS])


def probe_configs(n_layers: int) -> list[Config]:
    """Engines whose measured latencies determine the table (each term varies independently)."""
    keep = Option("keep", EXACT, EXACT)
    half = n_layers // 2
    return [
        Config((keep,) * n_layers),
        Config((Option("keep", RTN, EXACT),) * n_layers),
        Config((Option("keep", EXACT, RTN),) * n_layers),
        Config((Option("drop-ffn", EXACT, None),) * n_layers),
        Config((keep,) * half + (Option("drop", None, None),) * (n_layers - half)),
        Config((keep,) * n_layers, head="int4-rtn"),
        # checks, not needed to solve: mixed configs the fit must predict
        Config(tuple(OPTIONS[i % len(OPTIONS)] for i in range(n_layers))),
        Config(tuple(OPTIONS[(3 * i + 1) % len(OPTIONS)] for i in range(n_layers)), head="int4-rtn"),
    ]


@dataclass
class LinearLatency:
    """Latency as a linear function of a configuration's term counts, fitted by least squares to
    measured engines; subclasses name the terms and how a configuration counts them.
    """

    coef: dict[str, float]  # ms per token for each term
    residual_ms: list[float]  # measured - predicted on the probes
    TERMS: ClassVar[tuple[str, ...]] = ()

    @staticmethod
    def features(config: Any) -> np.ndarray:
        raise NotImplementedError

    def predict(self, config: Any) -> float:
        return float(self.features(config) @ np.array([self.coef[t] for t in self.TERMS]))

    @classmethod
    def fit(cls, configs: Sequence[Any], measured_ms: Sequence[float]) -> Any:
        x = np.stack([cls.features(c) for c in configs])
        y = np.asarray(measured_ms, np.float64)
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        return cls(dict(zip(cls.TERMS, map(float, coef))), [float(r) for r in y - x @ coef])

    def to_dict(self) -> dict[str, Any]:
        return {"coef_ms": self.coef, "residual_ms": self.residual_ms}


@dataclass
class LatencyTable(LinearLatency):
    TERMS: ClassVar[tuple[str, ...]] = LAT_TERMS

    @staticmethod
    def features(config: Any) -> np.ndarray:
        return latency_features(config)

    def option_ms(self, o: Option) -> float:
        return sum(self.coef[t] for t in option_terms(o))


# -- quality proxy ------------------------------------------------------------------------------


@dataclass
class QualityTable:
    """Mean KL to the dense model (≈ the NLL increase) of each unit choice applied to one layer
    alone, and of the 4-bit head; ``base_nll`` is the dense model's NLL on the same tokens.
    """

    base_nll: float
    delta: dict[str, list[float]]  # unit -> per layer
    head_int4: float

    def option_delta(self, layer: int, o: Option) -> float:
        return float(sum(self.delta[u][layer] for u in o.units()))

    def predict(self, config: Config) -> float:
        d = sum(self.option_delta(i, o) for i, o in enumerate(config.layers))
        return d + (self.head_int4 if config.head == "int4-rtn" else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"base_nll": self.base_nll, "delta_nll": self.delta, "head_int4_rtn": self.head_int4}


def _rtn4(w: np.ndarray) -> np.ndarray:
    """``w`` re-rounded to symmetric 4-bit RTN and back (what an ``int4-rtn`` unit computes with)."""
    from cscompile.passes.quantize import dequantize, rtn

    q, sc, z = rtn(w, 4, symmetric=True)
    return np.asarray(dequantize(q, sc, z, 4))


class TorchVariants:
    """The PyTorch model with reversible per-layer changes, scored by KL to the dense model.

    KL to the dense model's own predictions rather than NLL of the text: never negative and far
    less noisy for small changes (per-layer re-rounding moves NLL by ±0.01 either way on a
    thousand tokens, which a knapsack over 60 such terms would exploit).
    """

    def __init__(self, hf_dir: Path, calib_ids: np.ndarray, threads: int = 2, window: int = 512) -> None:
        from cscompile.models.reference import TorchReference

        self.ref = TorchReference.from_dir(hf_dir, threads=threads)
        self.torch = self.ref.torch
        self.model = self.ref.model
        self.layers = self.model.model.layers
        chunks = [calib_ids[b : b + window] for b in range(0, len(calib_ids) - 1, window)]
        self.chunks = [c for c in chunks if len(c) > 1]
        self._ref: list[Any] = [self._logp(c) for c in self.chunks]
        self.base_nll = _text_nll(self.model, self.chunks, self.torch)

    def _logp(self, c: np.ndarray) -> Any:
        with self.torch.no_grad():
            ids = self.torch.from_numpy(np.asarray(c[None], np.int64))
            return self.torch.log_softmax(self.model(ids).logits[0].float(), -1)

    def kl(self) -> float:
        """Mean KL(dense ‖ current variant) per position."""
        total, count = 0.0, 0
        for c, ref in zip(self.chunks, self._ref):
            total += float((ref.exp() * (ref - self._logp(c))).sum())
            count += len(c)
        return total / count

    def _rtn(self, mods: list[Any]) -> Callable[[], None]:
        return self._reweight(mods, _rtn4)

    def _reweight(self, mods: list[Any], fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[], None]:
        """Each module's weight replaced by ``fn(weight)`` (numpy, fp32); returns the undo."""
        saved = [m.weight.data for m in mods]
        for m in mods:
            m.weight.data = self.torch.from_numpy(fn(m.weight.detach().float().numpy()))

        def undo() -> None:
            for m, w in zip(mods, saved):
                m.weight.data = w

        return undo

    def apply(self, layer: int, unit: str) -> Callable[[], None]:
        """Apply ``unit`` (one of :data:`UNITS`) to ``layer``; returns the undo."""
        lay = self.layers[layer]
        a, m = lay.self_attn, lay.mlp
        if unit == "attn-rtn":
            return self._rtn([a.q_proj, a.k_proj, a.v_proj, a.o_proj])
        if unit == "ffn-rtn":
            return self._rtn([m.gate_proj, m.up_proj, m.down_proj])
        target = m if unit == "drop-ffn" else lay
        had = "forward" in vars(target)
        old = vars(target).get("forward")
        target.forward = (lambda x: x * 0) if unit == "drop-ffn" else _identity_layer

        def undo() -> None:
            if had:
                target.forward = old
            else:
                del target.forward

        return undo

    def head_weights(self) -> np.ndarray:
        """The LM head as the head unit changes it: re-rounded to symmetric 4-bit RTN."""
        return _rtn4(self.model.get_output_embeddings().weight.detach().numpy())

    def apply_head(self) -> Callable[[], None]:
        """The LM head replaced by :meth:`head_weights` (untied for the measurement when tied)."""
        emb = self.model.get_output_embeddings()
        tied = emb.weight is self.model.get_input_embeddings().weight
        saved = emb.weight
        emb.weight = self.torch.nn.Parameter(self.torch.from_numpy(self.head_weights()))

        def undo() -> None:
            emb.weight = self.model.get_input_embeddings().weight if tied else saved

        return undo

    def changes(self, config: Any) -> tuple[list[tuple[int, str]], bool]:
        """The (layer, unit) changes ``config`` is made of, and whether it changes the head."""
        return [(i, u) for i, o in enumerate(config.layers) for u in o.units()], config.head == "int4-rtn"

    def evaluate(self, config: Any) -> float:
        """KL of ``config`` as a whole (every change applied at once: no additivity assumed)."""
        units, head = self.changes(config)
        undo = [self.apply(i, u) for i, u in units]
        if head:
            undo.append(self.apply_head())
        try:
            return self.kl()
        finally:
            for f in reversed(undo):
                f()


def measure_quality(hf_dir: Path, calib_ids: np.ndarray, threads: int = 2, window: int = 512,
                    progress: Callable[[int, int], None] | None = None) -> QualityTable:  # fmt: skip
    """Apply each unit choice to each layer alone in the PyTorch model and measure its KL."""
    return quality_table(TorchVariants(hf_dir, calib_ids, threads, window), progress)


def quality_table(tv: TorchVariants, progress: Callable[[int, int], None] | None = None) -> QualityTable:
    """:func:`measure_quality` on an already loaded model (which refinement can then reuse)."""
    delta, head = unit_kls(tv, UNITS, progress)
    return QualityTable(tv.base_nll, delta, head)


def unit_kls(tv: TorchVariants, units: Sequence[str], progress: Callable[[int, int], None] | None = None
             ) -> tuple[dict[str, list[float]], float]:  # fmt: skip
    """KL of each of ``units`` applied to each layer alone (``tv.apply``), and of the head's change."""
    n = len(tv.layers)
    delta: dict[str, list[float]] = {u: [0.0] * n for u in units}
    total, done = n * len(units) + 1, 0
    for i in range(n):
        for unit in units:
            undo = tv.apply(i, unit)
            delta[unit][i] = tv.kl()
            undo()
            done += 1
            if progress:
                progress(done, total)
    undo = tv.apply_head()
    head = tv.kl()
    undo()
    if progress:
        progress(total, total)
    return delta, head


def refine(front: Sequence[FrontPoint], budget_ms: float, tv: TorchVariants, k: int = 6) -> FrontPoint | None:
    """Of the ``k`` best predicted front points within ``budget_ms``, the one whose *measured*
    whole-config KL is lowest (the proxy ranks, a real evaluation decides).
    """
    ok = sorted((p for p in front if p.latency_ms <= budget_ms + 1e-9), key=lambda p: p.delta_nll)[:k]
    if not ok:
        return None
    scored = [(tv.evaluate(p.config), p) for p in ok]
    kl, best = min(scored, key=lambda t: t[0])
    return FrontPoint(best.config, best.latency_ms, best.delta_nll, measured_kl=kl)


def _text_nll(model: Any, chunks: list[np.ndarray], torch: Any) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for c in chunks:
            ids = torch.from_numpy(np.asarray(c[None], np.int64))
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            total -= float(logp.gather(1, ids[0, 1:, None]).sum())
            count += len(c) - 1
    return total / count


def _identity_layer(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
    return hidden_states  # a dropped decoder layer passes its input through (transformers ≥ 5)


# -- the front ---------------------------------------------------------------------------------


@dataclass
class FrontPoint:
    config: Any  # a Config, or a native_search.NativeConfig
    latency_ms: float  # predicted by the table
    delta_nll: float  # predicted by the proxy
    measured_kl: float | None = None  # the whole config evaluated at once (refine)

    def to_dict(self) -> dict[str, Any]:
        out = {"latency_ms_pred": self.latency_ms, "delta_nll_pred": self.delta_nll, **self.config.describe()}
        if self.measured_kl is not None:
            out["kl_measured"] = self.measured_kl
        return out


def pareto_front(quality: QualityTable, latency: LatencyTable, n_layers: int,
                 options: Sequence[Option] = OPTIONS, heads: Sequence[str] = ("q8", "int4-rtn"),
                 bin_ms: float = 0.01) -> list[FrontPoint]:  # fmt: skip
    """Exact Pareto front (predicted latency vs predicted ΔNLL) by DP over latency bins."""
    costs = [max(0, round(latency.option_ms(o) / bin_ms)) for o in options]
    table = knapsack(n_layers, costs, lambda layer, j: quality.option_delta(layer, options[j]),
                     [o.depth != "drop" for o in options])  # fmt: skip
    points = []
    for head in heads:
        dq = quality.head_int4 if head == "int4-rtn" else 0.0
        for _b, (q, picks) in table.items():
            cfg = Config(tuple(options[j] for j in picks), head)
            points.append(FrontPoint(cfg, latency.predict(cfg), q + dq))
    return front_of(points)


def knapsack(n_layers: int, costs: Sequence[int], delta: Callable[[int, int], float],
             keeps: Sequence[bool]) -> dict[int, tuple[float, tuple[int, ...]]]:  # fmt: skip
    """The multiple-choice knapsack behind every front: one option per layer (option ``j`` costs
    ``costs[j]`` latency bins and ``delta(layer, j)`` quality), the best quality per total cost.
    Configurations that keep nothing are not models: the DP carries a "some option with
    ``keeps[j]`` chosen" flag and only such configurations are returned (bin → (Σ delta, picks)).
    """
    Table = dict[int, tuple[float, tuple[int, ...]]]
    best: dict[bool, Table] = {False: {0: (0.0, ())}, True: {}}
    for layer in range(n_layers):
        nxt: dict[bool, Table] = {False: {}, True: {}}
        deltas = [delta(layer, j) for j in range(len(costs))]
        for kept, table in best.items():
            for b, (q, picks) in table.items():
                for j, c in enumerate(costs):
                    slot = nxt[kept or keeps[j]]
                    nb, nq = b + c, q + deltas[j]
                    if nb not in slot or nq < slot[nb][0]:
                        slot[nb] = (nq, (*picks, j))
        best = {k: _prune(t) for k, t in nxt.items()}
    return best[True]


def _prune(table: dict[int, tuple[float, tuple[int, ...]]]) -> dict[int, tuple[float, tuple[int, ...]]]:
    """Keep only bins whose quality beats every cheaper bin (the running front)."""
    out, best_q = {}, float("inf")
    for b in sorted(table):
        q = table[b][0]
        if q < best_q - 1e-12:
            out[b], best_q = table[b], q
    return out


def front_of(points: list[FrontPoint]) -> list[FrontPoint]:
    out, best_q = [], float("inf")
    for p in sorted(points, key=lambda p: (p.latency_ms, p.delta_nll)):
        if p.delta_nll < best_q - 1e-12:
            out.append(p)
            best_q = p.delta_nll
    return out


def sequential_front(quality: QualityTable, latency: LatencyTable, n_layers: int) -> list[FrontPoint]:
    """Architecture first, precision after: depth chosen per layer under one model-wide precision."""
    points: list[FrontPoint] = []
    for attn, ffn in itertools.product((EXACT, RTN), repeat=2):
        opts = (Option("keep", attn, ffn), Option("drop-ffn", attn, None), Option("drop", None, None))
        points += pareto_front(
            quality, latency, n_layers, opts, heads=("q8",) if attn == ffn == EXACT else ("q8", "int4-rtn")
        )
    return front_of(points)


def at_budget(front: Sequence[FrontPoint], budget_ms: float) -> FrontPoint | None:
    """The best-quality point predicted to decode within ``budget_ms``."""
    ok = [p for p in front if p.latency_ms <= budget_ms + 1e-9]
    return min(ok, key=lambda p: p.delta_nll) if ok else None


# -- engines ----------------------------------------------------------------------------------


def assemble(model_dir: Path, config: Config, out_dir: Path, gguf: Path | None) -> dict[str, Any]:
    """Build ``config`` from the fetched model at ``model_dir`` into a model directory ``out_dir``."""
    from cscompile.passes.depth import DropLayersPass
    from cscompile.passes.pipeline import analyze, run_passes
    from cscompile.passes.precision import quantize_model

    n = len(config.layers)
    model, um = analyze(model_dir / "model.onnx")
    if len(um.layers) != n:
        raise UserError("search config", f"{n} layers", f"{len(um.layers)} (the model's layers)")
    drop, drop_ffn, plan, source = config.plan()
    if drop or drop_ffn:
        model = run_passes(model, [("drop-layers", DropLayersPass(layers=drop, ffn=drop_ffn))])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    report = quantize_model(model_dir, out_dir, plan, grid=str(gguf) if gguf else "none",
                            source_layers=source, analyzed=(model, um))  # fmt: skip
    report["search_config"] = config.describe()
    (out_dir / "search.json").write_text(json.dumps(config.describe()) + "\n")
    return report
