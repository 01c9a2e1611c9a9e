"""The unit-discovery pass: an analysis pass that attaches a :class:`UnitMap` to the model."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult, PostconditionError

from cscompile.passes.discover import discover_units
from cscompile.passes.graph_utils import weight_of
from cscompile.passes.unit_map import META_KEY, UnitMap


class DiscoverUnitsPass(InPlacePass):
    """Find layers, attention, MLP, norms and LM head by dataflow; store the map in ``model.meta``.

    Rules: see :mod:`cscompile.passes.discover`. Does not change the graph (``modified=False``).
    ``ensures``: every weight projection of the graph belongs to exactly one layer role or is
    the LM head (a fused QKV weight belongs to one attention, in three column ranges).
    """

    def __init__(self, block_size: int = 1) -> None:
        super().__init__()
        self.block_size = block_size

    def call(self, model: ir.Model) -> PassResult:
        model.meta[META_KEY] = discover_units(model, self.block_size)
        return PassResult(model, modified=False)

    def ensures(self, model: ir.Model) -> None:
        um: UnitMap = model.meta[META_KEY]
        owners: dict[str, int] = {}
        for layer in um.layers:
            a, m = layer.attention, layer.mlp
            projs = (
                [a.q, a.o, m.up, m.down] + ([] if a.fused_qkv else [a.k, a.v]) + ([m.gate] if m.gate else [])
            )
            for p in projs:
                owners[p.node] = owners.get(p.node, 0) + 1
        owners[um.lm_head.node] = owners.get(um.lm_head.node, 0) + 1
        for node in model.graph:
            if weight_of(node) is not None and owners.get(node.name or "", 0) != 1:
                raise PostconditionError(
                    f"weight projection '{node.name}' belongs to {owners.get(node.name or '', 0)} units"
                )
