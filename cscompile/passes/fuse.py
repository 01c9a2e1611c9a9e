"""Attention fusion for the ONNX Runtime CPU target: one ``GroupQueryAttention`` node per layer.

The plain export spends most of a decode step in small ops (RoPE slices, reshapes, shape
arithmetic, the cache concat, masking): profiling the int4 SmolLM2 graph shows the weight
multiplies at only about a third of the step. ORT's ``com.microsoft::GroupQueryAttention``
does RoPE, the cache append and causal attention in one kernel.

Rules:

1. Per layer with separate Q/K/V projections and RoPE: the projection outputs (after their
   bias, if any) feed a GQA node with ``past_key``/``past_value``; its outputs replace the
   context (the input of O) and the ``present`` graph outputs. The old subgraph dies and is
   removed.
2. Positions: GQA derives them from ``seqlens_k = sum(attention_mask) − 1`` and the total
   length, so the fused graph serves unpadded sequences (batch 1 generation, or batches
   without left padding); cos/sin caches are computed from the graph's own RoPE frequencies
   (the constant multiplied with ``position_ids``), up to ``max_positions``.
3. Run it last: discovery does not read fused graphs; the unit map stays the one made before.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx_ir.passes import InPlacePass, PassResult

from cscompile.errors import UserError
from cscompile.passes.graph_utils import add_initializer, carried_const
from cscompile.passes.unit_map import Projection, UnitMap, require_unit_map

#: the longest context whose RoPE table (cos and sin, [positions, head_dim/2] fp32) the fused
#: graph holds: 2M positions are 1 GiB of tables at head_dim 128 (the longest published contexts
#: are ~1M); a config asking for more is refused, not built
MAX_ROPE_POSITIONS = 2**21
#: the table holds at least this many positions whatever the model's context: the build's
#: correctness gate runs 132 (a tiny test model may declare a context of 16)
MIN_ROPE_POSITIONS = 256


def _rope_inv_freq(graph: ir.Graph) -> np.ndarray:
    """The RoPE frequencies: the 1-D constant multiplied with the (cast, unsqueezed) position ids."""
    pos = next((v for v in graph.inputs if v.name == "position_ids"), None)
    if pos is None:
        raise UserError(
            "attention fusion",
            "the graph has no position_ids input",
            "a graph computing RoPE from position_ids",
        )
    stack, seen = [pos], set()
    while stack:
        v = stack.pop()
        for node, _ in v.uses():
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in ("Mul", "MatMul"):  # MatMul: transformers' inv_freq @ positions
                for i in node.inputs:
                    arr = carried_const(i)  # optimum's export expands and casts the table first
                    if (
                        arr is not None
                        and np.issubdtype(arr.dtype, np.floating)
                        and arr.ndim >= 1
                        and arr.size > 1
                    ):
                        return arr.reshape(-1).astype(np.float64)
            if node.op_type in ("Cast", "Unsqueeze", "Reshape", "Expand", "MatMul"):
                stack.extend(node.outputs)
    raise UserError(
        "attention fusion", "no RoPE frequency constant found after position_ids", "Llama-style RoPE"
    )


class FuseAttentionPass(InPlacePass):
    """Replace each layer's attention core by ``com.microsoft::GroupQueryAttention``."""

    def __init__(self, max_positions: int = 8192) -> None:
        if (
            isinstance(max_positions, bool)
            or not isinstance(max_positions, int)
            or not 1 <= max_positions <= MAX_ROPE_POSITIONS
        ):
            raise UserError("attention fusion: the model's context (max_position_embeddings)", f"{max_positions!r}",
                            f"an integer in [1, {MAX_ROPE_POSITIONS}] (its RoPE table is built into the graph)")  # fmt: skip
        super().__init__()
        self.max_positions = max_positions
        self.fused = 0

    def requires(self, model: ir.Model) -> None:
        require_unit_map(model, "FuseAttentionPass")

    def _proj_out(self, nodes: dict[str, ir.Node], p: Projection) -> ir.Value:
        out = nodes[p.node].outputs[0]
        if p.bias is not None and p.out_slice is None:
            uses = [n for n, _ in out.uses()]
            if len(uses) == 1 and uses[0].op_type == "Add":
                out = uses[0].outputs[0]
        return out

    def call(self, model: ir.Model) -> PassResult:
        um: UnitMap = model.meta["cscompile.unit_map"]
        graph = model.graph
        nodes = {n.name or "": n for n in graph}
        values = {v.name: v for n in graph for v in n.outputs}
        inputs = {v.name: v for v in graph.inputs}
        mask = inputs.get("attention_mask")
        if mask is None:
            raise UserError(
                "attention fusion", "the graph has no attention_mask input", "a decoder with attention_mask"
            )
        deviations = um.llama_deviations(rope_table=False)  # the table and its factor: read below
        if deviations:
            raise UserError("attention fusion", deviations[0],
                            "a Llama-family graph (GroupQueryAttention cannot express it)")  # fmt: skip
        layer0 = um.layers[0].attention
        if layer0.fused_qkv or not layer0.rope:
            raise UserError(
                "attention fusion", "fused QKV or no RoPE", "a Llama-family graph (separate Q/K/V, RoPE)"
            )
        if layer0.head_dim % 16:
            raise UserError(
                "attention fusion", f"head_dim {layer0.head_dim}", "a multiple of 16 (ORT's rotary kernel)"
            )
        model.opset_imports.setdefault("com.microsoft", 1)
        scales = {layer.attention.rope_scale for layer in um.layers}
        if len(scales) != 1:
            raise UserError("attention fusion", f"RoPE factors {sorted(map(str, scales))} by layer", "one")
        scale = scales.pop() or 1.0  # YaRN's attention factor on cos and sin: into the tables
        inv_freq = _rope_inv_freq(graph)
        pos = (
            np.arange(max(self.max_positions, MIN_ROPE_POSITIONS), dtype=np.float64)[:, None]
            * inv_freq[None, :]
        )
        new: list[ir.Node] = []

        cos = add_initializer(graph, "cs.rope.cos", (scale * np.cos(pos)).astype(np.float32))
        sin = add_initializer(graph, "cs.rope.sin", (scale * np.sin(pos)).astype(np.float32))
        one = add_initializer(graph, "cs.gqa.one", np.array([1], np.int64))
        # seqlens_k = sum(mask, 1) - 1 (int32 [B]); total length = mask.shape[1] (int32 scalar)
        rs = ir.node("ReduceSum", [mask, one], attributes={"keepdims": 0}, name="cs.gqa.seqlen_sum")
        sub = ir.node("Sub", [rs.outputs[0], one], name="cs.gqa.seqlen_sub")
        seqlens = ir.node(
            "Cast", [sub.outputs[0]], attributes={"to": ir.DataType.INT32}, name="cs.gqa.seqlens_k"
        )
        shp = ir.node("Shape", [mask], attributes={"start": 1, "end": 2}, name="cs.gqa.total_shape")
        sq = ir.node("Squeeze", [shp.outputs[0]], name="cs.gqa.total_squeeze")
        total = ir.node("Cast", [sq.outputs[0]], attributes={"to": ir.DataType.INT32}, name="cs.gqa.total")
        new += [rs, sub, seqlens, shp, sq, total]
        replacements: list[tuple[ir.Value, ir.Value]] = []
        for layer in um.layers:
            a = layer.attention
            if a.past_key is None or a.present_key is None or a.past_value is None or a.present_value is None:
                raise UserError(
                    "attention fusion",
                    f"layer {layer.index} has no KV cache",
                    "past/present tensors per layer",
                )
            gqa = ir.node(
                "GroupQueryAttention",
                [
                    self._proj_out(nodes, a.q),
                    self._proj_out(nodes, a.k),
                    self._proj_out(nodes, a.v),
                    inputs[a.past_key],
                    inputs[a.past_value],
                    seqlens.outputs[0],
                    total.outputs[0],
                    cos,
                    sin,
                ],
                attributes={
                    "num_heads": a.num_heads,
                    "kv_num_heads": a.num_kv_heads,
                    "do_rotary": 1,
                    "rotary_interleaved": 0,
                    "scale": float(a.head_dim**-0.5),
                },
                domain="com.microsoft",
                num_outputs=3,
                name=f"cs.L{layer.index}.gqa",
            )
            new.append(gqa)
            replacements.append((values[layer.attn_context], gqa.outputs[0]))
            for old_name, out in ((a.present_key, gqa.outputs[1]), (a.present_value, gqa.outputs[2])):
                old = next(o for o in graph.outputs if o.name == old_name)
                replacements.append((old, out))
        graph.extend(new)
        for old, out in replacements:
            name = old.name
            is_output = old.is_graph_output()
            old.replace_all_uses_with(out, replace_graph_outputs=True)
            if is_output:
                old.name = None
                out.name = name
        common.RemoveUnusedNodesPass()(model)
        common.TopologicalSortPass()(model)
        # the runtime reads this: GQA takes positions from seqlens, so no left-padded batches
        model.metadata_props["cscompile.attention"] = "gqa"
        self.fused = len(um.layers)
        return PassResult(model, modified=True)
