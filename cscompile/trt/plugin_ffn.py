"""The block-sparse FFN plugin of TensorRT motif engines: its semantics, CPU references, and
its TensorRT registration.

One node ``cscompile::SparseFFN`` (op type ``SparseFFN``, domain ``cscompile``, attribute
``block``) replaces a layer's SwiGLU FFN in a lowered motif graph (``cscompile.trt.lower``):

inputs
    ``x [B, S, H]`` the FFN input; ``scores [B, S, I]`` the recovered channel scores (sensing
    ``Φx`` → decoder, computed in stock ops before the node); ``indices [B, S, K]`` int32 block
    indices, best first (TopK, sorted); ``count [1]`` int32, how many leading indices to run
    (the motif: one engine serves every motif of the family, they differ only in counts);
    ``gate [H, I]``, ``up [H, I]``, ``down [I, H]`` (MatMul layout, the exported initializers).
outputs
    ``y [B, S, H] = Σ_{c ∈ S} down[c] · silu(x·gate[:, c]) · (x·up[:, c])`` over the channels
    ``S`` of the first ``count`` blocks (block ``j`` is channels ``[j·block, (j+1)·block)``);
    ``residual [B, S] = ‖|a_S| − s_S‖ / ‖a_S‖``, the recovery residual the CPU kernel reports
    (0 when ``‖a_S‖ = 0``).

Three implementations share these semantics and are tested against each other: :func:`reference`
(numpy, float64), :func:`reference_function` (an ONNX function of stock ops, so ONNX Runtime on
CPU runs a lowered graph with the reference standing in for the plugin) and the TensorRT plugin.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

PLUGIN_NAME = "SparseFFN"
PLUGIN_NAMESPACE = "cscompile"
PLUGIN_VERSION = "1"
DOMAIN = "cscompile"
QUALIFIED_NAME = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"


def reference(
    x: np.ndarray,
    scores: np.ndarray,
    indices: np.ndarray,
    count: int,
    gate: np.ndarray,
    up: np.ndarray,
    down: np.ndarray,
    block: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(y [B, S, H], residual [B, S])`` in float64 then cast to x's dtype (see the module doc)."""
    b, s, h = x.shape
    inter = gate.shape[1]
    if inter % block:
        raise ValueError(f"FFN width {inter} is not a multiple of block {block}")
    k = min(int(count), indices.shape[-1])
    y = np.zeros((b, s, h))
    res = np.zeros((b, s))
    for bi in range(b):
        for t in range(s):
            blocks = indices[bi, t, :k].astype(np.int64)
            ch = (blocks[:, None] * block + np.arange(block)[None]).reshape(-1)
            xv = x[bi, t].astype(np.float64)
            g = xv @ gate[:, ch].astype(np.float64)
            u = xv @ up[:, ch].astype(np.float64)
            a = g / (1.0 + np.exp(-g)) * u
            y[bi, t] = a @ down[ch].astype(np.float64)
            den = float(a @ a)
            d = np.abs(a) - scores[bi, t, ch].astype(np.float64)
            res[bi, t] = np.sqrt(float(d @ d) / den) if den > 0 else 0.0
    return y.astype(x.dtype), res.astype(x.dtype)


def make_node(inputs: list[str], outputs: list[str], block: int, name: str | None = None) -> onnx.NodeProto:
    """The plugin node as the TensorRT ONNX parser looks it up (op type = plugin name,
    ``plugin_namespace`` / ``plugin_version`` attributes select the registered creator).
    """
    return helper.make_node(
        PLUGIN_NAME,
        inputs,
        outputs,
        name=name,
        domain=DOMAIN,
        block=int(block),
        plugin_namespace=PLUGIN_NAMESPACE,
        plugin_version=PLUGIN_VERSION,
    )


def reference_function(opset: int = 17) -> onnx.FunctionProto:
    """The plugin's semantics as an ONNX function of stock ops (Gather, MatMul, TopK-free).

    Added to a lowered model (:func:`with_reference`), it lets ONNX Runtime on CPU run the very
    graph TensorRT would parse, the function standing in for the plugin.
    """
    n = helper.make_node
    i64 = TensorProto.INT64

    def const(name: str, vals: list[int]) -> onnx.NodeProto:
        return n("Constant", [], [name], value=helper.make_tensor(name, i64, [len(vals)], vals))

    block_attr = helper.make_attribute_ref("value_int", onnx.AttributeProto.INT)
    block_attr.ref_attr_name = "block"
    blk = n("Constant", [], ["blk_s"])
    blk.attribute.append(block_attr)
    nodes = [
        blk,
        const("c0", [0]),
        const("c1", [1]),
        const("m1", [-1]),
        const("c2", [2]),
        const("c23", [2, 3]),
        const("c_big", [2**62]),
        n("Reshape", ["blk_s", "m1"], ["blk"]),  # [1]
        # channel-major blocks: gate/up [H, I] -> [nb, H, b]; down [I, H] -> [nb, b, H]
        n("Shape", ["gate"], ["gshape"]),
        n("Slice", ["gshape", "c0", "c1"], ["h"]),
        n("Concat", ["h", "m1", "blk"], ["g3"], axis=0),
        n("Reshape", ["gate", "g3"], ["gate3"]),
        n("Transpose", ["gate3"], ["gateb"], perm=[1, 0, 2]),
        n("Reshape", ["up", "g3"], ["up3"]),
        n("Transpose", ["up3"], ["upb"], perm=[1, 0, 2]),
        n("Concat", ["m1", "blk", "h"], ["d3"], axis=0),
        n("Reshape", ["down", "d3"], ["downb"]),
        n("Gather", ["gateb", "indices"], ["gsel"], axis=0),  # [B, S, K, H, b]
        n("Gather", ["upb", "indices"], ["usel"], axis=0),
        n("Gather", ["downb", "indices"], ["dsel"], axis=0),  # [B, S, K, b, H]
        n("Unsqueeze", ["x", "c23"], ["x5"]),  # [B, S, 1, 1, H]
        n("MatMul", ["x5", "gsel"], ["g"]),  # [B, S, K, 1, b]
        n("MatMul", ["x5", "usel"], ["u"]),
        n("Sigmoid", ["g"], ["sg"]),
        n("Mul", ["g", "sg"], ["silu"]),
        n("Mul", ["silu", "u"], ["a_all"]),
        # the first `count` indices run: mask [K, 1, 1]
        n("Shape", ["indices"], ["ishape"]),
        n("Slice", ["ishape", "m1", "c_big"], ["kk"]),
        n("Squeeze", ["kk"], ["k_s"]),
        n("Constant", [], ["zero_s"], value=helper.make_tensor("zero_s", i64, [], [0])),
        n("Constant", [], ["one_s"], value=helper.make_tensor("one_s", i64, [], [1])),
        n("Range", ["zero_s", "k_s", "one_s"], ["pos"]),
        n("Cast", ["count"], ["count64"], to=i64),
        n("Less", ["pos", "count64"], ["keep"]),
        n("CastLike", ["keep", "x"], ["keepf"]),
        const("kshape", [-1, 1, 1]),
        n("Reshape", ["keepf", "kshape"], ["mask"]),
        n("Mul", ["a_all", "mask"], ["a"]),  # [B, S, K, 1, b]
        n("MatMul", ["a", "dsel"], ["yk"]),  # [B, S, K, 1, H]
        n("ReduceSum", ["yk", "c23"], ["y"], keepdims=0),  # [B, S, H]
        # residual: scores of the executed channels, gathered per token
        n("Shape", ["scores"], ["sshape"]),
        n("Slice", ["sshape", "c0", "c2"], ["bs"]),
        n("Concat", ["bs", "m1", "blk"], ["s4"], axis=0),
        n("Reshape", ["scores", "s4"], ["sblk"]),  # [B, S, nb, b]
        n("Unsqueeze", ["indices", "m1"], ["idx4"]),  # [B, S, K, 1]
        n("Shape", ["idx4"], ["i4shape"]),
        n("Slice", ["i4shape", "c0", "m1"], ["i3"]),
        n("Concat", ["i3", "blk"], ["e4"], axis=0),
        n("Expand", ["idx4", "e4"], ["idxe"]),
        n("Cast", ["idxe"], ["idxe64"], to=i64),
        n("GatherElements", ["sblk", "idxe64"], ["ssel"], axis=2),  # [B, S, K, b]
        n("Reshape", ["a", "e4"], ["a4"]),
        n("Abs", ["a4"], ["absa"]),
        n("Sub", ["absa", "ssel"], ["diff"]),
        n("Reshape", ["mask", "m1"], ["mask1"]),
        n("Unsqueeze", ["mask1", "m1"], ["mask2"]),  # [K, 1]
        n("Mul", ["diff", "mask2"], ["dm"]),
        n("Mul", ["dm", "dm"], ["d2"]),
        n("Mul", ["a4", "a4"], ["a2"]),
        n("ReduceSum", ["d2", "c23"], ["num"], keepdims=0),  # [B, S]
        n("ReduceSum", ["a2", "c23"], ["den"], keepdims=0),
        n("CastLike", ["zero_s", "den"], ["zero_f"]),
        n("Greater", ["den", "zero_f"], ["pos_den"]),
        n("CastLike", ["one_s", "den"], ["one_f"]),
        n("Where", ["pos_den", "den", "one_f"], ["den_safe"]),
        n("Div", ["num", "den_safe"], ["ratio"]),
        n("Sqrt", ["ratio"], ["root"]),
        n("Where", ["pos_den", "root", "zero_f"], ["residual"]),
    ]
    return helper.make_function(
        DOMAIN,
        PLUGIN_NAME,
        ["x", "scores", "indices", "count", "gate", "up", "down"],
        ["y", "residual"],
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=["block", "plugin_namespace", "plugin_version"],
    )


def with_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a lowered model that ONNX Runtime runs: the plugin defined as a local function."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 17)
    del out.functions[:]
    out.functions.append(reference_function(opset))
    return out
