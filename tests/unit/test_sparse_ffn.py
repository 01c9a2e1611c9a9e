"""The channel-sparse FFN kernel against a float64 numpy reference (explicit tolerances)."""

from __future__ import annotations

import numpy as np
import pytest

from cscompile.motifs.kernel import (
    SparseFFN,
    ffn_reference,
    pack_channel_major,
    pack_q8,
    predicted_support,
    q8_row_bytes,
    topk_sorted,
    unpack_q8,
)


def _weights(i: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g, u = (rng.standard_normal((i, h), np.float32) * 0.1 for _ in range(2))
    d = rng.standard_normal((h, i), np.float32) * 0.1
    return pack_channel_major(g, u, d)


@pytest.mark.parametrize(("i", "h", "threads"), [(96, 64, 1), (130, 70, 2), (256, 576, 2)])
def test_dense_and_sparse_match_reference(i, h, threads):
    w = _weights(i, h)
    x = np.random.default_rng(1).standard_normal(h).astype(np.float32)
    f = SparseFFN(w, threads)
    base = np.random.default_rng(2).standard_normal(h).astype(np.float32)
    out = base.copy()
    f.add_to(out, x)
    np.testing.assert_allclose(out - base, ffn_reference(w, x), rtol=1e-4, atol=1e-5)
    for k in (1, i // 3, i - 1):
        idx = np.sort(np.random.default_rng(k).choice(i, k, replace=False)).astype(np.int32)
        out = base.copy()
        f.add_to(out, x, idx)
        np.testing.assert_allclose(out - base, ffn_reference(w, x, idx), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(f.act[:k], _act(w, x, idx), rtol=1e-4, atol=1e-6)


def _act(w: np.ndarray, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    g = w[idx, 0].astype(np.float64) @ x
    return g / (1 + np.exp(-g)) * (w[idx, 1].astype(np.float64) @ x)


def test_pack_layout():
    g = np.arange(6, dtype=np.float32).reshape(3, 2)
    u = g + 10
    d = np.arange(6, dtype=np.float32).reshape(2, 3) + 100
    w = pack_channel_major(g, u, d)
    assert w.shape == (3, 3, 2)
    np.testing.assert_array_equal(w[1, 0], g[1])
    np.testing.assert_array_equal(w[1, 1], u[1])
    np.testing.assert_array_equal(w[1, 2], d[:, 1])
    with pytest.raises(ValueError, match="shapes"):
        pack_channel_major(g, u, d.T)


def test_topk_sorted_matches_numpy_and_breaks_ties_by_index():
    rng = np.random.default_rng(0)
    for n, k in [(10, 3), (1536, 768), (1000, 1), (50, 50), (50, 80)]:
        s = rng.standard_normal(n).astype(np.float32)
        np.testing.assert_array_equal(topk_sorted(s, k), np.sort(np.argsort(-s, kind="stable")[: min(k, n)]))
    ties = np.array([1, 5, 5, 5, 0], np.float32)
    np.testing.assert_array_equal(topk_sorted(ties, 3), [1, 2, 3])
    np.testing.assert_array_equal(topk_sorted(ties, 2), [1, 2])


def test_sensed_kernel_runs_what_the_numpy_predictor_selects():
    i, h, m, k, hot = 200, 64, 16, 50, 8
    w = _weights(i, h, seed=3)
    rng = np.random.default_rng(4)
    phi = rng.standard_normal((m, h)).astype(np.float32)
    dec = rng.standard_normal((i, m)).astype(np.float32)
    bias = rng.standard_normal(i).astype(np.float32)
    f = SparseFFN(w, 2)
    for t in range(5):
        x = rng.standard_normal(h).astype(np.float32)
        out = np.zeros(h, np.float32)
        idx, residual = f.sensed_add_to(out, x, phi, dec, bias, k, hot)
        want = np.flatnonzero(predicted_support(x[None], phi, dec, bias, k, hot)[0])
        np.testing.assert_array_equal(idx, want)
        assert set(range(hot)) <= set(idx.tolist())
        np.testing.assert_allclose(out, ffn_reference(w, x, want), rtol=1e-4, atol=1e-5)
        scores = (x @ phi.T) @ dec.T + bias
        a = _act(w, x, want)
        expect = np.linalg.norm(np.abs(a) - scores[want]) / np.linalg.norm(a)
        assert residual == pytest.approx(expect, rel=1e-3), t


def test_bad_arguments_raise():
    f = SparseFFN(_weights(32, 16), 1)
    with pytest.raises(ValueError, match="int32"):
        f.add_to(np.zeros(16, np.float32), np.zeros(16, np.float32), np.arange(4, dtype=np.int64))
    with pytest.raises(ValueError, match="rejected"):
        phi = np.zeros((4, 16), np.float32)
        f.sensed_add_to(
            np.zeros(16, np.float32), np.zeros(16, np.float32), phi, np.zeros((32, 4), np.float32), None, 40
        )
    with pytest.raises(ValueError, match="float32"):
        SparseFFN(np.zeros((4, 3, 8), np.float64))


def test_q8_records_roundtrip_within_a_510th_of_each_block_range():
    w = _weights(40, 96, seed=5)
    rec = pack_q8(w)
    assert rec.dtype == np.int8 and rec.shape == (40, 3 * q8_row_bytes(96))
    back = unpack_q8(rec, 96)
    blocks = w.reshape(40, 3, 3, 32)
    rng = (blocks.max(-1) - blocks.min(-1))[..., None]
    err = np.abs(back - w).reshape(40, 3, 3, 32)
    assert (err <= rng / 510 + 1e-7).all()
    assert err.max() > 0  # really quantized


def test_q8_levels_reproduce_a_16_level_grid_exactly_when_it_spans_the_block():
    rng = np.random.default_rng(6)
    d = rng.uniform(0.01, 0.05, (8, 3, 2, 1))
    m = rng.uniform(-0.3, 0.0, (8, 3, 2, 1))
    q = rng.integers(0, 16, (8, 3, 2, 32))
    q[..., 0], q[..., 1] = 0, 15  # both ends of the grid present
    w = (d * q + m).reshape(8, 3, 64).astype(np.float32)
    np.testing.assert_allclose(unpack_q8(pack_q8(w), 64), w, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_q8_kernel_matches_reference_on_its_own_weights(threads):
    i, h = 150, 96
    w = _weights(i, h, seed=7)
    rec = pack_q8(w)
    ref_w = unpack_q8(rec, h)
    f = SparseFFN(rec, threads, fmt="q8", hidden=h)
    x = np.random.default_rng(8).standard_normal(h).astype(np.float32)
    out = np.zeros(h, np.float32)
    f.add_to(out, x)
    np.testing.assert_allclose(out, ffn_reference(ref_w, x), rtol=1e-4, atol=1e-5)
    idx = np.sort(np.random.default_rng(9).choice(i, 41, replace=False)).astype(np.int32)
    out = np.zeros(h, np.float32)
    f.add_to(out, x, idx)
    np.testing.assert_allclose(out, ffn_reference(ref_w, x, idx), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f.dense_weights(), ref_w)
    # and the sensed path runs the same kernel on the chosen set
    rng = np.random.default_rng(10)
    phi = rng.standard_normal((8, h)).astype(np.float32)
    dec = rng.standard_normal((i, 8)).astype(np.float32)
    out = np.zeros(h, np.float32)
    sel, _ = f.sensed_add_to(out, x, phi, dec, None, 30)
    np.testing.assert_allclose(out, ffn_reference(ref_w, x, sel), rtol=1e-4, atol=1e-5)


def test_q8_shape_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_q8(np.zeros((4, 3, 40), np.float32))
    with pytest.raises(ValueError, match="q8"):
        SparseFFN(np.zeros((4, 10), np.int8), fmt="q8", hidden=32)
    with pytest.raises(ValueError, match="unknown kernel format"):
        SparseFFN(np.zeros((4, 3, 32), np.float32), fmt="q4")
