"""Two-dimensional early exit: the labelled sentiment set, layer-range engines."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cscompile.errors import UserError
from cscompile.evaluation.sentiment import LABELS, make_review, sentiment_set


@pytest.mark.parametrize("classes", [2, 3])
def test_sentiment_sets_are_balanced_distinct_and_disjoint(classes):
    tr, te = sentiment_set(300, classes, "train"), sentiment_set(100, classes, "test")
    assert tr == sentiment_set(300, classes, "train")  # deterministic
    texts = [r.text for r in tr]
    assert len(set(texts)) == len(texts) and not set(texts) & {r.text for r in te}
    counts = Counter(r.label for r in tr)
    assert set(counts) == set(LABELS[classes]) and min(counts.values()) > 0.25 * len(tr)
    lengths = Counter(len(r.sentences) for r in tr)
    assert lengths[1] > 0 and max(lengths) >= 6  # short and long reviews
    assert all(r.text == " ".join(r.sentences) for r in tr)
    with pytest.raises(ValueError):
        make_review(0, classes=5)


@pytest.fixture(scope="module")
def fused(tiny_dir, tmp_path_factory):
    import json

    from cscompile.passes.pipeline import analyze
    from cscompile.passes.precision import precision_plan, quantize_model

    d = tiny_dir("llama-4l")
    out = tmp_path_factory.mktemp("exits")
    quantize_model(d / "model.onnx", out, precision_plan("fp32"), "auto")
    _, um = analyze(d / "model.onnx")
    layers = json.loads(json.dumps(um.to_dict()))["layers"]
    return out / "model.onnx", layers


def _run(sess, ids, hidden):
    feed = {"attention_mask": np.ones_like(ids)}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feed[i.name] = ids
        elif i.name == "hidden_in":
            feed[i.name] = hidden
        elif i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((1, 2, 0, 16), np.float32)
    return sess.run(None, feed)


def test_chained_layer_ranges_equal_the_whole_engine(fused, tmp_path):
    import onnx_ir as ir
    import onnxruntime as ort

    from cscompile.exits.ranges import cut_range

    engine, layers = fused
    cuts = [0, 1, 3, 4]
    for a, b in zip(cuts, cuts[1:]):
        cut_range(engine, layers, a, b, tmp_path / f"r{a}.onnx")
    ids = np.random.default_rng(0).integers(5, 300, (1, 20))
    h = None
    for a, b in zip(cuts, cuts[1:]):
        sess = ort.InferenceSession(str(tmp_path / f"r{a}.onnx"))
        names = [i.name for i in sess.get_inputs()]
        assert ("input_ids" in names) == (a == 0) and ("hidden_in" in names) == (a > 0)
        assert sorted(o.name for o in sess.get_outputs())[1:] == sorted(
            f"present.{i}.{kv}" for i in range(a, b) for kv in ("key", "value")
        )
        h = _run(sess, ids, h)[0]
    model = ir.load(str(engine))
    values = {v.name: v for n in model.graph for v in n.outputs}
    model.graph.outputs.append(values[layers[3]["residual_out"]])
    ir.save(model, str(tmp_path / "full.onnx"))
    full = ort.InferenceSession(str(tmp_path / "full.onnx"))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in full.get_inputs():
        if i.name == "position_ids":
            feed[i.name] = np.arange(20)[None]
        elif i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((1, 2, 0, 16), np.float32)
    want = full.run([layers[3]["residual_out"]], feed)[0]
    np.testing.assert_array_equal(h, want)
    with pytest.raises(UserError, match="layer range"):
        cut_range(engine, layers, 2, 2, tmp_path / "bad.onnx")


def test_shipped_jsonl_files_match_the_generator():
    import json
    from importlib import resources

    data = resources.files("cscompile.data")
    for classes, tag in ((2, "binary"), (3, "3class")):
        for split, n in (("train", 600), ("test", 300)):
            rows = [
                json.loads(x)
                for x in data.joinpath(f"sentiment-{tag}-{split}.jsonl").read_text().splitlines()
            ]
            want = sentiment_set(n, classes, split)
            assert rows == [{"text": r.text, "label": r.label} for r in want]


def test_adapter_fits_separable_data_and_round_trips():
    from cscompile.exits.adapters import Adapter, pool_features

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    a = Adapter.fit(x, y, 2)
    assert (a.proba(x).argmax(1) == y).mean() > 0.95
    b = Adapter.from_arrays(a.arrays("e0"), "e0")
    np.testing.assert_array_equal(b.proba(x), a.proba(x))
    with pytest.raises(UserError, match="labels"):
        Adapter.fit(x, np.full(200, 3), 2)
    with pytest.raises(UserError, match="missing"):
        Adapter.from_arrays({}, "e0")
    h = rng.normal(size=(5, 8)) * 100
    assert np.allclose(pool_features(h), (h / np.sqrt((h**2).mean(1, keepdims=True) + 1e-6)).mean(0))


def test_incremental_2d_run_matches_the_trace_simulation(fused, tmp_path):
    from cscompile.exits.adapters import Adapter
    from cscompile.exits.model import ExitStack, simulate
    from cscompile.exits.ranges import cut_range

    engine, layers = fused
    cuts = [0, 1, 2, 4]
    paths = []
    for a, b in zip(cuts, cuts[1:]):
        cut_range(engine, layers, a, b, tmp_path / f"r{a}.onnx")
        paths.append(tmp_path / f"r{a}.onnx")
    rng = np.random.default_rng(1)
    adapters = [
        Adapter(np.zeros(64), np.ones(64), rng.normal(size=(64, 3)) * 0.5, np.zeros(3)) for _ in paths
    ]
    stack = ExitStack(paths, cuts, adapters, threads=1)
    for trial in range(4):
        sents = [rng.integers(5, 300, int(n)).tolist() for n in rng.integers(2, 9, 4)]
        probs, toks = stack.trace(sents)
        assert probs.shape == (4, 3, 3) and toks == [len(s) for s in sents]
        # after the last sentence, depth k's features are the whole text's (catch-up is exact)
        whole = stack.features([sum(sents, [])])[0]
        np.testing.assert_allclose(stack.features(sents)[-1], whole, rtol=1e-4, atol=1e-5)
        for tau, sigma in [(None, None), (0.5, None), (None, 0.5), (0.45, 0.6), (0.9, 0.9)]:
            real = stack.classify(sents, tau, sigma)
            sim = simulate(probs, toks, cuts, tau, sigma)
            assert (real.label, real.depth, real.sentences, real.layer_tokens) == (
                sim.label,
                sim.depth,
                sim.sentences,
                sim.layer_tokens,
            ), (trial, tau, sigma)
    full = simulate(probs, toks, cuts, None, None)
    assert full.layer_tokens == sum(toks) * 4 and full.sentences == 4 and full.depth == 2


def test_adapter_weights_equal_duplicated_rows():
    """Integer weights fit the same adapter as repeating the rows; zero weights drop them."""
    from cscompile.exits.adapters import Adapter

    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 8))
    y = (x[:, 0] + 0.3 * rng.normal(size=60) > 0).astype(int)
    w = rng.integers(0, 4, 60).astype(float)
    a = Adapter.fit(x, y, 2, weights=w)
    rep = np.repeat(np.arange(60), w.astype(int))
    b = Adapter.fit(x[rep], y[rep], 2)
    for k in ("mean", "scale", "weight", "bias"):
        np.testing.assert_allclose(getattr(a, k), getattr(b, k), rtol=1e-9, atol=1e-12)
    assert not np.allclose(Adapter.fit(x, y, 2).weight, a.weight)
    with pytest.raises(UserError, match="adapter weights"):
        Adapter.fit(x, y, 2, weights=np.zeros(60))
