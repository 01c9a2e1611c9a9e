"""Joint width × depth × precision search on the native step: exact fronts, the latency fit, the
proxy's units against the engine they stand for."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cscompile.errors import UserError
from cscompile.native.points import LayerChoice, NativeConfig, Ranking, Shape, choices, dense_config, units
from cscompile.search.native_search import (
    LAT_TERMS,
    NativeLatencyTable,
    NativeQualityTable,
    latency_features,
    pareto_front,
    probe_configs,
    sequential_front,
)

SHAPE = Shape(n_layers=2, n_heads=3, ffn_blocks=4)
COEF = {"base": 1.0, "attn@4": 0.02, "attn@8": 0.03, "qhead@4": 0.01, "qhead@8": 0.018, "ffn@4": 0.015,
        "ffn@8": 0.02, "block@4": 0.012, "block@8": 0.02, "lmhead@4": -0.2}  # fmt: skip


def _tables(seed=0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    delta = {u: rng.uniform(0, 0.01 if "q8" in u else 0.3, SHAPE.n_layers).tolist() for u in units(SHAPE)}
    return NativeQualityTable(SHAPE, 2.0, delta, 0.05), NativeLatencyTable(dict(COEF), [])


def test_levels_choices_and_names():
    assert SHAPE.head_levels() == [3, 2, 1, 0] and SHAPE.block_levels() == [4, 3, 2, 0]
    cs = choices(SHAPE)
    assert len(cs) == len(set(cs)) == (3 * 2 + 1) * (3 * 2 + 1)
    for c in cs:
        assert LayerChoice.parse(c.name) == c
    assert LayerChoice(0, 0).units(SHAPE) == ["drop"]
    assert LayerChoice(3, 4, 8, 4).units(SHAPE) == ["attn-q8"]
    assert LayerChoice(2, 0, 8, 4).units(SHAPE) == ["heads-2", "attn-q8", "ffn-0"]
    assert LayerChoice(0, 3, 4, 8).units(SHAPE) == ["heads-0", "ffn-3", "ffn-q8"]
    cfg = NativeConfig((cs[3], cs[-1]), head_bits=4)
    assert NativeConfig.from_dict(cfg.describe()) == cfg
    for bad in ({"layers": ["x"]}, {"layers": ["drop"], "head_bits": 2}, []):
        with pytest.raises(UserError):
            NativeConfig.from_dict(bad)  # type: ignore[arg-type]
    for layers, match in ((["h3@4,f9", "drop"], "at most 3 heads and 4 FFN blocks"), (["h3@6,f4", "drop"], "at 4 or 8"),
                          (["drop", "drop"], "every layer dropped"), (["drop"], "2 \\(the model's\\)")):  # fmt: skip
        with pytest.raises(UserError, match=match):
            NativeConfig.from_dict({"layers": layers}).check(SHAPE)


def test_front_is_exact_against_brute_force():
    q, lat = _tables()
    front = pareto_front(q, lat, bin_ms=1e-4)
    pts = []
    for picks in itertools.product(choices(SHAPE), repeat=SHAPE.n_layers):
        if all(c.heads == 0 and c.blocks == 0 for c in picks):
            continue  # not a model
        for hb in (8, 4):
            c = NativeConfig(tuple(picks), hb)
            pts.append((lat.predict(c), q.predict(c)))
    for p in front:  # nothing beats a front point at its latency
        assert min(d for ms, d in pts if ms <= p.latency_ms + 1e-9) == pytest.approx(p.delta_nll, abs=1e-12)
        assert p.latency_ms == pytest.approx(lat.predict(p.config)) and p.delta_nll == pytest.approx(
            q.predict(p.config)
        )
    for budget in np.linspace(0.9, 1.6, 15):  # every budget's optimum is on the front
        best = min((d for ms, d in pts if ms <= budget + 1e-9), default=None)
        got = [p.delta_nll for p in front if p.latency_ms <= budget + 1e-9]
        assert (min(got) if got else None) == (pytest.approx(best, abs=1e-12) if best is not None else None)


def test_sequential_never_beats_joint():
    for seed in range(3):
        q, lat = _tables(seed)
        joint, seq = pareto_front(q, lat, bin_ms=1e-4), sequential_front(q, lat)
        for s in seq:
            assert any(
                j.latency_ms <= s.latency_ms + 1e-9 and j.delta_nll <= s.delta_nll + 1e-12 for j in joint
            )
            assert len({c.attn_bits for c in s.config.layers if c.heads}) <= 1  # one precision model-wide
            assert len({c.ffn_bits for c in s.config.layers if c.blocks}) <= 1


def test_latency_fit_recovers_the_table_from_the_probes():
    shape = Shape(30, 9, 48)
    probes = probe_configs(shape)
    x = np.stack([latency_features(c) for c in probes])
    assert np.linalg.matrix_rank(x) == len(LAT_TERMS)  # every term identifiable
    coef = np.array([COEF[t] for t in LAT_TERMS])
    noise = np.random.default_rng(0).normal(0, 1e-4, len(probes))
    table = NativeLatencyTable.fit(probes, x @ coef + noise)
    for t in LAT_TERMS:
        assert table.coef[t] == pytest.approx(COEF[t], abs=3e-3), t
    assert max(abs(r) for r in table.residual_ms) < 1e-3
    assert table.predict(dense_config(shape)) == pytest.approx(
        float(latency_features(dense_config(shape)) @ coef), abs=0.01
    )


def test_plans_keep_the_most_important_units():
    ranking = Ranking(heads=[[2, 0, 1], [0, 1, 2]], blocks=[[3, 1, 0, 2], [0, 1, 2, 3]])
    cfg = NativeConfig((LayerChoice(2, 2, 8, 4), LayerChoice(0, 3)))
    p0, p1 = cfg.plans(ranking)
    assert p0.heads == (0, 1) and p0.ffn_blocks == (0, 2) and p0.attn_bits == 8
    assert p1.heads == () and p1.ffn_blocks == (1, 2, 3)


@pytest.fixture(scope="module")
def variants(tiny_dir):  # type: ignore[no-untyped-def]
    from cscompile.search.native_search import NativeVariants

    d = tiny_dir("llama-hd32-3l")
    ids = np.random.default_rng(2).integers(3, 300, 160)
    return d, NativeVariants(d / "hf", ids, threads=1, window=80)


def test_ranking_follows_the_contribution(variants):
    from cscompile.search.native_search import NativeVariants

    d, tv = variants
    assert sorted(tv.ranking.heads[0]) == [0, 1, 2, 3] and sorted(tv.ranking.blocks[2]) == [0, 1, 2, 3]
    # a head whose output is scaled ×20 becomes layer 1's most important, a block ×20 layer 0's
    o = tv.layers[1].self_attn.o_proj.weight.data
    w = tv.layers[0].mlp.down_proj.weight.data
    o_saved, w_saved = o.clone(), w.clone()
    weakest_head, weakest_block = tv.ranking.heads[1][0], tv.ranking.blocks[0][0]
    o[:, weakest_head * 32 : (weakest_head + 1) * 32] *= 20
    w[:, weakest_block * 32 : (weakest_block + 1) * 32] *= 20
    try:
        r = NativeVariants._rank(tv)
        assert r.heads[1][-1] == weakest_head and r.blocks[0][-1] == weakest_block
    finally:
        o.copy_(o_saved)
        w.copy_(w_saved)


def test_proxy_units_are_what_the_native_engine_computes(variants):
    """A config applied in PyTorch (the proxy) and derived for the native engine: the two agree far
    more closely than either agrees with the dense model (the same heads and blocks removed)."""
    import torch

    from cscompile.native import engine as native
    from cscompile.native.points import derive_config

    d, tv = variants
    base = native.weights_from_model(d / "model.onnx", bits=8)  # no GGUF: Q8_0
    # 8-bit units: the proxy rounds to Q8_0 too (the "attn-q8"/"ffn-q8" units), so only the
    # removed heads and blocks differ from the dense model — if both sides removed the same ones
    cfg = NativeConfig((LayerChoice(2, 2, 8, 8), LayerChoice(4, 4, 8, 8), LayerChoice(1, 0, 8, 8)))
    ids = tv.chunks[0]
    undo = [tv.apply(i, u) for i, c in enumerate(cfg.layers) for u in c.units(tv.shape)]
    try:
        with torch.no_grad():
            proxy = torch.log_softmax(
                tv.model(torch.from_numpy(ids[None].astype(np.int64))).logits[0].float(), -1
            )
    finally:
        for f in reversed(undo):
            f()
    eng = native.NativeDecoder(derive_config(base, cfg, tv.ranking), threads=1, max_ctx=128).logits_all(ids)
    eng = torch.log_softmax(torch.from_numpy(eng), -1)
    dense = tv._ref[0]
    kl = lambda p, q: float((p.exp() * (p - q)).sum(-1).mean())  # noqa: E731
    assert kl(proxy, eng) < 0.01 * kl(dense, proxy), (kl(proxy, eng), kl(dense, proxy))
    assert tv.evaluate(cfg) > 0 and tv.kl() == pytest.approx(0.0, abs=1e-7)  # applied whole, then undone
