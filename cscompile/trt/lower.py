"""Lower a motif family to graphs TensorRT's ONNX parser accepts (``--target trt``).

Two graphs per bundle, sharing every weight name and the KV-cache layout:

- **dense**: the canonical exported graph, stock ONNX ops only. It runs the prompt (prefill is
  dense in the method) and the dense motif.
- **sparse**: the same graph with each sparsified layer's FFN replaced by sensing and recovery in
  stock ops — ``scores = D(Φx) + bias`` (MatMul, Add), per-block sums (Reshape, ReduceSum), the
  hot core forced first (a constant bonus), ``TopK`` (sorted, ``K`` = the largest count any motif
  runs in that layer) — feeding one ``cscompile::SparseFFN`` plugin node
  (:mod:`cscompile.trt.plugin_ffn`). An int32 graph input ``cs_motif_counts [L]`` says how many
  of the sorted blocks each layer runs: *every sparse motif of the family is one engine*, they
  differ only in that small input — the same design as the CPU engine, where motifs differ only
  in kernel arguments. Switching among sparse motifs per token therefore never switches engines
  and never moves the KV cache, and N motifs cost one engine's weights, not N. Each layer's
  recovery residual is a graph output ``cs_residual.{l}``.

:func:`check_trt_ops` refuses graphs the parser would reject (contrib ``com.microsoft`` ops from
the fused or quantized CPU paths, TopK beyond its limits) with the node and the fix; on CPU,
:func:`cscompile.trt.plugin_ffn.with_reference` makes the sparse graph runnable by ONNX Runtime
for the parity tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from cscompile.errors import UserError
from cscompile.motifs.engine import LayerPredictor, Motif
from cscompile.motifs.segments import down_output_and_mid, find_value
from cscompile.passes.graph_utils import add_initializer
from cscompile.passes.unit_map import Projection, UnitMap
from cscompile.trt import plugin_ffn as trt_ffn

COUNTS_INPUT = "cs_motif_counts"
RESIDUAL_PREFIX = "cs_residual."
#: TensorRT's TopK: ``K`` ≤ 3840 (TensorRT 10 operator support)
TOPK_MAX = 3840
#: added to hot-core block scores so TopK (sorted) places them first; finite in fp16
HOT_BONUS = 3.0e4
#: ops from the default domain the TensorRT 10 ONNX parser imports (onnx-tensorrt operators.md);
#: the exported decoders use a small subset — anything else is refused before a GPU build
TRT_OPS = frozenset(
    """Abs Add And ArgMax ArgMin Cast CastLike Ceil Clip Concat Constant ConstantOfShape Cos CumSum
    Div Einsum Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm Greater
    GreaterOrEqual Identity If LayerNormalization Less LessOrEqual Log MatMul Max Min Mod Mul Neg
    Not Or Pow Range Reciprocal ReduceMax ReduceMean ReduceMin ReduceSum Relu Reshape
    ScatterElements ScatterND Shape Sigmoid Sin Slice Softmax Split Sqrt Squeeze Sub Sum Tanh Tile
    TopK Transpose Trilu Unsqueeze Where Xor""".split()
)


@dataclass
class LoweredFamily:
    """The sparse graph of a family and how to drive it."""

    model: onnx.ModelProto
    block: int
    topk: list[int]  # K per layer (0: the layer keeps its stock FFN)
    counts: dict[str, list[int]]  # sparse motif name -> blocks run per layer (the counts input)
    num_layers: int
    residual_outputs: list[str] = field(default_factory=list)

    def counts_array(self, motif: str) -> np.ndarray:
        if motif not in self.counts:
            raise KeyError(f"no sparse motif {motif!r} (have {sorted(self.counts)})")
        return np.asarray(self.counts[motif], np.int32)


def check_trt_ops(model: onnx.ModelProto, what: str = "graph") -> None:
    """Raise a one-line :class:`UserError` for the first op TensorRT's parser would not import."""
    for node in model.graph.node:
        if node.domain == trt_ffn.DOMAIN and node.op_type == trt_ffn.PLUGIN_NAME:
            continue
        if node.domain not in ("", "ai.onnx"):
            raise UserError(
                f"TensorRT lowering of the {what}",
                f"node {node.name or node.op_type} is {node.domain}.{node.op_type} (an ONNX Runtime contrib op)",
                "stock ONNX ops: build --target trt from the unfused fp32 export "
                "(TensorRT chooses fp16/bf16 itself; --precision int4/int8 are CPU formats)",
            )
        if node.op_type not in TRT_OPS:
            raise UserError(
                f"TensorRT lowering of the {what}",
                f"node {node.name or node.op_type} uses {node.op_type}",
                "ops the TensorRT 10 ONNX parser imports (see docs/gpu.md)",
            )
        if node.op_type == "TopK":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("sorted", 1) != 1:
                raise UserError(
                    f"TensorRT lowering of the {what}", f"TopK {node.name} has sorted=0", "sorted=1"
                )


def _weight(graph: ir.Graph, p: Projection) -> ir.Value:
    """The projection's weight as a value in MatMul layout (``[in, out]``), with
    nodes (Slice/Transpose on the initializer, folded by TensorRT) when the export differs.
    """
    init = graph.initializers.get(p.weight)
    if init is None:
        raise UserError("TensorRT lowering", f"initializer {p.weight} not found", "the graph of the unit map")
    if p.bias is not None:
        raise UserError("TensorRT lowering", f"projection {p.node} has a bias", "a bias-free SwiGLU FFN")
    v = init
    if p.weight_layout == "out_in":  # [out, in] -> [in, out]
        node = ir.node("Transpose", [v], attributes={"perm": [1, 0]})
        graph.append(node)
        v = node.outputs[0]
    if p.out_slice is not None:  # columns of a fused weight
        lo, hi = p.out_slice
        consts = [add_initializer(graph, f"{p.weight}.cs_slice_{n}", np.array([x], np.int64))
                  for n, x in (("lo", lo), ("hi", hi), ("ax", 1))]  # fmt: skip
        node = ir.node("Slice", [v, *consts])
        graph.append(node)
        v = node.outputs[0]
    return v


def sparse_motifs(motifs: Sequence[Motif], intermediate: int) -> list[Motif]:
    """The motifs that run fewer than all FFN channels in some layer (the sparse engine's)."""
    return [m for m in motifs if any(k is not None and k < intermediate for k in m.k)]


def _blocks(k: int | None, inter: int, block: int) -> int:
    return inter // block if k is None or k >= inter else math.ceil(k / block)


def lower_family(
    model: ir.Model,
    um: UnitMap,
    motifs: Sequence[Motif],
    block: int = 16,
) -> LoweredFamily:
    """The sparse graph serving every non-dense motif of ``motifs`` (``model`` is changed in place:
    pass a fresh copy). ``block``: FFN channels per plugin block (the target's alignment).
    """
    inter = um.intermediate_size
    if block < 1 or inter % block:
        raise UserError("TensorRT lowering", f"block {block}", f"a divisor of the FFN width {inter}")
    nb = inter // block
    sparse = sparse_motifs(motifs, inter)
    if not sparse:
        raise UserError("TensorRT lowering", "a family with no sparse motif", "at least one sparse motif")
    n_layers = um.num_layers
    for m in sparse:
        if len(m.k) != n_layers:
            raise UserError("TensorRT lowering", f"motif {m.name} has {len(m.k)} layers", f"{n_layers}")
    counts = {m.name: [_blocks(k, inter, block) for k in m.k] for m in sparse}
    topk = [max(c[li] for c in counts.values()) for li in range(n_layers)]
    for li in range(n_layers):
        if all(c[li] == nb for c in counts.values()) or not um.layers[li].ffn:
            topk[li] = 0  # dense in every sparse motif (or no FFN): the stock FFN stays
        elif topk[li] > TOPK_MAX:
            raise UserError(
                "TensorRT lowering",
                f"layer {li} needs TopK K={topk[li]}",
                f"K ≤ {TOPK_MAX} (TensorRT's limit): a larger --block-size",
            )
    graph = model.graph
    counts_in = ir.Value(name=COUNTS_INPUT, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([n_layers]))
    graph.inputs.append(counts_in)
    phis: dict[int, ir.Value] = {}
    residuals = []
    for li in range(n_layers):
        if topk[li] == 0:
            continue
        pred = _predictor(sparse, li)
        if pred is None:
            raise UserError(
                "TensorRT lowering", f"layer {li} is sparse without a predictor", "fitted predictors"
            )
        lay = um.layers[li]
        mlp = lay.mlp
        if mlp.kind != "swiglu" or mlp.gate is None:
            raise UserError("TensorRT lowering", f"layer {li} has a '{mlp.kind}' FFN", "a SwiGLU FFN")
        x = find_value(graph, lay.mlp_input)
        _mid, out = down_output_and_mid(graph, um, li)
        add = out.producer()
        assert add is not None
        key = id(pred.phi)
        if key not in phis:
            phis[key] = add_initializer(graph, f"cs_phi_t.{li}", np.ascontiguousarray(pred.phi.T, np.float32))
        dec = add_initializer(graph, f"cs_decoder_t.{li}", np.ascontiguousarray(pred.decoder.T, np.float32))
        bias = pred.bias if pred.bias is not None else np.zeros(inter, np.float32)
        b_v = add_initializer(graph, f"cs_bias.{li}", np.asarray(bias, np.float32))
        nodes: list[ir.Node] = []

        def op(op_type: str, inputs: list, nodes: list[ir.Node] = nodes, **attrs: Any) -> ir.Value:
            node = ir.node(op_type, inputs, attributes=attrs)
            nodes.append(node)
            return node.outputs[0]

        y = op("MatMul", [x, phis[key]])
        scores = op("Add", [op("MatMul", [y, dec]), b_v])
        rank = scores
        if pred.hot > 0:
            bonus = np.zeros(inter, np.float32)
            bonus[: pred.hot] = HOT_BONUS
            rank = op("Add", [scores, add_initializer(graph, f"cs_hot.{li}", bonus)])
        if block > 1:
            shape = add_initializer(graph, f"cs_blockshape.{li}", np.array([0, 0, nb, block], np.int64))
            axes = add_initializer(graph, f"cs_axes.{li}", np.array([-1], np.int64))
            rank = op("ReduceSum", [op("Reshape", [rank, shape]), axes], keepdims=0)
        kv = add_initializer(graph, f"cs_topk.{li}", np.array([topk[li]], np.int64))
        top = ir.node("TopK", [rank, kv], attributes={"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)
        nodes.append(top)
        idx = op("Cast", [top.outputs[1]], to=int(ir.DataType.INT32))
        li_v = add_initializer(graph, f"cs_layer.{li}", np.array([li], np.int64))
        count = op("Gather", [counts_in, li_v], axis=0)
        gate = _weight(graph, mlp.gate)
        up = _weight(graph, mlp.up)
        down = _weight(graph, mlp.down)
        plug = ir.node(
            trt_ffn.PLUGIN_NAME,
            [x, scores, idx, count, gate, up, down],
            attributes={
                "block": block,
                "plugin_namespace": trt_ffn.PLUGIN_NAMESPACE,
                "plugin_version": trt_ffn.PLUGIN_VERSION,
            },
            domain=trt_ffn.DOMAIN,
            num_outputs=2,
            name=f"cs_sparse_ffn.{li}",
        )
        nodes.append(plug)
        ffn_out, residual = plug.outputs
        residual.name = f"{RESIDUAL_PREFIX}{li}"
        residual.dtype = ir.DataType.FLOAT
        residual.shape = ir.Shape([x.shape[0], x.shape[1]]) if x.shape is not None else None
        ffn_out.dtype = ir.DataType.FLOAT
        graph.insert_before(add, nodes)
        j = next(i for i, v in enumerate(add.inputs) if v is not _mid)
        add.replace_input_with(j, ffn_out)
        graph.outputs.append(residual)
        residuals.append(residual.name)
    RemoveUnusedNodesPass()(model)
    from onnx_ir.passes.common import TopologicalSortPass

    TopologicalSortPass()(model)
    model.opset_imports.setdefault(trt_ffn.DOMAIN, 1)
    proto = ir.serde.serialize_model(model)
    check_trt_ops(proto, "sparse graph")
    return LoweredFamily(proto, block, topk, counts, n_layers, residuals)


def _predictor(motifs: Sequence[Motif], layer: int) -> LayerPredictor | None:
    for m in motifs:
        if m.predictors is not None and m.predictors[layer] is not None:
            return m.predictors[layer]
    return None
