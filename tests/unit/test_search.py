"""Joint depth × precision search: exact fronts, the latency fit, the proxy, assembled engines."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cscompile.errors import UserError
from cscompile.search.joint import (
    LAT_TERMS,
    OPTIONS,
    UNITS,
    Config,
    LatencyTable,
    QualityTable,
    at_budget,
    latency_features,
    pareto_front,
    probe_configs,
    sequential_front,
)

COEF = {
    "base": 1.0,
    "attn-exact": 0.09,
    "attn-rtn": 0.06,
    "ffn-exact": 0.14,
    "ffn-rtn": 0.1,
    "head-int4-rtn": -0.4,
}


def _tables(n, seed=0):
    rng = np.random.default_rng(seed)
    delta = {u: rng.uniform(0, 0.05 if "rtn" in u else 0.4, n).tolist() for u in UNITS}
    return QualityTable(2.0, delta, 0.07), LatencyTable(dict(COEF), [])


def _brute(q, lat, n, options=OPTIONS, heads=("q8", "int4-rtn")):
    pts = []
    for picks in itertools.product(options, repeat=n):
        if all(o.depth == "drop" for o in picks):
            continue  # not a model
        for h in heads:
            c = Config(tuple(picks), h)
            pts.append((lat.predict(c), q.predict(c)))
    return pts


def test_front_is_exact_against_brute_force():
    q, lat = _tables(3)
    front = pareto_front(q, lat, 3)
    pts = _brute(q, lat, 3)
    for p in front:  # nothing beats a front point at its latency
        assert min(d for ms, d in pts if ms <= p.latency_ms + 1e-9) == pytest.approx(p.delta_nll, abs=1e-12)
    for budget in np.linspace(1.0, 1.8, 17):  # and every budget's optimum is on the front
        best = min((d for ms, d in pts if ms <= budget + 1e-9), default=None)
        p = at_budget(front, budget)
        assert (p is None) == (best is None)
        if p is not None:
            assert p.delta_nll == pytest.approx(best, abs=1e-12)


def test_front_never_drops_every_layer():
    # Dropping is free in quality and saves latency: an unconstrained DP would drop everything.
    q, lat = _tables(3)
    q = QualityTable(q.base_nll, {u: [0.0] * 3 for u in UNITS}, 0.0)
    front = pareto_front(q, lat, 3)
    assert front and all(any(o.depth != "drop" for o in p.config.layers) for p in front)
    fastest = min(front, key=lambda p: p.latency_ms)
    assert sum(o.depth != "drop" for o in fastest.config.layers) == 1
    assert all(any(o.depth != "drop" for o in p.config.layers) for p in sequential_front(q, lat, 3))
    with pytest.raises(UserError, match="every layer dropped"):
        Config.from_dict({"layers": ["drop"] * 3})


def test_joint_never_loses_to_sequential_and_sequential_is_uniform():
    q, lat = _tables(6, seed=3)
    joint, seq = pareto_front(q, lat, 6), sequential_front(q, lat, 6)
    for p in seq:
        kept = [(o.attn, o.ffn) for o in p.config.layers if o.depth == "keep"]
        attn = {o.attn for o in p.config.layers if o.attn}
        ffn = {o.ffn for o in p.config.layers if o.ffn}
        assert len(attn) <= 1 and len(ffn) <= 1, kept
        j = at_budget(joint, p.latency_ms + 1e-9)
        assert j is not None and j.delta_nll <= p.delta_nll + 1e-12


def test_latency_fit_recovers_the_table():
    probes = probe_configs(30)
    coef = np.array([COEF[t] for t in LAT_TERMS])
    measured = [float(latency_features(c) @ coef) for c in probes]
    fit = LatencyTable.fit(probes, measured)
    for t in LAT_TERMS:
        assert fit.coef[t] == pytest.approx(COEF[t], abs=1e-9)
    assert max(map(abs, fit.residual_ms)) < 1e-9


def test_config_round_trip_and_plan():
    c = Config((OPTIONS[1], OPTIONS[6], OPTIONS[4], OPTIONS[0]), "int4-rtn")
    assert Config.from_dict(c.describe()) == c
    drop, drop_ffn, plan, source = c.plan()
    assert drop == [1] and drop_ffn == [2] and source == [0, 2, 3]
    assert plan.of(0, "ffn") == "int4-rtn" and plan.of(1, "attn") == "int4" and plan.lm_head == "int4-rtn"


def test_proxy_drop_equals_removing_the_layer(tiny_dir):
    import torch

    from cscompile.models.reference import TorchReference
    from cscompile.search.joint import measure_quality

    d = tiny_dir("llama-4l")
    ids = np.random.default_rng(0).integers(3, 300, 200)
    q = measure_quality(d / "hf", ids, threads=1, window=100)
    ref = TorchReference.from_dir(d / "hf", threads=1)
    chunks = [ids[None, :100], ids[None, 100:]]
    dense = [torch.log_softmax(torch.from_numpy(ref.logits(c)[0]), -1) for c in chunks]
    layers = ref.model.model.layers
    for i in range(4):
        kept = [m for j, m in enumerate(layers) if j != i]
        for j, m in enumerate(kept):
            m.self_attn.layer_idx = j
        ref.model.model.layers = torch.nn.ModuleList(kept)
        ref.model.config.num_hidden_layers = 3
        kl = 0.0
        for c, lp in zip(chunks, dense):
            lq = torch.log_softmax(torch.from_numpy(ref.logits(c)[0]), -1)
            kl += float((lp.exp() * (lp - lq)).sum())
        assert q.delta["drop"][i] == pytest.approx(kl / 200, rel=1e-4, abs=1e-6)
        for j, m in enumerate(layers):
            m.self_attn.layer_idx = j
        ref.model.model.layers = layers
        ref.model.config.num_hidden_layers = 4
    assert all(v >= 0 for u in UNITS for v in q.delta[u]) and q.head_int4 >= 0


def test_assembled_engine_runs_with_fewer_layers(tiny_dir, tmp_path):
    from cscompile.runtime import GenerationConfig, load_text_model
    from cscompile.search.joint import assemble

    c = Config((OPTIONS[0], OPTIONS[6], OPTIONS[4], OPTIONS[3]), "q8")
    report = assemble(tiny_dir("llama-4l"), c, tmp_path / "m", gguf=None)
    tm = load_text_model(tmp_path / "m", threads=1)
    assert tm.session.spec.num_layers == 3
    # q, k, v, o of 3 kept layers + gate, up, down of the 2 kept FFNs (no GGUF here: all re-rounded); the head
    assert report["projections"] == {"int4-rtn": 3 * 4 + 2 * 3, "int8-rtn": 1}
    assert len(tm.generate("hello", GenerationConfig(max_new_tokens=6, stop_at_eos=False)).token_ids) == 6


def test_evaluate_a_whole_config_and_undo(tiny_dir):
    from cscompile.search.joint import TorchVariants

    d = tiny_dir("llama-4l")
    ids = np.random.default_rng(1).integers(3, 300, 160)
    tv = TorchVariants(d / "hf", ids, threads=1, window=80)
    assert tv.kl() == pytest.approx(0.0, abs=1e-7)  # nothing applied: the dense model
    one = Config((OPTIONS[6], OPTIONS[0], OPTIONS[0], OPTIONS[0]))
    two = Config((OPTIONS[6], OPTIONS[4], OPTIONS[0], OPTIONS[3]), "int4-rtn")
    k1, k2 = tv.evaluate(one), tv.evaluate(two)
    assert k1 > 0 and k2 > 0 and k1 != k2
    assert tv.kl() == pytest.approx(0.0, abs=1e-7)  # everything undone
    assert tv.evaluate(one) == pytest.approx(k1, rel=1e-6)  # repeatable
