"""The layered motif engine (ORT segments + channel-sparse FFN kernel) against the dense graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from cscompile.decode.session import DecoderSession
from cscompile.errors import UserError
from cscompile.motifs.engine import LayeredEngine, Motif, StepStats, fit_predictors
from cscompile.motifs.segments import plan_segments
from cscompile.passes.pipeline import analyze


def _engine(path, threads=2):
    model, um = analyze(path / "model.onnx")
    return LayeredEngine(plan_segments(model, um), threads), um


@pytest.mark.parametrize("name", ["llama-2l", "llama-untied-2l", "qwen2-2l", "llama-q-2l", "llama-mha-2l"])
def test_full_density_matches_dense_graph(tiny_dir, name):
    path = tiny_dir(name)
    eng, _ = _engine(path)
    dense = DecoderSession(path / "model.onnx", threads=1)
    ids = np.array([[5, 17, 33, 2, 99, 100, 7]])
    st, sd = eng.new_state(), dense.new_state()
    a, b = eng.forward(ids, st), dense.forward(ids, sd)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    for _ in range(6):
        nxt = np.array([[int(b[0, -1].argmax())]])
        a, b = eng.forward(nxt, st), dense.forward(nxt, sd)
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert st.length == sd.length == 13


def test_segments_hold_no_weight_data(tiny_dir):
    path = tiny_dir("llama-2l")
    model, um = analyze(path / "model.onnx")
    plan = plan_segments(model, um)
    hollow = 0
    for seg in plan.segments:  # hollow initializers: the data lives once, in the shared store
        for t in onnx.load_from_string(seg.model).graph.initializer:
            if np.prod(t.dims) > 64:
                assert not t.raw_data and t.data_location == onnx.TensorProto.EXTERNAL, t.name
                assert t.name in plan.store and t.name in seg.weights
                hollow += 1
    assert hollow >= 2 * um.num_layers
    assert len(plan.segments) == um.num_layers + 1
    for f in plan.ffn:  # FFN weights are in the kernel's layout only, not in any segment
        assert f.gate.shape == (um.intermediate_size, um.hidden_size)


def test_sensed_decode_equals_masked_prefill(tiny_dir):
    """The kernel's decode path runs exactly the support the numpy evaluation mode masks."""
    path = tiny_dir("llama-2l")
    eng, um = _engine(path)
    rng = np.random.default_rng(0)
    calib = rng.integers(3, 300, 400)
    preds = fit_predictors(eng, calib, m=16, window=200)
    inter = um.intermediate_size
    motif = Motif("half", [inter // 2] * um.num_layers, preds)
    ids = rng.integers(3, 300, 12)[None]
    eng.sparse_prefill = True
    masked = eng.forward(ids, eng.new_state(), motif)
    eng.sparse_prefill = False
    st = eng.new_state()
    eng.forward(ids[:, :1], st, motif)  # one token: the decode kernel path
    rows = [eng.forward(ids[:, t : t + 1], st, motif)[0, -1] for t in range(1, ids.shape[1])]
    np.testing.assert_allclose(np.stack(rows), masked[0, 1:], atol=2e-4, rtol=0)
    dense = eng.forward(ids, eng.new_state())
    assert np.abs(dense - masked).max() > 1e-3  # the motif really ran fewer channels


def test_sparse_layer_without_predictor_is_an_error(tiny_dir):
    eng, um = _engine(tiny_dir("llama-2l"))
    motif = Motif("bad", [4] * um.num_layers, None)
    with pytest.raises(ValueError, match="no predictor"):
        eng.forward(np.array([[3]]), eng.new_state(), motif)


def test_gelu_models_are_refused_with_a_clear_error(tiny_dir):
    model, um = analyze(tiny_dir("gpt2-2l") / "model.onnx")
    with pytest.raises(UserError, match="SwiGLU"):
        plan_segments(model, um)


def test_fast_decode_path_equals_the_general_path(tiny_dir):
    eng, um = _engine(tiny_dir("llama-2l"))
    rng = np.random.default_rng(1)
    preds = fit_predictors(eng, rng.integers(3, 300, 400), m=16, window=200)
    motif = Motif("half", [um.intermediate_size // 2] * um.num_layers, preds)
    ids = rng.integers(3, 300, 10)
    runs = []
    for fast in (True, False):
        eng.fast_decode = fast
        st = eng.new_state()
        eng.forward(ids[None, :3], st)
        runs.append(np.stack([eng.forward(ids[None, t : t + 1], st, motif)[0, -1] for t in range(3, 10)]))
    eng.fast_decode = True
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-5, rtol=0)


def _dropped_session(path, layers, tmp_path):
    from helpers import save

    from cscompile.passes.depth import DropLayersPass

    model, _ = analyze(path / "model.onnx")
    DropLayersPass(layers=layers)(model)
    return DecoderSession(save(model, tmp_path / "dropped.onnx"), threads=1)


@pytest.mark.parametrize("fast", [True, False])
def test_skipping_layers_equals_the_graph_without_them(tiny_dir, tmp_path, fast):
    """A motif that skips layers 1 and 2 gives the logits of the graph with those layers dropped,
    for the prompt and for decode steps (its caches: the other layers' ones).
    """
    path = tiny_dir("llama-4l")
    eng, um = _engine(path)
    eng.fast_decode = fast
    n = um.num_layers
    skip = Motif("skip12", [None] * n, skip=frozenset({1, 2}))
    dropped = _dropped_session(path, [1, 2], tmp_path)
    ids = np.array([[5, 17, 33, 2, 99, 100, 7]])
    st, sd = eng.new_state(), dropped.new_state()
    np.testing.assert_allclose(eng.forward(ids, st, skip), dropped.forward(ids, sd), atol=1e-4, rtol=0)
    for t in (3, 41, 8):
        a = eng.forward(np.array([[t]]), st, skip)
        b = dropped.forward(np.array([[t]]), sd)
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert st.length == 10 and all(p.numpy().shape[2] == 10 for p in st.past)  # skipped layers' caches too


def test_a_skipped_layer_still_fills_its_cache(tiny_dir):
    """The K/V a skipped layer writes are the ones the full layer would write for the same input,
    so switching back to a motif that runs the layer attends to a complete cache.
    """
    path = tiny_dir("llama-4l")
    eng, um = _engine(path)
    n = um.num_layers
    ids = np.array([[5, 17, 33, 2, 99]])
    a, b = eng.new_state(), eng.new_state()
    eng.forward(ids, a)
    eng.forward(ids, b)
    eng.forward(np.array([[7]]), a)  # dense step
    stats = StepStats()
    eng.forward(np.array([[7]]), b, Motif("skip2", [None] * n, skip=frozenset({2})), stats)
    for j in (4, 5):  # layer 2's key and value: same input (layers 0-1 ran alike), same K/V
        np.testing.assert_allclose(a.past[j].numpy(), b.past[j].numpy(), atol=1e-6)
    assert (
        np.abs(a.past[6].numpy()[:, :, -1] - b.past[6].numpy()[:, :, -1]).max() > 1e-4
    )  # layer 3 saw another input
    assert stats.executed[2] == 0 and len(stats.executed) == n
    # back to dense: the next step reads complete caches (every layer holds all 7 positions)
    eng.forward(np.array([[9]]), b)
    assert b.length == 7 and all(p.numpy().shape[2] == 7 for p in b.past)
    with pytest.raises(ValueError, match="layers 1..3 can be skipped"):
        eng.forward(np.array([[9]]), a, Motif("bad", [None] * n, skip=frozenset({0})))
