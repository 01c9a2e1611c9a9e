"""Canonicalize: the graph every later pass can rely on.

Rules, in order:

1. Remove nodes whose outputs nobody uses.
2. Fold constants (onnxscript's folder; shape computations on static dims become constants).
3. Deduplicate initializers with identical contents (exporters often copy a tied weight).
4. Infer shapes (ONNX shape inference through onnx-ir), then fold again: shape arithmetic on
   dims that only inference made static (optimum's Phi-3 slices gate_up at bounds computed
   from its product's ``Shape``) becomes constants, which rule 5 needs.
5. Split fused projections whose product is only sliced (Phi-3's qkv / gate_up as transformers
   exports them) into one MatMul per column range (:mod:`cscompile.passes.unfuse`).
6. Give a fused QKV interleaved per head (GPT-NeoX: a Reshape to ``[.., heads, 3·d]``, a
   Transpose, a last-axis three-way Split) one MatMul (and bias) per role (same module).
7. Sort nodes topologically (discovery orders layers by node position).

``ensures``: every node's inputs are produced earlier in the node list.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx_ir.passes import InPlacePass, PassResult, PostconditionError

from cscompile.passes.unfuse import DeinterleaveHeadsQKVPass, SplitFusedProjectionsPass


class FoldConstantsPass(InPlacePass):
    """Constant folding through onnxscript's optimizer (a well-kept folder; we do not write one)."""

    def call(self, model: ir.Model) -> PassResult:
        from onnxscript.optimizer import fold_constants

        result = fold_constants(model, onnx_shape_inference=False)
        return PassResult(model, bool(getattr(result, "modified", True)))


class CanonicalizePass(InPlacePass):
    """Unused-node removal, constant folding, initializer dedupe, shape inference, topological sort."""

    def __init__(self, shape_inference: bool = True) -> None:
        super().__init__()
        steps: list[ir.passes.PassBase] = [
            common.RemoveUnusedNodesPass(),
            FoldConstantsPass(),
            common.RemoveUnusedNodesPass(),
            common.DeduplicateInitializersPass(),
        ]
        if shape_inference:
            # folding again once shapes are known: shape arithmetic on static dims (optimum's
            # TorchScript Phi-3 slices gate_up at bounds computed from the product's Shape)
            steps += [common.ShapeInferencePass(), FoldConstantsPass(), common.RemoveUnusedNodesPass()]
        # after shape inference: a Split's axis is known to be the last one from its input's rank
        steps += [
            SplitFusedProjectionsPass(),
            DeinterleaveHeadsQKVPass(),
            common.RemoveUnusedNodesPass(),
            common.TopologicalSortPass(),
        ]
        self.steps = ir.passes.Sequential(*steps)

    def call(self, model: ir.Model) -> PassResult:
        return self.steps(model)

    def ensures(self, model: ir.Model) -> None:
        produced = {id(v) for v in model.graph.inputs} | {id(v) for v in model.graph.initializers.values()}
        for node in model.graph:
            for v in node.inputs:
                if v is not None and v.producer() is not None and id(v) not in produced:
                    raise PostconditionError(f"node '{node.name}' reads '{v.name}' before it is produced")
            produced.update(id(o) for o in node.outputs)
