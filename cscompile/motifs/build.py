"""Build a model's motif family for a bundle: calibrate, allocate, measure, keep the Pareto front.

Steps (all on calibration text, never on the text benchmarks score):
fit the per-layer sketch predictors → per-layer error curves and KL sensitivities → for each
target FFN fraction, a uniform and an allocated candidate → perplexity of every candidate on a
held-out calibration slice (evaluation mode: each position runs exactly what a decode step
would) and decode latency profiled on this machine → keep the Pareto front (latency,
perplexity), at most ``max_engines`` motifs, dense always kept → controller thresholds.

Bundle files (no pickle): ``motifs/family.json`` (members, measurements, controller) and
``motifs/predictors.npz`` (Φ, decoders, biases; a deterministic zip).
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.metrics import perplexity
from cscompile.motifs.engine import LayeredEngine, LayerPredictor, Motif, fit_predictors
from cscompile.motifs.family import (
    LEVELS,
    Family,
    FamilyMember,
    allocate,
    error_curves,
    predictors_from_arrays,
    predictors_to_arrays,
    sensitivities,
)
from cscompile.motifs.runtime import ControllerConfig, SwitchingSession, calibrate_controller

FAMILY_FILE = "motifs/family.json"
PREDICTORS_FILE = "motifs/predictors.npz"


@dataclass
class FamilyBuild:
    family: Family
    predictors: list[LayerPredictor]
    controller: ControllerConfig
    candidates: list[FamilyMember]  # everything measured, kept or not
    bank_centroids: np.ndarray | None = None  # [banks, H]
    banks: list[list[LayerPredictor]] | None = None  # per bank, per layer

    def files(self) -> dict[str, bytes]:
        meta = dict(self.family.meta, controller=self.controller.to_dict())
        fam = Family(self.family.members, self.family.m, self.family.seed, meta)
        arrays = predictors_to_arrays(self.predictors)
        if self.banks and self.bank_centroids is not None:
            per = [predictors_to_arrays(b) for b in self.banks]
            arrays["bank_centroids"] = self.bank_centroids.astype(np.float32)
            arrays["bank_decoder"] = np.stack([a["decoder"] for a in per])
            arrays["bank_bias"] = np.stack([a["bias"] for a in per])
        return {FAMILY_FILE: (fam.to_json() + "\n").encode(), PREDICTORS_FILE: npz_bytes(arrays)}


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A deterministic ``.npz`` (fixed zip timestamps, sorted members), loadable with allow_pickle=False."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            arr = np.ascontiguousarray(arrays[name])
            if arr.dtype == object:
                raise ValueError(f"array {name} has dtype object")
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


def build_family(
    engine: LayeredEngine,
    calib_ids: np.ndarray,
    *,
    m: int = 256,
    targets: Sequence[float] = (0.9, 0.75, 0.5),
    max_engines: int = 4,
    seed: int = 0,
    quality_tokens: int = 1024,
    sens_tokens: int = 512,
    profile_steps: int = 0,
    select: str = "fraction",
    progress: Callable[[str], None] | None = None,
    prompts: Sequence[np.ndarray] | None = None,
    banks: int = 1,
) -> FamilyBuild:
    """Calibrate and measure a motif family on ``engine`` (token ids ``calib_ids``).

    ``select="fraction"`` (the default, and what bundles use) ranks cost by the executed FFN
    fraction, so the same inputs always give the same family and the same bundle bytes;
    ``select="measured"`` ranks by decode latency profiled here (``profile_steps`` > 0), which
    varies run to run. Profiled latencies are never written into a bundle.
    ``banks`` > 1 with ``prompts`` (token ids per calibration prompt): also fit one predictor set
    per k-means cluster of the prompts' layer-0 FFN inputs (task-conditioned banks, chosen at
    prefill by the nearest centroid). Allocation and quality use the universal predictors.
    """
    if banks > 1 and (not prompts or len(prompts) < banks):  # checked before minutes of calibration
        from cscompile.errors import UserError

        raise UserError(
            "motif banks", f"{len(prompts or [])} calibration prompts", f"at least {banks} (one per bank)"
        )
    if select not in ("fraction", "measured"):
        raise ValueError(f"select must be 'fraction' or 'measured', not {select!r}")
    if select == "measured" and profile_steps <= 0:
        raise ValueError("select='measured' needs profile_steps > 0")
    say = progress or (lambda msg: None)
    ids = np.asarray(calib_ids, np.int64)
    need = quality_tokens + sens_tokens + 256
    if len(ids) < need:
        from cscompile.errors import UserError

        raise UserError(
            "calibration text", f"{len(ids)} tokens", f"at least {need} tokens for the motif family"
        )
    quality, sens_ids, fit_ids = (
        ids[:quality_tokens],
        ids[quality_tokens : quality_tokens + sens_tokens],
        ids[quality_tokens + sens_tokens :],
    )
    say(f"fitting predictors (m={m}) on {len(fit_ids)} tokens")
    preds = fit_predictors(engine, fit_ids, m=m, seed=seed)
    say("error curves")
    curves = error_curves(engine, preds, fit_ids)
    engine.sparse_prefill = True
    try:

        def logits(motif: Motif, text: np.ndarray = sens_ids) -> np.ndarray:
            return np.concatenate(
                [
                    engine.forward(text[None, i : i + 512], engine.new_state(), motif)[0]
                    for i in range(0, len(text), 512)
                ]
            )

        say("layer sensitivities")
        sens = sensitivities(logits, engine, preds)
        inter = engine.intermediate
        candidates = [FamilyMember("dense", [1.0] * engine.num_layers)]
        for t in targets:
            candidates.append(FamilyMember(f"uniform-{round(t * 100)}", [t] * engine.num_layers))
            candidates.append(FamilyMember(f"allocated-{round(t * 100)}", allocate(curves, sens, LEVELS, t)))
        for mb in candidates:
            say(f"quality of {mb.name}")
            motif = mb.motif(inter, preds)
            mb.perplexity = perplexity(_scorer(engine, motif), quality).perplexity
    finally:
        engine.sparse_prefill = False
    if profile_steps > 0:
        say("profiling decode latency")
        _profile(engine, candidates, preds, quality, profile_steps)
    kept = pareto(candidates, max_engines, by=select)
    motifs = [mb.motif(inter, preds) for mb in kept]
    controller = calibrate_controller(engine, motifs, fit_ids) if len(motifs) > 1 else ControllerConfig([])
    family = Family(kept, m=m, seed=seed, meta={"targets": list(targets), "sensitivity": sens.tolist()})
    centroids, bank_preds = None, None
    if banks > 1 and prompts:  # (validated above)
        say(f"fitting {banks} task-conditioned banks")
        centroids, bank_preds = fit_banks(engine, prompts, banks, m=m, seed=seed)
    return FamilyBuild(family, preds, controller, candidates, centroids, bank_preds)


def prompt_features(engine: LayeredEngine, prompts: Sequence[np.ndarray]) -> np.ndarray:
    """``[n, H]``: each prompt's mean layer-0 FFN input (the bank selector's feature)."""
    from cscompile.recovery.banks import prompt_feature

    feats = []
    for ids in prompts:
        seen: list[np.ndarray] = []

        def observe(li: int, x: np.ndarray, seen: list[np.ndarray] = seen) -> None:
            if li == 0:
                seen.append(x)

        engine.forward(np.asarray(ids)[None], engine.new_state(), observe=observe)
        feats.append(prompt_feature(seen[0]))
    return np.stack(feats)


def fit_banks(
    engine: LayeredEngine, prompts: Sequence[np.ndarray], banks: int, m: int, seed: int = 0
) -> tuple[np.ndarray, list[list[LayerPredictor]]]:
    """k-means on prompt features, then one predictor set per cluster (same Φ as the universal set)."""
    from cscompile.recovery.banks import kmeans

    centroids, labels = kmeans(prompt_features(engine, prompts), banks, seed=seed)
    out = []
    for c in range(banks):
        members = [np.asarray(prompts[int(i)]) for i in np.flatnonzero(labels == c)]
        ids = np.concatenate(members) if members else np.concatenate([np.asarray(p) for p in prompts])
        out.append(fit_predictors(engine, ids, m=m, seed=seed))
    return centroids, out


def _scorer(engine: LayeredEngine, motif: Motif) -> Callable[[np.ndarray], np.ndarray]:
    def score(x: np.ndarray) -> np.ndarray:
        return engine.forward(x, engine.new_state(), motif)

    return score


def _profile(
    engine: LayeredEngine,
    members: list[FamilyMember],
    preds: Sequence[LayerPredictor],
    text: np.ndarray,
    steps: int,
) -> None:
    """Median decode ms per member, members interleaved in rounds (machine noise hits all alike)."""
    times: dict[str, list[float]] = {mb.name: [] for mb in members}
    for r in range(2):
        for mb in members if r == 0 else members[::-1]:
            motif = mb.motif(engine.intermediate, preds)
            st = engine.new_state()
            engine.forward(text[None, :32], st)
            for t in text[32 : 32 + steps]:
                a = time.perf_counter()
                engine.forward(np.array([[t]]), st, motif)
                times[mb.name].append(time.perf_counter() - a)
    for mb in members:
        mb.decode_ms = float(np.median(times[mb.name])) * 1e3


def pareto(members: list[FamilyMember], max_engines: int, by: str = "measured") -> list[FamilyMember]:
    """Members not dominated in (cost, perplexity), densest first; dense always kept; at most
    ``max_engines`` (spread along the front). Cost: measured decode ms, or the FFN fraction.
    """

    def cost(mb: FamilyMember) -> float:
        return float(np.mean(mb.densities)) if by == "fraction" else (mb.decode_ms or 0.0)

    dense = members[0]
    front = []
    for a in members:
        pa, ca = a.perplexity or 0.0, cost(a)
        dominated = any(
            b is not a
            and cost(b) <= ca
            and (b.perplexity or 0.0) <= pa
            and (cost(b) < ca or (b.perplexity or 0.0) < pa)
            for b in members
        )
        if not dominated or a is dense:
            front.append(a)
    front.sort(key=lambda mb: mb.perplexity or 0.0)  # densest (best quality) first
    if dense in front:
        front.remove(dense)
    front.insert(0, dense)
    if len(front) > max_engines:
        pick = np.linspace(0, len(front) - 1, max_engines).round().astype(int)
        front = [front[i] for i in sorted(set(pick.tolist()))]
    return front


NpzReader = Callable[[str], dict[str, np.ndarray]]


def predictor_arrays(root: Path, read_npz: NpzReader | None = None) -> dict[str, np.ndarray]:
    """The arrays of ``predictors.npz`` (through a bundle's safe ``read_npz`` when given)."""
    if read_npz is not None:
        return read_npz(PREDICTORS_FILE)
    with np.load(root / PREDICTORS_FILE, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_family(
    root: Path, read_npz: NpzReader | None = None, arrays: dict[str, np.ndarray] | None = None
) -> tuple[Family, list[LayerPredictor], ControllerConfig]:
    """Read a family back from a bundle directory (``arrays``: the predictors, if already read)."""
    fam = Family.from_json((root / FAMILY_FILE).read_text())
    if arrays is None:
        arrays = predictor_arrays(root, read_npz)
    controller = ControllerConfig.from_dict(fam.meta.get("controller", {"entropy_thresholds": [], "hold": 4}))
    return fam, predictors_from_arrays(arrays), controller


def load_banks(
    root: Path, read_npz: NpzReader | None = None, arrays: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, list[list[LayerPredictor]]] | None:
    """The task-conditioned banks of a bundle's family, or None when it has none."""
    if arrays is None:
        arrays = predictor_arrays(root, read_npz)
    if "bank_centroids" not in arrays:
        return None
    banks = [
        predictors_from_arrays(
            {
                "phi": arrays["phi"],
                "decoder": arrays["bank_decoder"][b],
                "bias": arrays["bank_bias"][b],
                "hot": arrays["hot"],
            }
        )
        for b in range(len(arrays["bank_centroids"]))
    ]
    return np.asarray(arrays["bank_centroids"], np.float64), banks


def switching_session(
    engine: LayeredEngine,
    family: Family,
    preds: Sequence[LayerPredictor],
    controller: ControllerConfig,
    banks: tuple[np.ndarray, list[list[LayerPredictor]]] | None = None,
) -> SwitchingSession:
    motifs = [mb.motif(engine.intermediate, preds) for mb in family.members]
    if banks is None:
        return SwitchingSession(engine, motifs, controller)
    from cscompile.recovery.banks import BankSelector

    centroids, bank_preds = banks
    bank_motifs = [[mb.motif(engine.intermediate, bp) for mb in family.members] for bp in bank_preds]
    return SwitchingSession(
        engine, motifs, controller, bank_motifs=bank_motifs, selector=BankSelector(centroids)
    )


def family_summary(fb: FamilyBuild) -> list[dict[str, Any]]:
    kept = {mb.name for mb in fb.family.members}
    return [
        {
            "motif": mb.name,
            "ffn_fraction": float(np.mean(mb.densities)),
            "perplexity": mb.perplexity,
            "decode_ms": mb.decode_ms,
            "kept": mb.name in kept,
        }
        for mb in fb.candidates
    ]


def dumps_summary(fb: FamilyBuild) -> str:
    return json.dumps(family_summary(fb), indent=2)
