"""The masked reference executor on a tiny model: dense equals the reference, masks do what they say."""

from __future__ import annotations

import numpy as np
import pytest

from cscompile.errors import UserError
from cscompile.evaluation.executor import (
    MaskedExecutor,
    block_activity,
    oracle_policy,
    random_policy,
    static_policy,
    teal_policy,
)
from cscompile.metrics import perplexity
from cscompile.models.reference import TorchReference
from cscompile.recovery.supports import ffn_block_activity


@pytest.fixture(scope="module")
def executor(tiny_dir):
    from transformers import AutoModelForCausalLM

    return MaskedExecutor(AutoModelForCausalLM.from_pretrained(str(tiny_dir("llama-2l") / "hf")), threads=1)


IDS = (np.arange(200) * 37 % 300 + 5).tolist()


def test_dense_equals_the_reference(executor, tiny_dir):
    ref = TorchReference.from_dir(tiny_dir("llama-2l") / "hf", threads=1)
    want = perplexity(ref.logits, IDS, window=64, stride=64).perplexity
    got = executor.evaluate(IDS, None, window=64, stride=64)
    assert got.perplexity == pytest.approx(want, rel=1e-6) and got.executed_fraction == 1.0
    full = executor.evaluate(IDS, oracle_policy(1.0), window=64, stride=64)
    assert full.perplexity == pytest.approx(want, rel=1e-5)
    assert executor.evaluate(IDS, teal_policy(1.0), window=64, stride=64).perplexity == pytest.approx(
        want, rel=1e-5
    )


def test_fractions_and_oracle_beats_random(executor):
    oracle = executor.evaluate(IDS, oracle_policy(0.5, block=4), window=64, stride=64, compare_dense=True)
    rand = executor.evaluate(IDS, random_policy(0.5), window=64, stride=64, compare_dense=True)
    assert oracle.executed_fraction == pytest.approx(0.5) and rand.executed_fraction == pytest.approx(0.5)
    assert oracle.mean_kl < rand.mean_kl
    assert oracle.top1_agreement > rand.top1_agreement
    quarter = executor.evaluate(IDS, oracle_policy(0.25), window=64, stride=64)
    assert quarter.executed_fraction == pytest.approx(0.25)


def test_block_activity_matches_numpy(executor):
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 96)).astype(np.float32)
    down_t = executor.down_t[0]
    for block in (1, 4, 32):
        got = block_activity(torch, torch.from_numpy(a), down_t, block).numpy()
        np.testing.assert_allclose(got, ffn_block_activity(a, down_t.numpy(), block), rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="divisor of 96"):
        block_activity(torch, torch.from_numpy(a), down_t, 5)


def test_static_policy_is_static(executor):
    means = [np.arange(24, dtype=float), np.arange(24, dtype=float)[::-1]]
    pol = static_policy(0.5, 4, means)
    import torch

    a = torch.randn(7, 96)
    m0, _ = pol(0, None, a, executor)
    assert m0.float().mean() == 0.5 and bool((m0 == m0[0]).all())
    assert bool(m0[0, -1]) and not bool(m0[0, 0])  # layer 0 keeps the high-mean (last) blocks


def _layer0_truth(executor, k):
    """Layer 0's MLP input and activations on held-out ids (reversed), and the oracle top-k support."""
    import torch

    from cscompile.recovery.supports import topk_support

    seen = []

    def record(layer, x, a, ex):
        if layer == 0:
            seen.append((x.clone(), a.clone()))
        return torch.ones_like(a, dtype=torch.bool), None

    executor.logits(np.array([IDS[::-1]]), record)
    x, a = seen[0]
    return x, a, topk_support(block_activity(torch, a, executor.down_t[0], 1).numpy(), k)


def test_sketch_policy_predicts_before_gate_up(executor):
    """A ridge decoder from y = Φx finds more of the oracle's channels than chance, from x alone."""

    from cscompile.evaluation.executor import fit_sketch_policy
    from cscompile.recovery.supports import support_f1

    make = fit_sketch_policy(executor, np.array(IDS * 3), m=48)
    res = executor.evaluate(IDS, make(0.5), window=64, stride=64)
    assert res.executed_fraction == pytest.approx(0.5) and np.isfinite(res.perplexity)
    # F1 against the oracle support on held-out real activations, vs 0.5 for a random half
    x, a, truth = _layer0_truth(executor, 48)
    predicted, _ = make(0.5)(0, x, a, executor)
    f1 = support_f1(predicted.numpy(), truth)
    assert f1 > 0.55, f1


def test_cs_policy_recovers_from_the_sketch_alone(executor):
    """Dictionary + group FISTA from y = Φx: the executed fraction it promises, and more of the
    oracle's channels than a random half (it never looks at the activations it is scored on).
    """
    import torch

    from cscompile.evaluation.executor import fit_fista_policy
    from cscompile.recovery.supports import support_f1

    make = fit_fista_policy(executor, np.array(IDS * 3), m=48, iters=30)
    res = executor.evaluate(IDS, make(0.5), window=64, stride=64)
    assert res.executed_fraction == pytest.approx(0.5) and np.isfinite(res.perplexity)
    x, a, truth = _layer0_truth(executor, 48)
    predicted, _ = make(0.5)(0, x, torch.zeros_like(a), executor)  # activations withheld
    assert support_f1(predicted.numpy(), truth) > 0.55


def test_a_geglu_model_runs_masked_with_its_own_activation():
    """Gemma's MLP is tanh-GELU gated: dense equals the model itself, and a policy that keeps every
    channel changes nothing (a SiLU executor would differ on both)."""
    import torch

    from cscompile.models.tiny import tiny_gemma3

    model = tiny_gemma3()
    ids = torch.tensor([IDS[:40]])
    with torch.no_grad():
        want = model(ids).logits[0].numpy()
    ex = MaskedExecutor(model, threads=1)
    np.testing.assert_allclose(ex.logits(np.array([IDS[:40]]), None)[0], want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        ex.logits(np.array([IDS[:40]]), oracle_policy(1.0))[0], want, rtol=0, atol=1e-4
    )
    assert ex.evaluate(IDS[:120], oracle_policy(0.5), window=64, stride=64).executed_fraction < 0.6
