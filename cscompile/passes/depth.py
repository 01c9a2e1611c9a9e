"""Depth reduction: drop whole decoder layers, or only their FFN, from a graph with a unit map.

Rules:

1. Dropping the FFN of layer ``l`` makes the layer's output its post-attention residual: every
   use of ``residual_out`` is rewired to the Add's other input (the one not computed from the
   down projection). The FFN's nodes become dead and are removed.
2. Dropping layer ``l`` makes its output its input (``residual_out`` → ``residual_in``) and
   removes its KV cache inputs and outputs. The remaining layers' cache tensors are renumbered
   0..N'-1 so the graph is an ordinary decoder with fewer layers; ``source_layers`` (also in
   the model's metadata, ``cscompile.source_layers``) maps each new index to the source layer,
   which quantization needs to find a layer's tensors in the source GGUF.
3. A cache input used outside its own layer (some exporters read layer 0's past length for the
   mask) cannot be removed: dropping that layer is refused with a clear message.

The unit map is updated in place: dropped layers leave it, the rest are renumbered, and a
layer without its FFN is marked ``ffn=False`` (unit discovery would refuse such a graph, so
later passes — fusion, quantization — run on this map rather than a rediscovered one).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass

from cscompile.errors import UserError
from cscompile.passes.unit_map import UnitMap, require_unit_map

META = "cscompile.source_layers"


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    out: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        for v in node.outputs:
            if v.name:
                out[v.name] = v
    return out


def _renumber(name: str, old: int, new: int) -> str:
    renamed, n = re.subn(rf"(?<![0-9]){old}(?![0-9])", str(new), name, count=1)
    if n != 1:
        raise UserError("layer drop", f"cannot find layer number {old} in cache tensor '{name}'",
                        "cache tensors named with their layer index (past_key_values.N.key)")  # fmt: skip
    return renamed


class DropLayersPass(InPlacePass):
    """Remove the FFN of layers ``ffn`` and the whole of layers ``layers`` (source indices)."""

    def __init__(self, layers: set[int] | list[int] = (), ffn: set[int] | list[int] = ()) -> None:  # type: ignore[assignment]
        super().__init__()
        self.layers = {int(i) for i in layers}
        self.ffn = {int(i) for i in ffn} - self.layers
        self.source_layers: list[int] = []

    def requires(self, model: ir.Model) -> None:
        require_unit_map(model, "DropLayersPass")

    def call(self, model: ir.Model) -> PassResult:
        um: UnitMap = model.meta["cscompile.unit_map"]
        graph = model.graph
        n_layers = len(um.layers)
        bad = sorted(i for i in self.layers | self.ffn if not 0 <= i < n_layers)
        if bad:
            raise UserError("layer drop", f"layers {bad}", f"indices in 0..{n_layers - 1}")
        if len(self.layers) >= n_layers:
            raise UserError("layer drop", f"all {n_layers} layers", "at least one layer kept")
        values = _values(graph)
        # last layer first: a dropped layer's users move to its input, which is the output of
        # the layer before — processed next, so consecutive drops chain to the right value
        for layer in reversed(um.layers):
            i = layer.index
            if i not in self.layers and i not in self.ffn:
                continue
            out = values.get(layer.residual_out)
            if out is None or out.producer() is None:
                raise UserError("layer drop", f"layer {i}'s output '{layer.residual_out}' not found",
                                "the graph the unit map was made from")  # fmt: skip
            if i in self.layers:
                keep = values.get(layer.residual_in)
                if keep is None:
                    raise UserError("layer drop", f"layer {i}'s input '{layer.residual_in}' not found",
                                    "the graph the unit map was made from")  # fmt: skip
            else:
                keep = self._post_attention(out, layer.mlp.down.node, i)
            if out in graph.outputs:
                raise UserError("layer drop", f"layer {i}'s output is a graph output", "an inner value")
            ir.convenience.replace_all_uses_with(out, keep)
        # drop the removed layers' cache outputs, then their dead nodes, then their cache inputs
        dropped = [um.layers[i].attention for i in sorted(self.layers)]
        gone_out = {n for a in dropped for n in (a.present_key, a.present_value) if n}
        gone_in = {n for a in dropped for n in (a.past_key, a.past_value) if n}
        for v in [v for v in graph.outputs if v.name in gone_out]:
            graph.outputs.remove(v)
        RemoveUnusedNodesPass()(model)
        for v in [v for v in graph.inputs if v.name in gone_in]:
            if v.uses():
                raise UserError("layer drop", f"cache input '{v.name}' is read outside its layer",
                                "a graph whose cache inputs feed only their own layer")  # fmt: skip
            graph.inputs.remove(v)
        self.source_layers = [i for i in range(n_layers) if i not in self.layers]
        by_name = {v.name: v for v in [*graph.inputs, *graph.outputs] if v.name}
        for new, src in enumerate(self.source_layers):
            if new == src:
                continue
            a = um.layers[src].attention
            for name in (a.past_key, a.past_value, a.present_key, a.present_value):
                if name and name in by_name:
                    by_name[name].name = _renumber(name, src, new)
        model.metadata_props[META] = json.dumps(self.source_layers)
        new_index = {src: new for new, src in enumerate(self.source_layers)}
        layers = []
        for src in self.source_layers:
            old = um.layers[src]
            a = old.attention
            renamed: dict[str, Any] = {}
            for k in ("past_key", "past_value", "present_key", "present_value"):
                name = getattr(a, k)
                if name and name in by_name:
                    renamed[k] = by_name[name].name
            att = dataclasses.replace(a, **renamed)
            layers.append(dataclasses.replace(old, index=new_index[src], attention=att,
                                              ffn=old.ffn and src not in self.ffn))  # fmt: skip
        um.layers = layers
        um.units = [
            dataclasses.replace(u, layer=new_index[u.layer])
            for u in um.units
            if u.layer in new_index and not (u.layer in self.ffn and u.kind == "ffn_block")
        ]
        return PassResult(model, modified=bool(self.layers or self.ffn))

    @staticmethod
    def _post_attention(out: ir.Value, down_node: str, layer: int) -> ir.Value:
        add = out.producer()
        assert add is not None
        if add.op_type != "Add" or len(add.inputs) != 2:
            raise UserError("FFN drop", f"layer {layer}'s output comes from {add.op_type}", "a residual Add")
        for j, v in enumerate(add.inputs):
            other = add.inputs[1 - j]
            p = other.producer() if other is not None else None
            # the FFN side is the down projection (possibly through a bias Add)
            ffn_side = p is not None and (
                p.name == down_node
                or any(
                    q is not None and q.producer() is not None and q.producer().name == down_node  # type: ignore[union-attr]
                    for q in p.inputs
                )  # fmt: skip
            )
            if ffn_side and v is not None:
                return v
        raise UserError("FFN drop", f"layer {layer}'s residual Add has no input from its down projection",
                        "a pre-norm decoder (x + FFN(norm(x)))")  # fmt: skip
