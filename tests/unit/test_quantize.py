"""Weight quantization: MatMulNBits packing against ORT, RTN accuracy, and the exact GGUF-grid form."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from helpers import run_logits, save

from cscompile.errors import UserError
from cscompile.passes.pipeline import analyze
from cscompile.passes.quantize import PrecisionPlan, QuantizeWeightsPass, dequantize, pack_codes, rtn
from cscompile.quant.gguf import GGUFGrid, gguf_name

IDS = np.array([[3, 17, 42, 99, 250, 7, 8, 100, 31, 5, 6, 77]], np.int64)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, False), (8, True)])
def test_packing_matches_onnxruntime(bits, symmetric):
    """One MatMulNBits node run by ORT (accuracy 0) equals x @ dequantize(codes)ᵀ computed in numpy."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits)
    n, k = 24, 96
    w = rng.normal(size=(n, k)).astype(np.float32)
    q, scale, zp = rtn(w, bits, symmetric)
    inits = [
        numpy_helper.from_array(pack_codes(q, bits), "B"),
        numpy_helper.from_array(scale.reshape(-1), "S"),
    ]
    inputs = ["x", "B", "S"]
    if zp is not None:
        zpk = zp if bits == 8 else (zp[:, 0::2] | (zp[:, 1::2] << 4))
        inits.append(numpy_helper.from_array(zpk.astype(np.uint8).reshape(-1), "Z"))
        inputs.append("Z")
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=32,
        accuracy_level=0,
    )
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(3, k)).astype(np.float32)
    got = sess.run(None, {"x": x})[0]
    want = x @ dequantize(q, scale, zp, bits).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and the quantization itself is close to the weight (RTN error bound: half a step)
    step = scale.repeat(32, axis=1)
    assert np.all(np.abs(dequantize(q, scale, zp, bits) - w) <= 0.5 * step + 1e-6)


# random Gaussian weights are 4-bit's worst case (no outlier structure): ~9% noise per matmul, 15 matmuls
@pytest.mark.parametrize("precision,tol,agree", [("int8", 0.03, 0.9), ("int4", 0.6, 0.0)])
def test_rtn_structure_and_accuracy(tiny_dir, tmp_path, precision, tol, agree):
    src = tiny_dir("llama-q-2l") / "model.onnx"
    model, um = analyze(src)
    qp = QuantizeWeightsPass(PrecisionPlan(precision, precision, "int8"), accuracy_level=0)
    assert qp(model).modified is True
    ops = Counter(n.op_type for n in model.graph)
    # packed: Q/K/V in one kernel, O, gate/up in one kernel, down; plus the head
    assert ops["MatMulNBits"] == 4 * um.num_layers + 1
    assert ops["Split"] == 2 * um.num_layers
    assert (
        qp.report == {f"{precision}-rtn": 7 * um.num_layers, "int8-rtn": 1}
        if precision == "int4"
        else {"int8-rtn": 7 * um.num_layers + 1}
    )
    assert "Gemm" not in ops  # the tied head is quantized; the embedding Gather keeps fp32
    out = save(model, tmp_path / "q.onnx")
    ref, got = run_logits(src, IDS), run_logits(out, IDS)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tol  # relative error of the logits
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= agree


def test_unpacked_form_equals_packed(tiny_dir, tmp_path):
    src = tiny_dir("llama-q-2l") / "model.onnx"
    outs = []
    for pack in (True, False):
        model, um = analyze(src)
        QuantizeWeightsPass(PrecisionPlan("int8", "int4", "int8"), accuracy_level=0, pack=pack)(model)
        assert (
            Counter(n.op_type for n in model.graph)["MatMulNBits"] == (4 if pack else 7) * um.num_layers + 1
        )
        outs.append(run_logits(save(model, tmp_path / f"p{pack}.onnx"), IDS))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_per_layer_overrides_keep_fp32(tiny_dir):
    model, um = analyze(tiny_dir("llama-q-2l") / "model.onnx")
    plan = PrecisionPlan("int4", "int4", "fp32", layers={1: {"attn": "fp32", "ffn": "int8"}})
    qp = QuantizeWeightsPass(plan, accuracy_level=0)
    qp(model)
    assert qp.report == {"int4-rtn": 7, "int8-rtn": 3}
    assert sum(1 for n in model.graph if n.op_type == "Gemm") == 1
    with pytest.raises(UserError, match="'int3' for ffn"):
        QuantizeWeightsPass(PrecisionPlan(ffn="int3"))(analyze(tiny_dir("llama-q-2l") / "model.onnx")[0])


def test_fused_qkv_is_refused(tiny_dir):
    model, _ = analyze(tiny_dir("gpt2-2l") / "model.onnx")
    with pytest.raises(UserError, match="fused QKV"):
        QuantizeWeightsPass(PrecisionPlan())(model)


def _write_gguf(tmp_path, tiny_dir):
    """A GGUF grid for the tiny model: Q4_1 projections, Q8_0 embedding; the fp32 model is set to it."""
    import gguf
    import torch
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    from cscompile.models.export import export_hf_model
    from cscompile.models.tiny import build_hf_model, write_tokenizer

    hf = build_hf_model("llama-q-2l")
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            for role, lin in [("q", layer.self_attn.q_proj), ("k", layer.self_attn.k_proj), ("v", layer.self_attn.v_proj),
                              ("o", layer.self_attn.o_proj), ("gate", layer.mlp.gate_proj), ("up", layer.mlp.up_proj),
                              ("down", layer.mlp.down_proj)]:  # fmt: skip
                w = lin.weight.numpy().astype(np.float32)
                q = quants.quantize(w, T.Q4_1)
                lin.weight.copy_(torch.from_numpy(quants.dequantize(q, T.Q4_1)))
                if role == "q":  # store Q rows in another order, as llama GGUFs do for RoPE
                    q = q[rng.permutation(q.shape[0])]
                writer.add_tensor(gguf_name(i, role), q, raw_dtype=T.Q4_1)
        emb = hf.model.embed_tokens.weight.numpy().astype(np.float32)
        q8 = quants.quantize(emb, T.Q8_0)
        hf.model.embed_tokens.weight.copy_(torch.from_numpy(quants.dequantize(q8, T.Q8_0)))
        writer.add_tensor("token_embd.weight", q8, raw_dtype=T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "model"
    out.mkdir()
    export_hf_model(hf, out / "model.onnx")
    write_tokenizer(out / "tokenizer")
    return out / "model.onnx", tmp_path / "tiny.gguf"


def test_exact_grid_form_is_lossless(tiny_dir, tmp_path):
    src, gguf_path = _write_gguf(tmp_path, tiny_dir)
    grid = GGUFGrid(gguf_path)
    model, um = analyze(src)
    qp = QuantizeWeightsPass(PrecisionPlan("int4", "int4", "int8"), grid, accuracy_level=0)
    qp(model)
    assert qp.report == {"int4-grid": 7 * um.num_layers, "int8-grid": 1}
    ops = Counter(n.op_type for n in model.graph)
    # one block-sum per distinct projection input: attention input, O input, MLP input, down input
    assert ops["ReduceSum"] == 4 * um.num_layers
    out = save(model, tmp_path / "exact.onnx")
    np.testing.assert_allclose(run_logits(out, IDS), run_logits(src, IDS), rtol=1e-4, atol=1e-4)
    # re-rounding the same weights (RTN) is not lossless
    model2, _ = analyze(src)
    QuantizeWeightsPass(PrecisionPlan("int4", "int4", "int8"), accuracy_level=0)(model2)
    rtn_out = save(model2, tmp_path / "rtn.onnx")
    assert np.abs(run_logits(rtn_out, IDS) - run_logits(src, IDS)).max() > 1e-2


def test_grid_of_another_model_is_refused(tiny_dir, tmp_path):
    _, gguf_path = _write_gguf(tmp_path, tiny_dir)
    model, _ = analyze(tiny_dir("llama-q-2l") / "model.onnx")  # random weights, not the grid's
    with pytest.raises(UserError, match="does not match the exported weight"):
        QuantizeWeightsPass(PrecisionPlan(), GGUFGrid(gguf_path))(model)
    with pytest.raises(UserError, match="no file"):
        GGUFGrid(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(UserError, match="could not be read"):
        GGUFGrid(bad)


def test_quantize_command(tiny_dir, tmp_path, capsys):
    from cscompile.cli.main import main
    from cscompile.runtime import GenerationConfig, load_text_model

    out = tmp_path / "q8"
    assert main(["quantize", str(tiny_dir("llama-q-2l")), "-o", str(out), "--attn", "int8", "--ffn", "int8", "--grid", "none",
                 "--layer", "1:ffn=fp32", "--accuracy-level", "0"]) == 0  # fmt: skip
    capsys.readouterr()
    import json

    report = json.loads((out / "quantize.json").read_text())
    assert report["projections"] == {"int8-rtn": 7 + 4 + 1} and report["grid"] is None
    assert report["attention"].startswith("GroupQueryAttention")  # head_dim 16: fused by default
    tm = load_text_model(out, threads=1)
    ref = load_text_model(tiny_dir("llama-q-2l"), threads=1)
    cfg = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    assert len(tm.generate("hello", cfg).token_ids) == 8
    assert tm.context_length == ref.context_length == 256
    # bad input: one line, exit 2, nothing left at the output path
    assert main(["quantize", str(tiny_dir("gpt2-2l")), "-o", str(tmp_path / "g")]) == 2
    assert "fused QKV" in capsys.readouterr().err and not (tmp_path / "g").exists()
    assert (
        main(
            [
                "quantize",
                str(tiny_dir("llama-q-2l")),
                "-o",
                str(tmp_path / "h"),
                "--grid",
                str(tmp_path / "no.gguf"),
            ]
        )
        == 2
    )
    assert "--grid | no file" in capsys.readouterr().err
    assert main(["quantize", str(tiny_dir("llama-q-2l")), "-o", str(tiny_dir("llama-q-2l"))]) == 2
    assert "is the input model's directory" in capsys.readouterr().err


def test_attention_fusion_keeps_numbers(tiny_dir, tmp_path):
    from cscompile.passes.fuse import FuseAttentionPass
    from cscompile.runtime import DecoderSession

    src = tiny_dir("llama-q-2l") / "model.onnx"
    model, um = analyze(src)
    fp = FuseAttentionPass(max_positions=256)
    assert fp(model).modified is True and fp.fused == um.num_layers
    ops = Counter(n.op_type for n in model.graph)
    assert ops["GroupQueryAttention"] == um.num_layers and ops["Softmax"] == 0
    path = save(model, tmp_path / "fused.onnx")
    a, b = DecoderSession(src, threads=1), DecoderSession(path, threads=1)
    assert b.fused_attention and not a.fused_attention
    b.kv_reserve = 4  # the shared KV buffers start small and grow twice below (4 -> 8 -> 16)
    sa, sb = a.new_state(), b.new_state()
    np.testing.assert_allclose(b.forward(IDS[:, :7], sb), a.forward(IDS[:, :7], sa), rtol=1e-4, atol=1e-4)
    assert sb.capacity == 8
    for t in IDS[0, 7:]:  # cached decode steps: RoPE positions and the in-place cache append agree
        np.testing.assert_allclose(
            b.forward(np.array([[t]]), sb), a.forward(np.array([[t]]), sa), rtol=1e-4, atol=1e-4
        )
    assert sb.capacity == 16 and sb.length == IDS.shape[1] and not sa.capacity
    with pytest.raises(UserError, match="attention is fused"):
        b.forward(np.array([[1, 2], [0, 3]]), b.new_state(batch=2), attention_mask=np.array([[1, 1], [0, 1]]))


def test_attention_fusion_with_packed_qkv_is_exact(tiny_dir, tmp_path):
    from cscompile.passes.fuse import FuseAttentionPass

    src = tiny_dir("llama-q-2l") / "model.onnx"
    model, _ = analyze(src)
    FuseAttentionPass(max_positions=256)(model)
    QuantizeWeightsPass(PrecisionPlan("int8", "fp32", "fp32"), accuracy_level=0)(model)
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert all(n.inputs[1] is None and n.inputs[2] is None for n in gqa)  # reads packed QKV
    ref, _ = analyze(src)
    QuantizeWeightsPass(PrecisionPlan("int8", "fp32", "fp32"), accuracy_level=0)(ref)
    np.testing.assert_allclose(
        run_logits(save(model, tmp_path / "f.onnx"), IDS),
        run_logits(save(ref, tmp_path / "r.onnx"), IDS),
        atol=1e-4,
    )


def test_attention_fusion_refusals(tiny_dir):
    from cscompile.passes.fuse import FuseAttentionPass

    with pytest.raises(UserError, match="head_dim 8"):
        FuseAttentionPass()(analyze(tiny_dir("llama-2l") / "model.onnx")[0])
    with pytest.raises(UserError, match="architecture 'gpt2'"):  # refused before its fused QKV
        FuseAttentionPass()(analyze(tiny_dir("gpt2-2l") / "model.onnx")[0])


def test_quantize_command_fusion_flag(tiny_dir, tmp_path, capsys):
    import json

    from cscompile.cli.main import main

    out = tmp_path / "plain"
    assert (
        main(
            [
                "quantize",
                str(tiny_dir("llama-q-2l")),
                "-o",
                str(out),
                "--grid",
                "none",
                "--fuse-attention",
                "off",
            ]
        )
        == 0
    )
    assert json.loads((out / "quantize.json").read_text())["attention"] == "plain"
    assert (
        main(
            ["quantize", str(tiny_dir("llama-q-2l")), "-o", str(tmp_path / "x"), "--fuse-attention", "maybe"]
        )
        == 2
    )
    assert "--fuse-attention" in capsys.readouterr().err


@pytest.mark.parametrize("head", ["int8", "int4-rtn"])
def test_tied_embedding_reads_the_head_codes(tiny_dir, tmp_path, head):
    """Rule 7: GatherBlockQuantized over the head's codes equals a fp32 Gather over their dequantization."""
    import onnx_ir as ir

    model, um = analyze(tiny_dir("llama-q-2l") / "model.onnx")
    table_name = um.embedding
    qp = QuantizeWeightsPass(PrecisionPlan("fp32", "fp32", head), accuracy_level=0)
    qp(model)
    assert qp.embedding.startswith("GatherBlockQuantized") and table_name not in model.graph.initializers
    got = run_logits(save(model, tmp_path / "gbq.onnx"), IDS)
    # the same graph with the quantized gather undone by hand: dequantize the codes in NumPy
    node = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    head = next(
        n for n in model.graph if n.op_type == "MatMulNBits" and n.attributes["N"].value == um.vocab_size
    )
    bits = node.attributes["bits"].value
    # 8-bit: one copy of the codes, the head's own B ([N, K/32, 32], blocks on axis 2)
    assert (node.inputs[0] is head.inputs[1]) == (bits == 8)
    codes = node.inputs[0].const_value.numpy()
    n = codes.shape[0]
    codes, scales = codes.reshape(n, -1), node.inputs[2].const_value.numpy().reshape(n, -1)
    zp = node.inputs[3].const_value.numpy() if len(node.inputs) > 3 and node.inputs[3] is not None else None
    zp = None if zp is None else zp.reshape(n, -1)
    q = codes if bits == 8 else np.stack([codes & 15, codes >> 4], -1).reshape(n, -1)
    table = dequantize(q, scales, zp, bits)
    value = ir.Value(name="plain_table", const_value=ir.tensor(table.astype(np.float32)))
    model.graph.register_initializer(value)
    gather = ir.node("Gather", [value, node.inputs[1]], name="plain_gather")
    model.graph.insert_before(node, gather)
    node.outputs[0].replace_all_uses_with(gather.outputs[0], replace_graph_outputs=True)
    model.graph.remove(node, safe=True)
    want = run_logits(save(model, tmp_path / "plain.onnx"), IDS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
