"""Graph passes on the tiny models: structure (op types, unit tags, `modified`) and numbers (ORT before vs after)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from helpers import run_logits, save, scramble_names, unit_map_signature

from cscompile.errors import CscompileError, UserError
from cscompile.models.tiny import TINY_MODELS
from cscompile.passes import (
    META_KEY,
    AlignPass,
    CanonicalizePass,
    DiscoverUnitsPass,
    DiscoveryError,
    InstrumentPass,
    PermuteFFNPass,
    UnitMap,
    admissible_block_sizes,
    check_block_size,
)
from cscompile.passes.pipeline import analyze, load_model, run_passes

IDS = np.array([[3, 17, 42, 99, 250, 7, 8, 100, 31]], np.int64)
EXPECTED = {
    # name: (layers, heads, kv heads, head_dim, ffn, rope, fused qkv, norm, mlp kind, tied)
    "llama-1l": (1, 4, 2, 12, 96, True, False, "rms", "swiglu", True),
    "llama-2l": (2, 6, 2, 8, 96, True, False, "rms", "swiglu", True),
    "llama-mha-2l": (2, 4, 4, 12, 96, True, False, "rms", "swiglu", True),
    "llama-untied-2l": (2, 4, 1, 12, 96, True, False, "rms", "swiglu", False),
    "qwen2-2l": (2, 4, 2, 12, 96, True, False, "rms", "swiglu", True),
    "llama-q-2l": (2, 4, 2, 16, 128, True, False, "rms", "swiglu", True),
    "llama-4l": (4, 4, 2, 16, 128, True, False, "rms", "swiglu", True),
    "llama-hd32-3l": (3, 4, 2, 32, 128, True, False, "rms", "swiglu", True),
    "gpt2-2l": (2, 4, 4, 12, 192, False, True, "layer", "gelu", True),
}


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_discovery_structure(tiny_dir, name):
    _, um = analyze(tiny_dir(name) / "model.onnx", block_size=4)
    layers, heads, kv, d, ffn, rope, fused, norm, mlp, tied = EXPECTED[name]
    assert um.num_layers == layers and um.lm_head_tied == tied
    for layer in um.layers:
        a = layer.attention
        assert (a.num_heads, a.num_kv_heads, a.head_dim, a.rope, a.fused_qkv) == (heads, kv, d, rope, fused)
        assert layer.mlp.intermediate_size == ffn and layer.mlp.kind == mlp
        assert layer.input_norm.kind == norm == layer.post_attention_norm.kind
        assert (
            a.past_key == f"past_key_values.{layer.index}.key"
            and a.present_value == f"present.{layer.index}.value"
        )
    counts = {k: sum(1 for u in um.units if u.kind == k) for k in ("head_group", "ffn_block", "layer")}
    assert counts == {"head_group": layers * kv, "ffn_block": layers * ffn // 4, "layer": layers}
    if name == "qwen2-2l":
        assert all(
            layer.attention.q.bias and layer.attention.k.bias and layer.attention.v.bias
            for layer in um.layers
        )
        assert not um.layers[0].attention.o.bias
    if name == "gpt2-2l":
        q, k, v = (getattr(um.layers[0].attention, r).out_slice for r in "qkv")
        assert (q, k, v) == ((0, 48), (48, 96), (96, 144))
        assert um.position_embedding is not None


def test_unit_params_add_up(tiny_dir):
    _, um = analyze(tiny_dir("llama-2l") / "model.onnx", block_size=8)
    for layer in um.layers:
        total = next(u for u in um.units if u.layer == layer.index and u.kind == "layer").params
        parts = sum(u.params for u in um.units if u.layer == layer.index and u.kind != "layer")
        assert parts == total
    unit = um.units_of(0, "ffn_block")[1]
    assert [(s.axis, s.start, s.stop) for s in unit.slices] == [(1, 8, 16), (1, 8, 16), (0, 8, 16)]


def test_discover_is_analysis_only(tiny_dir):
    model = load_model(tiny_dir("llama-2l") / "model.onnx")
    CanonicalizePass()(model)
    before = [(n.op_type, n.name) for n in model.graph]
    result = DiscoverUnitsPass()(model)
    assert result.modified is False
    assert [(n.op_type, n.name) for n in model.graph] == before
    assert isinstance(model.meta[META_KEY], UnitMap)


@pytest.mark.parametrize("name", ["llama-2l", "gpt2-2l", "qwen2-2l"])
def test_canonicalize_preserves_numbers(tiny_dir, tmp_path, name):
    src = tiny_dir(name) / "model.onnx"
    model = load_model(src)
    result = CanonicalizePass()(model)
    assert result.modified is True
    out = save(model, tmp_path / "canon.onnx")
    np.testing.assert_allclose(run_logits(out, IDS), run_logits(src, IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-2l", "gpt2-2l"])
def test_scrambled_names_give_the_same_unit_map(tiny_dir, tmp_path, name):
    src = tiny_dir(name) / "model.onnx"
    scrambled = scramble_names(src, tmp_path / "scrambled.onnx", seed=3)
    assert not any("proj" in n.name or "layers" in n.name for n in ir.load(str(scrambled)).graph)
    _, a = analyze(src, block_size=4)
    _, b = analyze(scrambled, block_size=4)
    assert unit_map_signature(a) == unit_map_signature(b)


def test_unit_map_json_round_trip(tiny_dir):
    for name in ("llama-2l", "gpt2-2l"):
        _, um = analyze(tiny_dir(name) / "model.onnx", block_size=2)
        again = UnitMap.from_json(um.to_json())
        assert again == um
    with pytest.raises(UserError, match="version"):
        UnitMap.from_dict({**json.loads(um.to_json()), "version": 99})
    with pytest.raises(UserError, match="malformed"):
        UnitMap.from_json("{not json")


def test_alignment_sizes_and_refusals(tiny_dir):
    _, um = analyze(tiny_dir("llama-2l") / "model.onnx")
    assert admissible_block_sizes(um, "cpu") == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96]
    assert admissible_block_sizes(um, "trt") == [16, 32, 48, 96]
    with pytest.raises(UserError, match="5 does not divide the 96 FFN channels of layer 0"):
        check_block_size(um, 5)
    with pytest.raises(UserError, match="outside target 'trt'"):
        check_block_size(um, 8, "trt")
    with pytest.raises(UserError, match="target"):
        check_block_size(um, 8, "tpu")
    model = load_model(tiny_dir("llama-2l") / "model.onnx")
    run_passes(model, [("canonicalize", CanonicalizePass()), ("discover", DiscoverUnitsPass())])
    assert AlignPass(12)(model).modified is False
    assert model.meta[META_KEY].block_size == 12 and len(model.meta[META_KEY].units_of(1, "ffn_block")) == 8


@pytest.mark.parametrize("name", ["llama-2l", "qwen2-2l", "gpt2-2l"])
def test_permutation_preserves_function(tiny_dir, tmp_path, name):
    src = tiny_dir(name) / "model.onnx"
    model, um = analyze(src)
    rng = np.random.default_rng(0)
    width = um.intermediate_size
    orders = {i: rng.permutation(width) for i in range(um.num_layers)}
    up_name = um.layers[0].mlp.up.weight
    up_before = model.graph.initializers[up_name].const_value.numpy().copy()
    assert PermuteFFNPass(orders)(model).modified is True
    up_after = model.graph.initializers[up_name].const_value.numpy()
    np.testing.assert_array_equal(up_after, up_before[:, orders[0]])
    assert not np.array_equal(up_after, up_before)
    out = save(model, tmp_path / "perm.onnx")
    np.testing.assert_allclose(run_logits(out, IDS), run_logits(src, IDS), rtol=1e-5, atol=1e-5)


def test_permutation_rejects_non_permutations(tiny_dir):
    model, um = analyze(tiny_dir("llama-2l") / "model.onnx")
    with pytest.raises(UserError, match="not a permutation"):
        PermuteFFNPass({0: np.zeros(um.intermediate_size, np.int64)})(model)
    with pytest.raises(UserError, match="layer 7"):
        PermuteFFNPass({7: np.arange(um.intermediate_size)})(model)


def _torch_activations(hf_model, ids, name):
    """FFN intermediate (input of down) and attention context (input of O) per layer, from PyTorch."""
    import torch

    acts, ctxs, feats = {}, {}, {}
    hooks = []
    blocks = hf_model.transformer.h if name.startswith("gpt2") else hf_model.model.layers
    for i, blk in enumerate(blocks):
        down = blk.mlp.c_proj if name.startswith("gpt2") else blk.mlp.down_proj
        o = blk.attn.c_proj if name.startswith("gpt2") else blk.self_attn.o_proj
        norm = blk.ln_1 if name.startswith("gpt2") else blk.input_layernorm
        hooks.append(
            down.register_forward_pre_hook(lambda m, a, i=i: acts.__setitem__(i, a[0].detach().numpy()))
        )
        hooks.append(
            o.register_forward_pre_hook(lambda m, a, i=i: ctxs.__setitem__(i, a[0].detach().numpy()))
        )
        hooks.append(
            norm.register_forward_hook(lambda m, a, out, i=i: feats.__setitem__(i, out.detach().numpy()))
        )
    with torch.no_grad():
        hf_model(torch.from_numpy(ids))
    for h in hooks:
        h.remove()
    return acts, ctxs, feats


@pytest.mark.parametrize("name,block", [("llama-2l", 1), ("llama-2l", 8), ("gpt2-2l", 4)])
def test_instrumentation_matches_a_pytorch_reference(tiny_dir, tmp_path, name, block):
    from cscompile.models.reference import TorchReference

    src = tiny_dir(name) / "model.onnx"
    model, um = analyze(src, block_size=block)
    n_out = len(model.graph.outputs)
    assert InstrumentPass()(model).modified is True
    assert len(model.graph.outputs) == n_out + 4 * um.num_layers
    out = save(model, tmp_path / "inst.onnx")

    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed = {
        "input_ids": IDS,
        "attention_mask": np.ones_like(IDS),
        "position_ids": np.arange(IDS.shape[1])[None],
    }
    for layer in um.layers:
        a = layer.attention
        for key in (a.past_key, a.past_value):
            feed[key] = np.zeros((1, a.num_kv_heads, 0, a.head_dim), np.float32)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, feed)))
    np.testing.assert_allclose(got["logits"], run_logits(src, IDS), rtol=1e-5, atol=1e-5)

    ref = TorchReference.from_dir(tiny_dir(name) / "hf", threads=1)
    acts, ctxs, feats = _torch_activations(ref.model, IDS, name)
    for layer in um.layers:
        i, a, m = layer.index, layer.attention, layer.mlp
        tag = f"cs.L{i}"
        np.testing.assert_allclose(got[f"{tag}.feature"], feats[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[f"{tag}.ffn.act"], acts[i], rtol=1e-4, atol=1e-5)
        w_down = model.graph.initializers[m.down.weight].const_value.numpy()  # [I, H]
        nb = m.intermediate_size // block
        contrib = np.einsum(
            "bsnc,nch->bsnh", acts[i].reshape(1, -1, nb, block), w_down.reshape(nb, block, -1)
        )
        np.testing.assert_allclose(
            got[f"{tag}.ffn.block_activity"], np.linalg.norm(contrib, axis=-1), rtol=1e-4, atol=1e-5
        )
        w_o = model.graph.initializers[a.o.weight].const_value.numpy()  # [NH*D, H]
        gw = a.group_size * a.head_dim
        gc = np.einsum(
            "bsgc,gch->bsgh", ctxs[i].reshape(1, -1, a.num_kv_heads, gw), w_o.reshape(a.num_kv_heads, gw, -1)
        )
        np.testing.assert_allclose(
            got[f"{tag}.attn.group_activity"], np.linalg.norm(gc, axis=-1), rtol=1e-4, atol=1e-5
        )


# -- malformed and unsupported graphs: an error naming the layer / node and the rule ----------


def test_unsupported_op_is_named(tiny_dir, tmp_path):
    model = load_model(tiny_dir("llama-1l") / "model.onnx")
    node = next(n for n in model.graph if n.op_type == "Softmax")
    node.name = "the_softmax"
    node.domain = "com.example"
    path = save(model, tmp_path / "custom.onnx")
    with pytest.raises(
        DiscoveryError, match="node 'the_softmax' .* op com.example::Softmax is outside the supported set"
    ):
        analyze(path)


def test_missing_mlp_is_reported(tiny_dir, tmp_path):
    model = load_model(tiny_dir("llama-1l") / "model.onnx")
    _, um = analyze(tiny_dir("llama-1l") / "model.onnx")
    values = {v.name: v for n in model.graph for v in n.outputs}
    down_out = next(n for n in model.graph if n.name == um.layers[0].mlp.down.node).outputs[0]
    # bypass the MLP: the residual add now adds the attention output twice
    add = next(n for n, _ in down_out.uses())
    attn_resid = values[um.layers[0].residual_in]
    add.replace_input_with(list(add.inputs).index(down_out), attn_resid)
    path = save(model, tmp_path / "no_mlp.onnx")
    with pytest.raises(DiscoveryError, match="layer 0 \\| no MLP projections"):
        analyze(path)


def test_graph_without_attention_or_inputs(tmp_path):
    from onnx import TensorProto, helper, save_model

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])],
    )
    path = tmp_path / "m.onnx"
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(DiscoveryError, match="input_ids does not index an embedding table"):
        analyze(path)


def test_corrupt_file_and_failing_pass_names(tmp_path, tiny_dir):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="could not be parsed"):
        load_model(bad)
    model = load_model(tiny_dir("llama-1l") / "model.onnx")
    with pytest.raises(CscompileError, match="pass instrument failed after \\[canonicalize\\]"):
        run_passes(model, [("canonicalize", CanonicalizePass()), ("instrument", InstrumentPass())])


@pytest.mark.slow  # transformers' exporter: 10 s of CPU
def test_second_exporter_gives_the_same_unit_map(tiny_dir, tmp_path):
    """transformers' own OnnxExporter: other op patterns, other I/O names, external data."""
    from cscompile.models.export import export_with_transformers
    from cscompile.models.tiny import build_hf_model

    path = export_with_transformers(build_hf_model("llama-2l"), tmp_path / "tx")
    assert (tmp_path / "tx" / "model.onnx.data").exists()
    _, ours = analyze(tiny_dir("llama-2l") / "model.onnx", block_size=4)
    _, theirs = analyze(path, block_size=4)
    assert unit_map_signature(theirs) == unit_map_signature(ours)
    # and the runtime reads it: same logits as our export (same seed, same weights)
    np.testing.assert_allclose(
        run_logits(path, IDS), run_logits(tiny_dir("llama-2l") / "model.onnx", IDS), atol=1e-4
    )


def test_inspect_golden(tiny_dir, capsys):
    from pathlib import Path

    from cscompile.cli.main import main

    assert main(["inspect", str(tiny_dir("llama-2l")), "-b", "4"]) == 0
    got = capsys.readouterr().out
    golden = Path(__file__).parent.parent / "golden" / "inspect_llama-2l_b4.txt"
    assert got == golden.read_text(), f"inspect output changed; if intended, update {golden}:\n{got}"
    assert main(["inspect", str(tiny_dir("llama-2l")), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["admissible_block_sizes"]["trt"] == [16, 32, 48, 96]
    assert UnitMap.from_dict(data["unit_map"]).num_layers == 2
    assert main(["inspect", str(tiny_dir("llama-2l")), "-b", "5"]) == 2
    assert "5 does not divide" in capsys.readouterr().err


def test_inconsistent_shapes_are_reported(tiny_dir, tmp_path):
    src = tiny_dir("llama-1l") / "model.onnx"
    _, um = analyze(src)
    model = load_model(src)
    w = model.graph.initializers[um.layers[0].attention.q.weight]
    w.const_value = ir.tensor(np.zeros((48, 50), np.float32), name=w.name)
    w.shape = ir.Shape([48, 50])
    path = save(model, tmp_path / "bad_shape.onnx")
    with pytest.raises(DiscoveryError, match="layer 0 \\| Q 50 / K 24 columns with head_dim 12"):
        analyze(path)


def test_symbolic_head_dim_without_reshape_hint(tiny_dir, tmp_path):
    """No static cache shape and no constant reshape: the head dim cannot be inferred, and we say so."""
    model = load_model(tiny_dir("llama-1l") / "model.onnx")
    for v in model.graph.inputs:
        if v.name.startswith("past_key_values"):
            v.shape = ir.Shape(["batch", "kv", "past", "dim"])
    path = save(model, tmp_path / "symbolic.onnx")
    from cscompile.passes import discover as disc

    m2 = load_model(path)
    CanonicalizePass()(m2)
    # hide every constant reshape target from discovery (as if the exporter computed them at run time)
    orig = disc.const_array

    def no_reshape_constants(v):
        return None if v is not None and any(n.op_type == "Reshape" for n, _ in v.uses()) else orig(v)

    try:
        disc.const_array = no_reshape_constants
        with pytest.raises(DiscoveryError, match="head dimension cannot be inferred"):
            disc.discover_units(m2)
    finally:
        disc.const_array = orig


def _fused_model(consumers: str, n: int = 24) -> ir.Model:
    """x [1, s, 8] @ W [8, n], its product read by ``consumers``: "slices" (three last-axis Slices
    tiling the columns), "split" (a two-way Split on axis 2), "overlap" (two Slices sharing columns),
    "axis1" (Slices on the sequence axis) or "partial" (Slices that leave columns out)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, n)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="fused")]
    inits = [w]
    bounds = {
        "slices": [(0, 8), (8, 16), (16, n)],
        "overlap": [(0, 16), (8, n)],
        "partial": [(0, 8), (16, n)],
        "axis1": [(0, 1), (1, 4)],
    }
    outs = []
    if consumers == "split":
        nodes.append(helper.make_node("Split", ["y"], ["a", "b"], axis=2, num_outputs=2))
        outs = ["a", "b"]
    else:
        axis = 1 if consumers == "axis1" else -1
        for i, (s, e) in enumerate(bounds[consumers]):
            inits += [
                numpy_helper.from_array(np.array([s], np.int64), f"s{i}"),
                numpy_helper.from_array(np.array([e], np.int64), f"e{i}"),
                numpy_helper.from_array(np.array([axis], np.int64), f"ax{i}"),
            ]
            nodes.append(helper.make_node("Slice", ["y", f"s{i}", f"e{i}", f"ax{i}"], [f"o{i}"]))
            outs.append(f"o{i}")
    # each branch feeds the graph output through a Relu, so the branches are not outputs themselves
    nodes += [helper.make_node("Relu", [o], [f"r_{o}"]) for o in outs]
    graph = helper.make_graph(
        nodes,
        "fused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 8])],
        [helper.make_tensor_value_info(f"r_{o}", TensorProto.FLOAT, None) for o in outs],
        inits,
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _ort(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


@pytest.mark.parametrize("consumers", ["slices", "split"])
def test_a_fused_projection_that_is_only_sliced_becomes_one_matmul_per_range(consumers):
    x = np.random.default_rng(1).normal(size=(1, 5, 8)).astype(np.float32)
    before = _ort(_fused_model(consumers), x)
    model = CanonicalizePass()(_fused_model(consumers)).model
    ops = [n.op_type for n in model.graph]
    assert "Slice" not in ops and "Split" not in ops
    widths = sorted(int(n.inputs[1].shape[1]) for n in model.graph if n.op_type == "MatMul")
    assert widths == ([8, 8, 8] if consumers == "slices" else [12, 12])
    for a, b in zip(before, _ort(model, x), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("consumers", ["overlap", "partial", "axis1"])
def test_a_product_not_tiled_by_last_axis_slices_stays_fused(consumers):
    model = CanonicalizePass()(_fused_model(consumers)).model
    assert [n.op_type for n in model.graph].count("MatMul") == 1
