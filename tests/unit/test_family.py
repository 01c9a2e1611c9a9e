"""Per-layer density allocation and the family's serialization."""

from __future__ import annotations

import numpy as np
import pytest

from cscompile.motifs.engine import LayerPredictor
from cscompile.motifs.family import (
    Family,
    FamilyMember,
    allocate,
    predictors_from_arrays,
    predictors_to_arrays,
)

LEVELS = (1.0, 0.75, 0.5, 0.25)


def test_allocation_spares_the_sensitive_layer_and_meets_the_target():
    curves = np.tile(np.array([0.0, 0.1, 0.3, 0.6]), (4, 1))
    sens = np.array([10.0, 0.1, 0.1, 0.1])  # layer 0 hurts a lot
    dens = allocate(curves, sens, LEVELS, target=0.625, probe=0.5)
    assert np.mean(dens) <= 0.625 + 1e-9
    assert dens[0] == 1.0
    assert min(dens[1:]) < 1.0


def test_allocation_is_uniform_for_identical_layers():
    curves = np.tile(np.array([0.0, 0.1, 0.3, 0.6]), (4, 1))
    dens = allocate(curves, np.ones(4), LEVELS, target=0.75)
    assert dens == [0.75] * 4


def test_allocation_of_full_density_changes_nothing():
    curves = np.random.default_rng(0).random((3, 4))
    assert allocate(curves, np.ones(3), LEVELS, target=1.0) == [1.0] * 3


def test_family_and_predictors_round_trip():
    fam = Family([FamilyMember("a", [1.0, 0.5], perplexity=14.2, decode_ms=12.0)], m=8, seed=3, meta={"x": 1})
    back = Family.from_json(fam.to_json())
    assert back == fam
    rng = np.random.default_rng(1)
    phi = rng.standard_normal((8, 16)).astype(np.float32)
    preds = [
        LayerPredictor(
            phi,
            rng.standard_normal((32, 8)).astype(np.float32),
            rng.standard_normal(32).astype(np.float32),
            hot=h,
        )
        for h in (0, 4)
    ]
    again = predictors_from_arrays(predictors_to_arrays(preds))
    for p, q in zip(preds, again):
        np.testing.assert_array_equal(p.decoder, q.decoder)
        np.testing.assert_array_equal(p.bias, q.bias)
        np.testing.assert_array_equal(p.phi, q.phi)
        assert p.hot == q.hot
    motif = back.members[0].motif(32, again)
    assert motif.k == [None, 16]
    assert motif.executed_fraction(32) == pytest.approx(0.75)
