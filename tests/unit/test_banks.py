"""k-means banks: clustering and nearest-centroid choice."""

from __future__ import annotations

import numpy as np
import pytest

from cscompile.errors import UserError
from cscompile.recovery.banks import BankSelector, kmeans, prompt_feature


def test_kmeans_separates_clear_clusters_and_is_deterministic():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([c + rng.standard_normal((20, 2)) * 0.3 for c in centers])
    cent, labels = kmeans(x, 3, seed=1)
    for block in range(3):  # each true cluster maps to one label
        assert len(set(labels[block * 20 : (block + 1) * 20].tolist())) == 1
    assert len(set(labels.tolist())) == 3
    cent2, labels2 = kmeans(x, 3, seed=1)
    np.testing.assert_array_equal(labels, labels2)
    sel = BankSelector(cent)
    assert sel.choose([10.2, -0.1]) == labels[20]
    assert sel.choose([0.1, 9.7]) == labels[40]


def test_kmeans_needs_a_prompt_per_bank():
    with pytest.raises(UserError, match="bank"):
        kmeans(np.zeros((2, 3)), 3)


def test_prompt_feature_is_the_positional_mean():
    x = np.arange(12, dtype=np.float32).reshape(1, 4, 3)
    np.testing.assert_allclose(prompt_feature(x), [4.5, 5.5, 6.5])
