"""Function-preserving FFN channel permutation.

Rules:

1. For layer ``l`` with order ``p`` (a permutation of ``range(I)``), gate and up output columns
   (and their biases) become ``[:, p]`` and down input rows become ``[p, :]``; the MLP computes
   the same function because SwiGLU/GELU act channel by channel.
2. A weight shared with another node (e.g. merged by initializer dedupe) is copied first, so
   nothing outside the layer changes.
3. Calibration supplies co-activation orders; contiguous blocks of the permuted order are then
   the FFN units.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from cscompile.errors import UserError
from cscompile.passes.unit_map import UnitMap, require_unit_map


def _take(graph: ir.Graph, name: str | None, perm: np.ndarray, axis: int, owner: str) -> None:
    """Reorder initializer ``name`` along ``axis`` for the node named ``owner`` (copy if shared)."""
    if name is None:
        return
    value = graph.initializers.get(name)
    if value is None or value.const_value is None:
        raise UserError("FFN permutation", f"initializer '{name}' not found", "the unit map of this graph")
    new = np.ascontiguousarray(np.take(value.const_value.numpy(), perm, axis=axis))
    users = [n for n, _ in value.uses()]
    if len(users) > 1:  # shared: give this projection its own copy
        copy = ir.Value(name=f"{name}.{owner}", const_value=ir.tensor(new))
        copy.shape = ir.Shape(new.shape)
        copy.dtype = ir.DataType.from_numpy(new.dtype)
        graph.register_initializer(copy)
        node = next((n for n in users if n.name == owner), users[0])
        for i, inp in enumerate(node.inputs):
            if inp is value:
                node.replace_input_with(i, copy)
    else:
        value.const_value = ir.tensor(new, name=name)


class PermuteFFNPass(InPlacePass):
    """Reorder FFN channels of chosen layers by given permutations (function preserving)."""

    def __init__(self, orders: Mapping[int, np.ndarray | list[int]]) -> None:
        super().__init__()
        self.orders = {int(k): np.asarray(v, dtype=np.int64) for k, v in orders.items()}

    def requires(self, model: ir.Model) -> None:
        require_unit_map(model, "PermuteFFNPass")

    def call(self, model: ir.Model) -> PassResult:
        um: UnitMap = model.meta["cscompile.unit_map"]
        graph = model.graph
        for li, perm in self.orders.items():
            if not 0 <= li < um.num_layers:
                raise UserError("FFN permutation", f"layer {li}", f"a layer in 0..{um.num_layers - 1}")
            mlp = um.layers[li].mlp
            width = mlp.intermediate_size
            if perm.shape != (width,) or not np.array_equal(np.sort(perm), np.arange(width)):
                raise UserError(
                    "FFN permutation",
                    f"order for layer {li} is not a permutation of {width} channels",
                    f"a permutation of range({width})",
                )
            for proj in (mlp.gate, mlp.up):
                if proj is None:
                    continue
                if proj.out_slice is not None:
                    raise UserError(
                        "FFN permutation", "a fused gate/up projection", "separate gate and up weights"
                    )
                _take(graph, proj.weight, perm, 1 if proj.weight_layout == "in_out" else 0, proj.node)
                _take(graph, proj.bias, perm, 0, proj.node)
            down = mlp.down
            _take(graph, down.weight, perm, 0 if down.weight_layout == "in_out" else 1, down.node)
        return PassResult(model, modified=bool(self.orders))
