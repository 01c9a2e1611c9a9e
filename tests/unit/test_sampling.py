from __future__ import annotations

import numpy as np

from cscompile.runtime import GenerationConfig, sample


def test_top_p_never_leaves_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    cfg = GenerationConfig(temperature=1.0, top_p=0.8)
    draws = [sample(logits, cfg, rng) for _ in range(2000)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    frac0 = draws.count(0) / len(draws)
    assert abs(frac0 - 0.5 / 0.8) < 0.05


def test_top_k_and_temperature():
    logits = np.array([3.0, 2.0, 1.0, 0.0, -1.0])
    rng = np.random.default_rng(1)
    draws = [sample(logits, GenerationConfig(temperature=1.0, top_k=2), rng) for _ in range(500)]
    assert set(draws) == {0, 1}
    cold = [sample(logits, GenerationConfig(temperature=0.01), rng) for _ in range(50)]
    assert set(cold) == {0}
    assert sample(logits, GenerationConfig(), rng) == 0
