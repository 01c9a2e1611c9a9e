"""Reference executor: the model under a per-token FFN unit mask, scored for real.

Runs the transformers model (PyTorch, eager) with every layer's MLP replaced by
``down((silu(gate·x) ⊙ up·x) ⊙ mask)``, where a *policy* chooses the mask per token from what a
predictor may see (``x``, the MLP input) or, for oracles, from the intermediate ``a`` itself.
Reports perplexity, the executed FFN fraction, and agreement with the dense model.
Needs the ``export`` extra (torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cscompile.errors import UserError, require
from cscompile.metrics import window_spans

#: policy(layer, x [T, H], a [T, I], executor) -> (mask for a [T, I], optional mask for x [T, H]).
#: Oracles may read ``a``; predictors must decide from ``x`` (the MLP input) alone.
Policy = Callable[[int, Any, Any, "MaskedExecutor"], tuple[Any, Any]]


@dataclass
class MaskedResult:
    perplexity: float
    executed_fraction: float  # mean fraction of FFN channels kept (over layers and tokens)
    tokens_scored: int
    mean_kl: float | None = None
    top1_agreement: float | None = None


class MaskedExecutor:
    """A transformers model with gated MLPs (Llama's SwiGLU, Gemma's GeGLU: ``act_fn(gate) * up``)
    whose MLPs obey a mask policy.
    """

    def __init__(self, hf_model: Any, threads: int | None = None) -> None:
        self.torch = require("torch", "export", "the masked reference executor")
        if threads:
            self.torch.set_num_threads(threads)
        self.model = hf_model.eval()
        layers = getattr(getattr(hf_model, "model", None), "layers", None)
        if layers is None or not all(hasattr(layers[0].mlp, a) for a in ("gate_proj", "up_proj", "act_fn")):
            raise UserError(
                "masked executor",
                "model without gated MLP layers",
                "a Llama- or Gemma-family transformers model",
            )
        self.layers = layers
        self.policy: Policy | None = None
        self._kept: list[float] = []
        with self.torch.no_grad():
            #: W_downᵀ per layer, ``[I, H]``: row j is channel j's contribution direction
            self.down_t = [layer.mlp.down_proj.weight.float().t().contiguous() for layer in layers]
            self.down_row_norm = [w.norm(dim=1) for w in self.down_t]  # [I]
        for i, layer in enumerate(layers):
            layer.mlp.forward = self._mlp_forward(i, layer.mlp)

    def _mlp_forward(self, index: int, mlp: Any) -> Callable[[Any], Any]:
        act = mlp.act_fn  # SiLU (Llama) or tanh-GELU (Gemma), as the model itself computes it

        def forward(x: Any) -> Any:
            if self.policy is None:
                return mlp.down_proj(act(mlp.gate_proj(x)) * mlp.up_proj(x))
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])  # [T, H]
            a = act(mlp.gate_proj(x2)) * mlp.up_proj(x2)  # [T, I]
            mask, x_mask = self.policy(index, x2, a, self)
            if x_mask is not None:  # input sparsity (TEAL): gate/up see the masked input
                xm = x2 * x_mask
                a = act(mlp.gate_proj(xm)) * mlp.up_proj(xm)
            self._kept.append(float(mask.float().mean()))
            return mlp.down_proj(a * mask).reshape(*shape[:-1], -1)

        return forward

    def logits(self, ids: np.ndarray, policy: Policy | None) -> np.ndarray:
        torch = self.torch
        self.policy = policy
        try:
            with torch.no_grad():
                return self.model(torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()
        finally:
            self.policy = None

    def evaluate(
        self,
        ids: list[int] | np.ndarray,
        policy: Policy | None,
        window: int = 512,
        stride: int = 512,
        compare_dense: bool = False,
    ) -> MaskedResult:
        """Perplexity under ``policy`` (transformers' windowing), executed fraction, and agreement with dense."""
        from cscompile.metrics import log_softmax

        ids = np.asarray(ids, np.int64)
        self._kept = []
        nll, count, kls, agree = 0.0, 0, [], []
        for b, e, first in window_spans(len(ids), window, stride):
            lp = log_softmax(self.logits(ids[None, b:e], policy)[0][first - 1 - b : e - 1 - b])
            targets = ids[first:e]
            nll -= float(lp[np.arange(len(targets)), targets].sum())
            count += len(targets)
            if compare_dense:
                dense = log_softmax(self.logits(ids[None, b:e], None)[0][first - 1 - b : e - 1 - b])
                kls.append(float((np.exp(dense) * (dense - lp)).sum(-1).mean()))
                agree.append(float((dense.argmax(-1) == lp.argmax(-1)).mean()))
        kept = float(np.mean(self._kept)) if self._kept else 1.0
        return MaskedResult(
            perplexity=float(np.exp(nll / count)),
            executed_fraction=kept,
            tokens_scored=count,
            mean_kl=float(np.mean(kls)) if kls else None,
            top1_agreement=float(np.mean(agree)) if agree else None,
        )


# -- policies ------------------------------------------------------------------------------


def _topk_mask(torch: Any, scores: Any, k: int) -> Any:
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def block_activity(torch: Any, a: Any, down_t: Any, block: int) -> Any:
    """‖W_down[B]ᵀ a_B‖ per block: ``a [T, I]``, ``down_t [I, H]`` → ``[T, I/block]``."""
    t, width = a.shape
    if width % block:
        raise UserError("block size", str(block), f"a divisor of {width}")
    if block == 1:
        return (a * down_t.norm(dim=1)).abs()
    nb = width // block
    # ‖Σ_j a_j w_j‖² = a_Bᵀ G_B a_B with the block's Gram matrix G_B = W_B W_Bᵀ (b×b): no [T, I/b, H] tensor
    w = down_t.reshape(nb, block, -1)
    gram = torch.einsum("nbh,nch->nbc", w, w)
    ab = a.reshape(t, nb, block)
    energy = torch.einsum("tnb,nbc,tnc->tn", ab, gram, ab)
    return energy.clamp_min(0).sqrt()


def oracle_policy(fraction: float, block: int = 1) -> Policy:
    """Per token, keep the blocks of ``block`` channels with the largest contribution ‖W_downᵀ a_B‖."""
    torch = require("torch", "export", "oracle policies")

    def policy(layer: int, x: Any, a: Any, ex: MaskedExecutor) -> tuple[Any, Any]:
        scores = block_activity(torch, a, ex.down_t[layer], block)
        keep = _topk_mask(torch, scores, max(1, round(fraction * scores.shape[-1])))
        return keep.repeat_interleave(block, dim=-1), None

    return policy


def teal_policy(fraction: float) -> Policy:
    """TEAL-style magnitude sparsity: keep the largest ``fraction`` of |x| into gate/up and of |a| into down."""
    torch = require("torch", "export", "TEAL-style policies")

    def policy(layer: int, x: Any, a: Any, ex: MaskedExecutor) -> tuple[Any, Any]:
        x_mask = _topk_mask(torch, x.abs(), max(1, round(fraction * x.shape[-1])))
        return _topk_mask(torch, a.abs(), max(1, round(fraction * a.shape[-1]))), x_mask

    return policy


def random_policy(fraction: float, seed: int = 0) -> Policy:
    torch = require("torch", "export", "random policies")
    gen = torch.Generator().manual_seed(seed)

    def policy(layer: int, x: Any, a: Any, ex: MaskedExecutor) -> tuple[Any, Any]:
        scores = torch.rand(a.shape, generator=gen)
        return _topk_mask(torch, scores, max(1, round(fraction * a.shape[-1]))), None

    return policy


def static_policy(fraction: float, block: int, mean_activity: list[np.ndarray]) -> Policy:
    """Static pruning: the same blocks for every token, the ones with the highest calibration-mean activity."""
    torch = require("torch", "export", "static policies")
    masks = []
    for act in mean_activity:
        n_blocks = act.shape[0]
        keep = np.zeros(n_blocks, bool)
        keep[np.argsort(-act)[: max(1, round(fraction * n_blocks))]] = True
        masks.append(torch.from_numpy(np.repeat(keep, block)))

    def policy(layer: int, x: Any, a: Any, ex: MaskedExecutor) -> tuple[Any, Any]:
        return masks[layer].expand_as(a), None

    return policy


def _sketch_traces(
    ex: MaskedExecutor, calib_ids: np.ndarray, phi: Any, window: int = 512
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per layer, the measurements ``y = Φx`` of the MLP input and the channel activities
    ``|a_i|·‖down_i‖`` over ``calib_ids`` (dense forward).
    """
    import torch

    ys: list[list[np.ndarray]] = [[] for _ in ex.layers]
    ss: list[list[np.ndarray]] = [[] for _ in ex.layers]

    def record(layer: int, x: Any, a: Any, executor: MaskedExecutor) -> tuple[Any, Any]:
        ys[layer].append((x @ phi.T).numpy())
        ss[layer].append(block_activity(torch, a, executor.down_t[layer], 1).numpy())
        return torch.ones_like(a, dtype=torch.bool), None

    for start in range(0, len(calib_ids) - 1, window):
        ex.logits(np.asarray(calib_ids)[None, start : start + window], record)
    return [np.concatenate(y) for y in ys], [np.concatenate(sc) for sc in ss]


def _phi(ex: MaskedExecutor, m: int, kind: str, seed: int) -> Any:
    import torch

    from cscompile.recovery.operators import MeasurementOperator

    hidden = ex.layers[0].mlp.gate_proj.in_features
    return torch.from_numpy(MeasurementOperator(kind, m, hidden, seed).matrix)


def fit_sketch_policy(
    ex: MaskedExecutor,
    calib_ids: np.ndarray,
    m: int,
    kind: str = "gaussian",
    seed: int = 0,
    ridge: float = 1e-3,
    window: int = 512,
) -> Callable[[float], Policy]:
    """Fit, per layer, a ridge sketch decoder from ``y = Φ x`` (the MLP input) to channel activities.

    Returns ``make(fraction) -> Policy`` that keeps the top channels by *predicted* activity:
    a support chosen before gate/up run, which is where the savings are.
    """
    import torch

    from cscompile.recovery.solvers import SketchDecoder

    phi = _phi(ex, m, kind, seed)
    ys, ss = _sketch_traces(ex, calib_ids, phi, window)
    decoders = [SketchDecoder(ridge).fit(y, sc) for y, sc in zip(ys, ss)]
    weights = [torch.from_numpy(d.weight.astype(np.float32)) for d in decoders]  # type: ignore[union-attr]
    biases = [torch.from_numpy(d.bias.astype(np.float32)) for d in decoders]  # type: ignore[union-attr]

    def make(fraction: float) -> Policy:
        def policy(layer: int, x: Any, a: Any, executor: MaskedExecutor) -> tuple[Any, Any]:
            scores = (x @ phi.T) @ weights[layer] + biases[layer]  # predicted from x alone
            return _topk_mask(torch, scores, max(1, round(fraction * scores.shape[-1]))), None

        return policy

    return make


def fit_fista_policy(
    ex: MaskedExecutor,
    calib_ids: np.ndarray,
    m: int,
    iters: int = 20,
    lam_frac: float = 0.05,
    seed: int = 0,
    window: int = 512,
) -> Callable[[float], Policy]:
    """Compressed-sensing recovery as a policy: per layer a calibrated dictionary ``y ≈ D s + c``
    (least squares over ``calib_ids``), then per token group FISTA on the measurements of the
    deviation from the calibration mean (λ = ``lam_frac``·‖Dᵀr‖∞, ``iters`` fixed), top-k of the
    recovered scores. Chosen from ``y = Φx`` alone, before gate/up run.
    """
    import torch

    from cscompile.recovery.solvers import fista_batch

    phi = _phi(ex, m, "gaussian", seed)
    ys, ss = _sketch_traces(ex, calib_ids, phi, window)
    fitted = []
    for yf, sf in zip(ys, ss):
        sm, ym = sf.mean(0), yf.mean(0)
        sc = (sf - sm).astype(np.float64)
        gram = sc.T @ sc + 1e-3 * len(sc) * np.eye(sc.shape[1])
        dmat = np.linalg.solve(gram, sc.T @ (yf - ym)).T.astype(np.float32)  # [m, I]
        fitted.append((dmat, sm.astype(np.float32), (ym + dmat @ sm).astype(np.float32)))

    def make(fraction: float) -> Policy:
        def policy(layer: int, x: Any, a: Any, executor: MaskedExecutor) -> tuple[Any, Any]:
            dmat, sm, offset = fitted[layer]
            r = (x @ phi.T).numpy() - offset  # measurements of s − mean(s)
            lam = lam_frac * np.abs(r @ dmat).max(-1)
            est = fista_batch(dmat, r, np.arange(dmat.shape[1]), lam, iters) + sm
            scores = torch.from_numpy(est)
            return _topk_mask(torch, scores, max(1, round(fraction * scores.shape[-1]))), None

        return policy

    return make


def executor_and_text(
    name: str = "smollm2", held_out: int = 8192, calib: int = 8192, threads: int | None = None
) -> tuple[MaskedExecutor, np.ndarray, np.ndarray]:
    """A fetched model under a :class:`MaskedExecutor`, the first ``held_out`` tokens of the reference
    corpus (scored) and the next ``calib`` tokens (for calibration): the setup of the recovery experiments.
    """
    transformers = require("transformers", "export", "the masked reference executor")
    from cscompile.decode.tokenizer import Tokenizer
    from cscompile.metrics import reference_corpus
    from cscompile.models.zoo import fetch

    art = fetch(name)
    ex = MaskedExecutor(transformers.AutoModelForCausalLM.from_pretrained(str(art.hf_dir)), threads=threads)
    ids = np.array(Tokenizer(art.tokenizer_dir).encode(reference_corpus()), np.int64)
    return ex, ids[:held_out], ids[held_out : held_out + calib]
