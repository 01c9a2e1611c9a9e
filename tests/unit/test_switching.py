"""The switching runtime: controller rules, and generation through TextModel on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from cscompile.decode.generate import GenerationConfig, TextModel
from cscompile.decode.session import DecoderSession
from cscompile.decode.tokenizer import Tokenizer
from cscompile.motifs.engine import LayeredEngine, Motif, fit_predictors
from cscompile.motifs.runtime import ControllerConfig, SwitchingSession, calibrate_controller, entropy
from cscompile.motifs.segments import plan_segments
from cscompile.passes.pipeline import analyze


@pytest.fixture(scope="module")
def setup(tiny_dir):
    path = tiny_dir("llama-2l")
    model, um = analyze(path / "model.onnx")
    eng = LayeredEngine(plan_segments(model, um), 2)
    calib = np.random.default_rng(0).integers(3, 300, 400)
    preds = fit_predictors(eng, calib, m=16, window=200)
    inter = eng.intermediate
    motifs = [
        Motif("dense", [None] * eng.num_layers),
        Motif("d75", [round(0.75 * inter)] * eng.num_layers, preds),
        Motif("d50", [inter // 2] * eng.num_layers, preds),
    ]
    return path, eng, motifs, calib


def _generate(session, path, n=12):
    tm = TextModel(session, Tokenizer(path / "tokenizer"))
    return tm.generate("hello world", GenerationConfig(max_new_tokens=n))


def test_always_dense_controller_reproduces_the_dense_graph(setup):
    path, eng, motifs, _ = setup
    sw = SwitchingSession(eng, motifs, ControllerConfig([-np.inf, -np.inf]))
    dense = DecoderSession(path / "model.onnx", threads=1)
    assert _generate(sw, path).token_ids == _generate(dense, path).token_ids


def test_confident_steps_run_the_sparsest_motif(setup):
    path, eng, motifs, _ = setup
    sw = SwitchingSession(eng, motifs, ControllerConfig([np.inf, np.inf], hold=0))
    st = sw.new_state()
    sw.forward(np.array([[5, 6, 7]]), st)
    for t in range(6):
        sw.forward(np.array([[10 + t]]), st)
    s = st.stats.summary()
    assert s["motif_histogram"] == {"d50": 6}
    assert s["executed_fraction"] == pytest.approx(0.5, abs=0.01)
    assert s["decode_steps"] == 6


def test_fallback_and_hysteresis(setup):
    _, eng, motifs, _ = setup
    sw = SwitchingSession(eng, motifs, ControllerConfig([1.0, 2.0], residual_threshold=0.5, hold=2))
    st = sw.new_state()
    st.last_entropy, st.last_residual = 0.1, 0.0
    assert sw.choose(st) == 2  # confident → sparsest
    st.last_residual = 0.9  # poor recovery → one denser
    assert sw.choose(st) == 1 and st.stats.fallbacks == 1
    st.last_residual, st.last_entropy = 0.0, 0.1
    assert sw.choose(st) == 1  # held
    assert sw.choose(st) == 1  # held
    assert sw.choose(st) == 2  # hold over
    st.last_entropy = 5.0
    assert sw.choose(st) == 0  # uncertain → dense at once


def test_calibrated_thresholds_are_ordered_quantiles(setup):
    _, eng, motifs, calib = setup
    cfg = calibrate_controller(eng, motifs, calib, steps=40)
    assert len(cfg.entropy_thresholds) == 2
    assert cfg.entropy_thresholds[0] <= cfg.entropy_thresholds[1]
    assert np.isfinite(cfg.residual_threshold) and cfg.residual_threshold > 0
    assert ControllerConfig.from_dict(cfg.to_dict()) == cfg


def test_entropy():
    assert entropy(np.zeros(8)) == pytest.approx(np.log(8))
    assert entropy(np.array([100.0, 0, 0])) == pytest.approx(0, abs=1e-6)
    rng = np.random.default_rng(0)
    for scale in (0.1, 3.0, 30.0):  # against a float64 reference on a 49k vocabulary
        logits = (rng.standard_normal(49152) * scale).astype(np.float32)
        z = logits.astype(np.float64) - logits.max()
        p = np.exp(z) / np.exp(z).sum()
        ref = float(-(p * np.log(np.maximum(p, 1e-300))).sum())
        assert entropy(logits) == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_threshold_count_is_checked(setup):
    _, eng, motifs, _ = setup
    with pytest.raises(ValueError, match="thresholds"):
        SwitchingSession(eng, motifs, ControllerConfig([1.0]))


def test_bank_selector_drives_the_decode_motifs(setup):
    from cscompile.motifs.build import fit_banks, prompt_features
    from cscompile.recovery.banks import BankSelector

    _, eng, motifs, _ = setup
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 300, 60) for _ in range(6)]
    centroids, bank_preds = fit_banks(eng, prompts, 2, m=16)
    inter = eng.intermediate
    bank_motifs = [[motifs[0], Motif("d50", [inter // 2] * eng.num_layers, bp)] for bp in bank_preds]
    sel = BankSelector(centroids)
    sw = SwitchingSession(eng, [motifs[0], motifs[2]], ControllerConfig([np.inf], hold=0), bank_motifs, sel)
    feats = prompt_features(eng, prompts)
    for p, f in zip(prompts[:3], feats[:3]):
        st = sw.new_state()
        sw.forward(p[None], st)
        assert st.bank == sel.choose(f)
        sw.forward(np.array([[7]]), st)
        assert st.stats.histogram == {"d50": 1}
    with pytest.raises(ValueError, match="together"):
        SwitchingSession(eng, motifs, ControllerConfig([1.0, 2.0]), bank_motifs=bank_motifs)
