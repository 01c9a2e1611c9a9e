"""Instrumentation: expose, for calibration, the sensing feature and every unit's activity.

Rules (per layer ``l``; new graph outputs, the original outputs untouched):

1. ``cs.L{l}.feature [B,S,H]``: the hidden state after the input norm (what Q/K/V read): the
   feature f(h) the measurements Φ are applied to.
2. ``cs.L{l}.ffn.act [B,S,I]``: the FFN intermediate a = act(gate·x) ⊙ (up·x), input of down.
3. ``cs.L{l}.ffn.block_activity [B,S,I/b]``: each block's contribution norm to the residual
   stream, ‖W_down[B_j,:]ᵀ a_{B_j}‖ (for b = 1: |a_j|·‖W_down[j,:]‖).
4. ``cs.L{l}.attn.group_activity [B,S,KV]``: each KV group's contribution norm
   ‖W_o[group rows]ᵀ ctx_group‖ (the heads of the group, through the output projection).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from cscompile.passes.graph_utils import add_initializer
from cscompile.passes.unit_map import Projection, UnitMap, require_unit_map


def _in_out_weight(graph: ir.Graph, p: Projection, tag: str) -> tuple[ir.Value, list[ir.Node]]:
    """The projection's weight as ``[in, out]`` (a Transpose node for ``out_in`` layouts)."""
    w = graph.initializers[p.weight]
    if p.weight_layout == "in_out":
        return w, []
    t = ir.node("Transpose", [w], attributes={"perm": [1, 0]}, name=f"{tag}.wT")
    return t.outputs[0], [t]


def _output(graph: ir.Graph, value: ir.Value, name: str, nodes: list[ir.Node]) -> None:
    ident = ir.node("Identity", [value], name=f"{name}.identity")
    ident.outputs[0].name = name
    ident.outputs[0].dtype = ir.DataType.FLOAT
    nodes.append(ident)
    graph.outputs.append(ident.outputs[0])


def _group_norms(
    graph: ir.Graph,
    x: ir.Value,
    w: ir.Value,
    groups: int,
    width: int,
    tag: str,
    nodes: list[ir.Node],
    opset: int,
) -> ir.Value:
    """‖W[g]ᵀ x_g‖ per group g: x [B,S,groups·width], W [groups·width, H] -> [B,S,groups]."""
    hidden_shape = add_initializer(graph, f"{tag}.xshape", np.array([0, 0, groups, 1, width], np.int64))
    w_shape = add_initializer(graph, f"{tag}.wshape", np.array([groups, width, -1], np.int64))
    axes = add_initializer(graph, f"{tag}.axes", np.array([-1], np.int64))
    xr = ir.node("Reshape", [x, hidden_shape], name=f"{tag}.xr")  # [B,S,G,1,w]
    wr = ir.node("Reshape", [w, w_shape], name=f"{tag}.wr")  # [G,w,H]
    mm = ir.node("MatMul", [xr.outputs[0], wr.outputs[0]], name=f"{tag}.mm")  # [B,S,G,1,H]
    if opset >= 18:  # axes became an input of the Reduce ops in opset 18
        l2 = ir.node(
            "ReduceL2", [mm.outputs[0], axes], attributes={"keepdims": 0}, name=f"{tag}.l2"
        )  # [B,S,G,1]
    else:
        l2 = ir.node("ReduceL2", [mm.outputs[0]], attributes={"keepdims": 0, "axes": [-1]}, name=f"{tag}.l2")
    sq = ir.node("Squeeze", [l2.outputs[0], axes], name=f"{tag}.sq")  # [B,S,G]
    nodes += [xr, wr, mm, l2, sq]
    return sq.outputs[0]


class InstrumentPass(InPlacePass):
    """Add calibration outputs: per-layer feature, FFN intermediate, unit activities."""

    def __init__(self, block_size: int | None = None) -> None:
        super().__init__()
        self.block_size = block_size

    def requires(self, model: ir.Model) -> None:
        require_unit_map(model, "InstrumentPass")

    def call(self, model: ir.Model) -> PassResult:
        um: UnitMap = model.meta["cscompile.unit_map"]
        graph = model.graph
        values = {v.name: v for n in graph for v in n.outputs}
        b = self.block_size or um.block_size
        opset = model.opset_imports.get("", 17)
        new_nodes: list[ir.Node] = []
        for layer in um.layers:
            tag = f"cs.L{layer.index}"
            a, m = layer.attention, layer.mlp
            _output(graph, values[layer.attn_input], f"{tag}.feature", new_nodes)
            act = values[layer.mlp_act]
            _output(graph, act, f"{tag}.ffn.act", new_nodes)
            wd, extra = _in_out_weight(graph, m.down, f"{tag}.ffn")
            new_nodes += extra
            if b == 1:
                w_np = graph.initializers[m.down.weight].const_value.numpy()  # type: ignore[union-attr]
                row_norm = np.linalg.norm(
                    w_np if m.down.weight_layout == "in_out" else w_np.T, axis=1
                ).astype(np.float32)
                rn = add_initializer(graph, f"{tag}.ffn.down_row_norm", row_norm)
                ab = ir.node("Abs", [act], name=f"{tag}.ffn.abs")
                mul = ir.node("Mul", [ab.outputs[0], rn], name=f"{tag}.ffn.blocks")
                new_nodes += [ab, mul]
                blocks = mul.outputs[0]
            else:
                blocks = _group_norms(
                    graph, act, wd, m.intermediate_size // b, b, f"{tag}.ffn", new_nodes, opset
                )
            _output(graph, blocks, f"{tag}.ffn.block_activity", new_nodes)
            wo, extra = _in_out_weight(graph, a.o, f"{tag}.attn")
            new_nodes += extra
            ctx = values[layer.attn_context]
            groups = _group_norms(
                graph, ctx, wo, a.num_kv_heads, a.group_size * a.head_dim, f"{tag}.attn", new_nodes, opset
            )
            _output(graph, groups, f"{tag}.attn.group_activity", new_nodes)
        graph.extend(new_nodes)
        return PassResult(model, modified=True)
