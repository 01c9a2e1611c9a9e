"""The TensorRT target on CPU: the plugin's references, the lowering, and everything up to the builder."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from cscompile.errors import UserError
from cscompile.motifs.engine import LayeredEngine, Motif, StepStats, fit_predictors
from cscompile.motifs.kernel import ffn_reference, pack_channel_major
from cscompile.motifs.segments import plan_segments
from cscompile.passes.pipeline import analyze
from cscompile.trt import lower as lower_mod
from cscompile.trt import plugin_ffn as trt_ffn
from cscompile.trt.lower import check_trt_ops, lower_family


def _plugin_model() -> onnx.ModelProto:
    names = [("x", 3), ("scores", 3), ("indices", 3), ("count", 1)]
    types = {"x": TensorProto.FLOAT, "scores": TensorProto.FLOAT, "indices": TensorProto.INT32}
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.INT32), [None] * r) for n, r in names]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 3),
        helper.make_tensor_value_info("residual", TensorProto.FLOAT, [None] * 2),
    ]
    node = trt_ffn.make_node([n for n, _ in names] + ["gate", "up", "down"], ["y", "residual"], block=0)
    graph = helper.make_graph([node], "plugin", inputs, outputs)
    graph.input.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, None]) for n in ("gate", "up", "down")
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(trt_ffn.DOMAIN, 1)]
    )


@pytest.mark.parametrize("block", [1, 4])
def test_onnx_reference_matches_numpy_reference(block):
    rng = np.random.default_rng(block)
    b, s, h, inter, k = 2, 3, 8, 32, 5
    x = rng.standard_normal((b, s, h)).astype(np.float32)
    gate, up = (rng.standard_normal((h, inter)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((inter, h)).astype(np.float32)
    scores = rng.standard_normal((b, s, inter)).astype(np.float32)
    nb = inter // block
    idx = np.stack([rng.permutation(nb)[:k] for _ in range(b * s)]).reshape(b, s, k).astype(np.int32)
    model = _plugin_model()
    for a in model.graph.node[0].attribute:
        if a.name == "block":
            a.i = block
    model = trt_ffn.with_reference(model)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    seen = set()
    for count in (0, 1, 3, k, k + 4):
        y, r = sess.run(None, dict(x=x, scores=scores, indices=idx, count=np.array([count], np.int32),
                                   gate=gate, up=up, down=down))  # fmt: skip
        ry, rr = trt_ffn.reference(x, scores, idx, count, gate, up, down, block)
        np.testing.assert_allclose(y, ry, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(r, rr, atol=2e-6, rtol=1e-5)
        seen.add(float(np.abs(y).sum()))
    assert len(seen) >= 4  # the count really changes what runs (count ≥ K all run the K blocks)
    assert not np.any(trt_ffn.reference(x, scores, idx, 0, gate, up, down, block)[0])


def test_reference_with_every_block_is_the_dense_ffn():
    rng = np.random.default_rng(3)
    h, inter, block = 8, 32, 4
    gate, up = (rng.standard_normal((h, inter)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((inter, h)).astype(np.float32)
    x = rng.standard_normal((1, 2, h)).astype(np.float32)
    idx = np.stack([rng.permutation(inter // block) for _ in range(2)])[None].astype(np.int32)
    y, _ = trt_ffn.reference(x, np.zeros((1, 2, inter), np.float32), idx, inter, gate, up, down, block)
    w = pack_channel_major(gate.T, up.T, down.T)
    for t in range(2):
        np.testing.assert_allclose(y[0, t], ffn_reference(w, x[0, t]), atol=1e-4)


def _feeds(sess, ids, counts):
    ins = {i.name: i for i in sess.get_inputs()}
    f = {"input_ids": ids, "attention_mask": np.ones_like(ids), lower_mod.COUNTS_INPUT: counts}
    if "position_ids" in ins:
        f["position_ids"] = np.arange(ids.shape[1])[None]
    for name, i in ins.items():
        if name.startswith("past"):
            f[name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    return f


def _family(path, m=16):
    model, um = analyze(path / "model.onnx")
    eng = LayeredEngine(plan_segments(model, um), 2)
    rng = np.random.default_rng(0)
    preds = fit_predictors(eng, rng.integers(3, 300, 400), m=m, window=200)
    return eng, um, preds


@pytest.mark.parametrize("name", ["llama-2l", "qwen2-2l", "llama-untied-2l", "llama-mha-2l"])
def test_lowered_graph_matches_the_ort_motif(tiny_dir, name):
    """The graph TensorRT would parse, run by ORT with the reference for the plugin, gives the
    CPU motif engine's logits (evaluation mode: every position runs what a decode step would).
    """
    path = tiny_dir(name)
    eng, um, preds = _family(path)
    inter, n = um.intermediate_size, um.num_layers
    preds[0].hot = 6
    motifs = [
        Motif("dense", [None] * n),
        Motif("half", [inter // 2] * n, preds),
        Motif("mixed", [inter // 4] + [None] * (n - 1), preds),
    ]
    model, um2 = analyze(path / "model.onnx")
    low = lower_family(model, um2, motifs, block=1)
    assert low.topk == [inter // 2, inter] and low.counts["mixed"] == [inter // 4, inter]
    assert "dense" not in low.counts
    sess = ort.InferenceSession(
        trt_ffn.with_reference(low.model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    ids = np.random.default_rng(1).integers(3, 300, 12)[None]
    eng.sparse_prefill = True
    dense = eng.forward(ids, eng.new_state())
    for motif in motifs[1:]:
        got = sess.run(None, _feeds(sess, ids, low.counts_array(motif.name)))
        want = eng.forward(ids, eng.new_state(), motif)
        np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=0)
        assert np.abs(got[0] - dense).max() > 1e-3  # fewer channels really ran
    with pytest.raises(KeyError, match="no sparse motif 'dense'"):
        low.counts_array("dense")


def test_lowered_residual_is_the_kernels_residual(tiny_dir):
    path = tiny_dir("llama-2l")
    eng, um, preds = _family(path)
    inter, n = um.intermediate_size, um.num_layers
    motif = Motif("half", [inter // 2] * n, preds)
    model, um2 = analyze(path / "model.onnx")
    low = lower_family(model, um2, [motif], block=1)
    sess = ort.InferenceSession(
        trt_ffn.with_reference(low.model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    for token in (5, 99):
        ids = np.array([[token]])
        outs = sess.run(None, _feeds(sess, ids, low.counts_array("half")))
        out = dict(zip([o.name for o in sess.get_outputs()], outs))
        step = StepStats()
        eng.forward(ids, eng.new_state(), motif, step)  # one token: the decode kernel, its residuals
        got = [float(out[f"{lower_mod.RESIDUAL_PREFIX}{li}"][0, -1]) for li in range(n)]
        np.testing.assert_allclose(got, step.residuals, rtol=1e-3, atol=1e-5)
        assert all(r > 0 for r in got)


def test_block_lowering_keeps_stock_layers_and_counts_blocks(tiny_dir):
    path = tiny_dir("llama-2l")
    eng, um, preds = _family(path)
    inter = um.intermediate_size
    motifs = [Motif("a", [40, None], preds), Motif("b", [20, None], preds)]
    model, um2 = analyze(path / "model.onnx")
    low = lower_family(model, um2, motifs, block=16)
    assert low.topk == [3, 0] and low.counts == {"a": [3, inter // 16], "b": [2, inter // 16]}
    plugins = [nd for nd in low.model.graph.node if nd.op_type == trt_ffn.PLUGIN_NAME]
    assert [nd.name for nd in plugins] == ["cs_sparse_ffn.0"]  # layer 1 keeps its stock FFN
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in plugins[0].attribute}
    assert attrs == {"block": 16, "plugin_namespace": b"cscompile", "plugin_version": b"1"}
    topk = next(nd for nd in low.model.graph.node if nd.op_type == "TopK")
    assert {a.name: a.i for a in topk.attribute}["sorted"] == 1
    sess = ort.InferenceSession(
        trt_ffn.with_reference(low.model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    ids = np.array([[5, 17, 33, 2]])
    dense = eng.forward(ids, eng.new_state())
    full = sess.run(None, _feeds(sess, ids, np.array([inter // 16, inter // 16], np.int32)))[0]
    sparse = sess.run(None, _feeds(sess, ids, low.counts_array("b")))[0]
    assert np.abs(full - dense).max() > 1e-3  # K=3 blocks of 6 run, not the dense FFN
    assert np.abs(sparse - full).max() > 1e-4  # count 2 of the 3 sorted blocks


def test_lowering_refusals(tiny_dir, monkeypatch):
    path = tiny_dir("llama-2l")
    eng, um, preds = _family(path)
    inter, n = um.intermediate_size, um.num_layers
    with pytest.raises(UserError, match="no sparse motif"):
        lower_family(*analyze(path / "model.onnx"), [Motif("dense", [None] * n)])
    with pytest.raises(UserError, match="block 7. Expected a divisor of the FFN width 96"):
        lower_family(*analyze(path / "model.onnx"), [Motif("h", [inter // 2] * n, preds)], block=7)
    monkeypatch.setattr(lower_mod, "TOPK_MAX", 8)
    with pytest.raises(UserError, match="needs TopK K=48. Expected K ≤ 8"):
        lower_family(*analyze(path / "model.onnx"), [Motif("h", [inter // 2] * n, preds)], block=1)


def test_check_trt_ops_refuses_contrib_and_unknown_ops():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    for node, match in (
        (helper.make_node("MatMulNBits", ["x"], ["y"], domain="com.microsoft", name="q"), "com.microsoft"),
        (helper.make_node("Det", ["x"], ["y"], name="d"), "node d uses Det"),
        (helper.make_node("TopK", ["x", "k"], ["y", "i"], sorted=0, name="t"), "sorted=0"),
    ):
        model = helper.make_model(helper.make_graph([node], "g", [x], [x]))
        with pytest.raises(UserError, match=match):
            check_trt_ops(model)


@pytest.mark.parametrize("block", [1, 4])
def test_plugin_kernel_matches_the_reference(block):
    """The torch function the TensorRT plugin runs (here on the CPU) against the numpy reference."""
    torch = pytest.importorskip("torch")
    from cscompile.trt.plugin_qdp import sparse_ffn_torch

    rng = np.random.default_rng(7)
    b, s, h, inter, k = 1, 4, 16, 64, 6
    x = rng.standard_normal((b, s, h)).astype(np.float32)
    gate, up = (rng.standard_normal((h, inter)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((inter, h)).astype(np.float32)
    scores = np.abs(rng.standard_normal((b, s, inter))).astype(np.float32)
    idx = np.stack([rng.permutation(inter // block)[:k] for _ in range(s)])[None].astype(np.int32)
    for count in (0, 2, k):
        y, r = sparse_ffn_torch(*(torch.from_numpy(a) for a in (x, scores, idx, np.array([count], np.int32),
                                                                 gate, up, down)), block=block)  # fmt: skip
        ry, rr = trt_ffn.reference(x, scores, idx, count, gate, up, down, block)
        np.testing.assert_allclose(y.numpy(), ry, atol=3e-5, rtol=1e-5)
        np.testing.assert_allclose(r.numpy(), rr, atol=1e-6, rtol=1e-5)


def test_polygraphy_compares_the_lowered_graph_with_the_motif_engine(tiny_dir):
    """The comparison the build runs on each TensorRT engine, with ORT standing in for TensorRT."""
    pytest.importorskip("polygraphy")
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from cscompile.trt.compare import compare, decoder_feeds, motif_runner
    from cscompile.trt.spec import past_inputs, profiles_for

    path = tiny_dir("llama-2l")
    eng, um, preds = _family(path)
    inter, n = um.intermediate_size, um.num_layers
    motifs = {"half": Motif("half", [inter // 2] * n, preds), "q": Motif("q", [inter // 4] * n, preds)}
    model, um2 = analyze(path / "model.onnx")
    low = lower_family(model, um2, list(motifs.values()), block=1)
    past = past_inputs(um)
    (decode,) = profiles_for(low.model, "sparse", 16, 64, past)
    feeds = [
        decoder_feeds(decode.shapes, 5, 0, 300, seed=i, counts=low.counts_array(m))
        for i, m in enumerate(motifs)
    ]
    ort_runner = OnnxrtRunner(
        SessionFromOnnx(trt_ffn.with_reference(low.model).SerializeToString()), name="ort"
    )
    types = {k: (v.dtype, v.ndim) for k, v in feeds[0].items()}
    ok = compare(ort_runner, motif_runner(eng, motifs, low.counts, types), feeds, 1e-4, 1e-4, ["logits"])
    assert ok.passed and ok.outputs[0].max_abs < 1e-4
    assert ok.to_dict()["passed"] is True
    swapped = {"half": motifs["q"], "q": motifs["half"]}  # a candidate that runs the wrong motif
    bad = compare(
        ort_runner, motif_runner(eng, swapped, low.counts, types, name="wrong"), feeds, 1e-4, 1e-4, ["logits"]
    )
    assert not bad.passed and bad.outputs[0].max_abs > 1e-3


def test_prepare_writes_engine_graphs_sharing_one_weight_file(tiny_dir, tmp_path):
    """Everything before the TensorRT builder: graphs, weights, profiles and comparison feeds."""
    from cscompile.decode.session import DecoderSession
    from cscompile.trt.artifact import WEIGHTS_BIN, comparison_feeds, prepare

    path = tiny_dir("llama-2l")
    eng, um, preds = _family(path)
    inter, n = um.intermediate_size, um.num_layers
    motifs = [
        Motif("dense", [None] * n),
        Motif("half", [inter // 2] * n, preds),
        Motif("q", [inter // 4] * n, preds),
    ]
    plan = prepare(path / "model.onnx", motifs, block=16, precision="fp16", max_prompt=32, context=64)
    assert sorted(plan.files) == ["dense.onnx", "sparse.onnx", WEIGHTS_BIN]
    assert plan.meta["counts"] == {"half": [3, 3], "q": [2, 2]} and plan.meta["topk"] == [3, 3]
    for name, data in plan.files.items():
        (tmp_path / name).write_bytes(data)
    dense = onnx.load(str(tmp_path / "dense.onnx"), load_external_data=False)
    sparse = onnx.load(str(tmp_path / "sparse.onnx"), load_external_data=False)
    check_trt_ops(dense)
    check_trt_ops(sparse)
    external = {
        t.name: {e.key: e.value for e in t.external_data}
        for g in (dense, sparse)
        for t in g.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    assert {e["location"] for e in external.values()} == {WEIGHTS_BIN}
    shared = [t.name for t in dense.graph.initializer if t.name in external]
    assert shared and all(t.name in external for t in sparse.graph.initializer if t.name in shared)
    total = sum(int(e["length"]) for e in external.values())
    assert total <= len(plan.files[WEIGHTS_BIN]) < total + 64 * len(external)  # each weight once
    ids = np.array([[5, 17, 33, 2, 99, 100, 7]])
    ref = DecoderSession(path / "model.onnx", threads=1)
    got = ort.InferenceSession(str(tmp_path / "dense.onnx"), providers=["CPUExecutionProvider"])
    feeds = _feeds(got, ids, np.zeros(0, np.int32))
    del feeds[lower_mod.COUNTS_INPUT]
    np.testing.assert_allclose(got.run(["logits"], feeds)[0], ref.forward(ids, ref.new_state()), atol=1e-5)
    (tmp_path / "sparse.ref.onnx").write_bytes(trt_ffn.with_reference(sparse).SerializeToString())
    sess = ort.InferenceSession(str(tmp_path / "sparse.ref.onnx"), providers=["CPUExecutionProvider"])
    fresh = lower_family(*analyze(path / "model.onnx"), motifs, block=16)  # weights inside
    mem = ort.InferenceSession(
        trt_ffn.with_reference(fresh.model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    counts = np.array(plan.meta["counts"]["q"], np.int32)
    np.testing.assert_allclose(sess.run(["logits"], _feeds(sess, ids, counts))[0],
                               mem.run(["logits"], _feeds(mem, ids, counts))[0], atol=1e-6)  # fmt: skip
    # profiles: the dense engine prefills and decodes, the sparse one decodes; feeds fit them
    by_name = {s.name: s for s in plan.specs}
    assert [p.name for p in by_name["dense"].profiles] == ["prefill", "decode"]
    assert [p.name for p in by_name["sparse"].profiles] == ["decode"]
    pre = by_name["dense"].profiles[0].shapes
    assert pre["input_ids"] == ([1, 1], [1, 32], [1, 32]) and pre["attention_mask"][2] == [1, 64]
    assert by_name["sparse"].profiles[0].shapes[lower_mod.COUNTS_INPUT] == ([2], [2], [2])
    for spec in plan.specs:
        feeds_ = comparison_feeds(spec, plan.meta)
        assert len(feeds_) == (2 if spec.name == "dense" else 2)  # two profiles / two sparse motifs
        for profile, feed in feeds_:
            for name, (lo, _opt, hi) in spec.profiles[profile].shapes.items():
                assert all(a <= d <= b for a, d, b in zip(lo, feed[name].shape, hi)), (spec.name, name)
    assert plan.meta["vocab"] == 320


def test_profiles_refuse_an_unexplained_dynamic_input():
    from cscompile.trt.spec import profiles_for

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    odd = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", "c", 3])
    model = helper.make_model(helper.make_graph([], "g", [x, odd], [x]))
    with pytest.raises(UserError, match=r"input pixel_values has a dynamic dimension 0 \(b\)"):
        profiles_for(model, "dense", 8, 16, set())
    with pytest.raises(UserError, match="--max-prompt"):
        profiles_for(model, "dense", 32, 16, set())


def test_engines_for_another_gpu_or_tensorrt_are_refused_with_the_rebuild_command():
    from cscompile.trt.engine import check_target
    from cscompile.trt.spec import TargetRecord

    built = TargetRecord("10.9.0", "NVIDIA L4", "8.9", "fp16")
    check_target(built, TargetRecord("10.9.0", "NVIDIA L4", "8.9", "fp16"), "cscompile build m --target trt")
    for here, what in ((TargetRecord("10.13.1", "NVIDIA L4", "8.9", "fp16"), "TensorRT 10.9.0"),
                       (TargetRecord("10.9.0", "NVIDIA A100", "8.0", "fp16"), "GPU compute capability 8.9")):  # fmt: skip
        with pytest.raises(UserError) as exc:
            check_target(built, here, "cscompile build smollm2 --target trt -o out.csb")
        msg = str(exc.value)
        assert what in msg and "cscompile build smollm2 --target trt -o out.csb" in msg and "\n" not in msg


# -- the TensorRT runner, with ONNX Runtime standing in for TensorRT -----------------------------


def _view(ptr: int, shape, dtype) -> np.ndarray:
    import ctypes

    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if n == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).reshape(shape)


class _FakeContext:
    """An execution context over ORT that reads and writes the bound addresses like TensorRT, and
    checks every shape against the active optimization profile.
    """

    def __init__(self, eng):
        self.eng, self.shapes, self.addr, self.profile = eng, {}, {}, None

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
        return True

    def get_tensor_shape(self, name):
        assert name == "logits"
        return (1, self.shapes["input_ids"][1], self.eng.vocab)

    def execute_async_v3(self, stream):
        prof = self.eng.spec.profiles[self.profile].shapes
        assert set(self.shapes) == set(prof), "every input needs a shape"
        for name, shape in self.shapes.items():
            lo, _opt, hi = prof[name]
            assert all(a <= d <= b for a, d, b in zip(lo, shape, hi)), (self.eng.spec.name, name, shape)
        feeds = {n: _view(self.addr[n], s, self.eng.dtypes[n]).copy() for n, s in self.shapes.items()}
        for name, val in zip(self.eng.outputs, self.eng.sess.run(self.eng.outputs, feeds)):
            assert name in self.addr, f"output {name} has no address"
            _view(self.addr[name], val.shape, val.dtype)[...] = val
        self.eng.calls.append(self.eng.spec.profiles[self.profile].name)
        return True


class _FakeEngine:
    def __init__(self, path, spec, vocab):
        self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        types = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}
        self.dtypes = {i.name: types[i.type] for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.names = list(self.dtypes) + self.outputs
        self.num_io_tensors = len(self.names)
        self.spec, self.vocab, self.calls = spec, vocab, []
        self._shapes = {
            i.name: [d if isinstance(d, int) else -1 for d in i.shape] for i in self.sess.get_inputs()
        }

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_shape(self, name):
        return self._shapes[name]

    def create_execution_context(self):
        return _FakeContext(self)


def test_runner_drives_engines_like_the_cpu_runtime(tiny_dir, tmp_path):
    """The runner's buffers, profiles, cache ping-pong and motif counts, with the engines replaced
    by ORT sessions on the very graphs TensorRT would build (device = host memory).
    """
    pytest.importorskip("torch")
    from cscompile.decode.session import DecoderSession
    from cscompile.motifs.runtime import ControllerConfig, SwitchingSession
    from cscompile.trt.artifact import prepare
    from cscompile.trt.runner import TrtEngine

    path = tiny_dir("llama-2l")
    eng, um, preds = _family(path)
    inter, n = um.intermediate_size, um.num_layers
    motifs = [Motif("dense", [None] * n), Motif("half", [inter // 2] * n, preds)]
    plan = prepare(path / "model.onnx", motifs, block=1, precision="fp32", max_prompt=16, context=32)
    for name, data in plan.files.items():
        (tmp_path / name).write_bytes(data)
    sparse_graph = onnx.load(str(tmp_path / "sparse.onnx"), load_external_data=False)
    (tmp_path / "sparse.ref.onnx").write_bytes(trt_ffn.with_reference(sparse_graph).SerializeToString())
    specs = {s.name: s for s in plan.specs}
    vocab = plan.meta["vocab"]
    dense_e = _FakeEngine(tmp_path / "dense.onnx", specs["dense"], vocab)
    sparse_e = _FakeEngine(tmp_path / "sparse.ref.onnx", specs["sparse"], vocab)
    meta = plan.meta
    runner = TrtEngine(dense_e, sparse_e, meta["counts"], 1, meta["topk"], inter, n,
                       [tuple(p) for p in meta["past"]], [tuple(p) for p in meta["present"]], 32, device="cpu")  # fmt: skip
    ids = np.array([[5, 17, 33, 2, 99, 100, 7]])
    ref = DecoderSession(path / "model.onnx", threads=1)
    st, sr = runner.new_state(), ref.new_state()
    a, b = runner.forward(ids, st), ref.forward(ids, sr)
    np.testing.assert_allclose(a, b, atol=1e-4)
    for _ in range(5):  # decode through the swapped buffers
        nxt = np.array([[int(b[0, -1].argmax())]])
        a, b = runner.forward(nxt, st), ref.forward(nxt, sr)
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert dense_e.calls == ["prefill"] + ["decode"] * 5 and st.length == 12
    # a sparse motif decodes on the sparse engine exactly as the CPU motif engine does
    half = motifs[1]
    st, se = runner.new_state(), eng.new_state()
    runner.forward(ids, st)
    eng.forward(ids, se)
    for t in (3, 41, 8):
        mine, cpu = StepStats(), StepStats()
        a = runner.forward(np.array([[t]]), st, half, mine)
        b = eng.forward(np.array([[t]]), se, half, cpu)
        np.testing.assert_allclose(a, b, atol=1e-4)
        np.testing.assert_allclose(mine.residuals, cpu.residuals, rtol=1e-3, atol=1e-5)
        assert mine.executed == [inter // 2] * n
    assert sparse_e.calls == ["decode"] * 3
    # and the switching controller runs on it unchanged
    sw = SwitchingSession(runner, motifs, ControllerConfig([0.0]))
    state = sw.new_state()
    sw.forward(ids, state)
    for t in (3, 41, 8, 9):
        sw.forward(np.array([[t]]), state)
    assert state.stats.steps == 4 and sum(state.stats.histogram.values()) == 4
    with pytest.raises(ValueError, match="exceed the engines' context of 32"):
        runner.forward(np.zeros((1, 30), np.int64), state)


def test_inspect_checks_the_tensorrt_lowering_without_a_gpu(tiny_dir, capsys):
    """CI machines have no GPU: `inspect --target trt` runs the lowering a GPU build would do."""
    import json

    from cscompile.cli.main import main

    path = str(tiny_dir("llama-2l"))
    capsys.readouterr()
    assert main(["inspect", path, "-b", "16", "--target", "trt", "--json"]) == 0
    trt = json.loads(capsys.readouterr().out)["tensorrt"]
    assert trt["sparse_plugin_nodes"] == 2 and trt["topk_max"] == 3 and trt["block"] == 16
    assert trt["profiles"] == {"dense": ["prefill", "decode"], "sparse": ["decode"]}
    assert not any(op.startswith("com.microsoft") for op in trt["dense_ops"]) and "MatMul" in trt["dense_ops"]


def test_a_trt_record_of_another_format_is_refused(tmp_path):
    import json

    from cscompile.trt.load import TRT_JSON, read_record

    (tmp_path / "trt").mkdir()
    (tmp_path / TRT_JSON).write_text(json.dumps({"format_version": 99, "target": {}}))
    with pytest.raises(UserError, match=r"TensorRT part \| format 99\. Expected format 1"):
        read_record(tmp_path)
