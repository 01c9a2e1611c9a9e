"""Unit discovery: find layers, attention, MLP, norms and the LM head by dataflow.

Node and value names are never used to decide anything (a test runs discovery on a copy with
scrambled names); they are only carried into the :class:`UnitMap` as hints for humans.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from cscompile.errors import UserError
from cscompile.passes.graph_utils import (
    SHAPE_ONLY,
    backward_reach,
    backward_region,
    carried_const,
    const_array,
    forward_reach,
    graph_input_ancestors,
    shape_derived,
    static_dim,
    weight_of,
)
from cscompile.passes.unit_map import MLP, Attention, Layer, Norm, Projection, UnitMap, build_units

#: Op types a graph may contain for this version of discovery (default ONNX domain).
SUPPORTED_OPS = frozenset(
    """Add Sub Mul Div Pow Sqrt Reciprocal Neg Exp Log Tanh Erf Sigmoid Relu Softmax MatMul Gemm Gather
    GatherElements GatherND Reshape Transpose Unsqueeze Squeeze Concat Slice Split Shape Size Expand Cast
    CastLike Constant ConstantOfShape Range CumSum Where Equal Less LessOrEqual Greater GreaterOrEqual And
    Or Not ReduceMean ReduceSum ReduceMax Max Min Identity Trilu Cos Sin LayerNormalization
    SimplifiedLayerNormalization RMSNormalization Gelu Tile Flatten IsNaN Abs Clip ScatterND Mod Floor""".split()
)


class DiscoveryError(UserError):
    """A graph that discovery cannot partition: names the layer or node and the rule that failed."""

    def __init__(self, where: str, rule: str, expected: str) -> None:
        super().__init__(f"unit discovery, {where}", rule, expected)


def _name(node: ir.Node) -> str:
    return node.name or f"<{node.op_type}>"


def check_supported_ops(graph: ir.Graph) -> None:
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            raise DiscoveryError(
                f"node '{_name(node)}'",
                f"op {node.domain + '::' if node.domain else ''}{node.op_type} is outside the supported set",
                "a plain decoder graph (standard ONNX ops; fused ORT contrib ops are not supported yet)",
            )


def _is_weight_mm(node: ir.Node) -> bool:
    return weight_of(node) is not None


def _is_act_mm(node: ir.Node) -> bool:
    return node.op_type == "MatMul" and weight_of(node) is None


def _projection(node: ir.Node, out_slice: tuple[int, int] | None = None) -> Projection:
    w = weight_of(node)
    assert w is not None and w.const_value is not None
    rows, cols = (int(x) for x in w.const_value.shape.numpy())
    trans_b = (node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1) or w is not node.inputs[
        1
    ]
    layout = "out_in" if trans_b else "in_out"
    in_f, out_f = (cols, rows) if trans_b else (rows, cols)
    bias = None
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = node.inputs[2].name
    else:
        uses = list(node.outputs[0].uses())
        if len(uses) == 1 and uses[0][0].op_type == "Add":
            other = uses[0][0].inputs[1 - uses[0][1]]
            arr = const_array(other)
            if other is not None and arr is not None and arr.ndim == 1 and arr.shape[0] == out_f:
                bias = other.name
    if out_slice is not None:
        out_f = out_slice[1] - out_slice[0]
    return Projection(node.name or "", w.name or "", int(in_f), int(out_f), layout, bias, out_slice)


def _region(
    start: ir.Value, stop: Callable[[ir.Node], bool], limit: int = 64
) -> tuple[list[ir.Node], list[ir.Node]]:
    """Nodes walked backward from ``start`` before ``stop`` nodes, and the stop nodes hit."""
    return backward_region(start, stop, limit, skip_constants=True)


def _is_residual_add(node: ir.Node) -> bool:
    if node.op_type != "Add":
        return False
    return all(i is not None and const_array(i) is None for i in node.inputs)


def _norm_before(value: ir.Value, hidden: int, where: str, absent_ok: bool = False) -> tuple[Norm, ir.Value]:
    """The normalization producing ``value`` and the residual value it reads.

    ``absent_ok``: ``value`` may be the residual stream itself (OLMo2 normalizes the branch
    outputs instead), recorded as ``Norm("none", None)``; only then, never a guess.
    """

    def stop(n: ir.Node) -> bool:
        return (
            _is_residual_add(n)
            or _is_weight_mm(n)
            or (n.op_type == "Gather" and n.inputs[0] is not None and n.inputs[0].is_initializer())
        )

    region, hits = _region(value, stop)
    if (
        absent_ok
        and not region
        and len(hits) == 1
        and hits[0].outputs[0] is value
        and not _is_weight_mm(hits[0])
    ):
        return Norm("none", None), value
    if len(hits) != 1:
        raise DiscoveryError(
            where,
            f"normalization input unclear ({len(hits)} candidate residual values)",
            "one residual stream value feeding the norm",
        )
    ops = {n.op_type for n in region}
    weight = bias = None
    for n in region:
        if n.op_type in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"):
            weight = n.inputs[1].name if len(n.inputs) > 1 and n.inputs[1] is not None else None
            bias = n.inputs[2].name if len(n.inputs) > 2 and n.inputs[2] is not None else None
            kind = "layer" if n.op_type == "LayerNormalization" else "rms"
            return Norm(kind, weight, bias), hits[0].outputs[0]
    for n in region:
        if n.op_type == "Add":  # Gemma's (1 + w) spelled out: refused, not read as w plus a bias
            vec = [
                a
                for a in map(const_array, n.inputs)
                if a is not None and a.ndim == 1 and a.shape[0] == hidden
            ]
            scalar = [a for a in map(const_array, n.inputs) if a is not None and a.size == 1]
            if vec and scalar:
                raise DiscoveryError(
                    where,
                    f"norm scale computed as weight + {float(scalar[0].reshape(())):g} (node '{_name(n)}')",
                    "a norm scaled by one constant vector (the offset folded in, as cscompile's exporter does)",
                )
        for i in n.inputs:
            arr = const_array(i)
            if arr is None or arr.ndim != 1 or arr.shape[0] != hidden or i is None:
                continue
            if n.op_type == "Mul":
                weight = i.name
            elif n.op_type == "Add":
                bias = i.name
    if "ReduceMean" not in ops or weight is None:
        raise DiscoveryError(
            where,
            "no normalization (ReduceMean and a scale of the hidden size) before the projections",
            "RMSNorm or LayerNorm",
        )
    kind = "layer" if "Sub" in ops else "rms"
    return Norm(kind, weight, bias), hits[0].outputs[0]


@dataclass
class _AttnMatch:
    q: ir.Node
    k: ir.Node
    v: ir.Node
    o: ir.Node
    qk: ir.Node
    pv: ir.Node
    softmax: ir.Node
    slices: dict[str, tuple[int, int] | None]


def _split_slices(mm: ir.Node, qk: ir.Node, pv: ir.Node, where: str) -> dict[str, tuple[int, int]]:
    """Columns of a fused QKV projection feeding Q (qk slot 0), K (qk slot 1) and V (pv slot 1)."""
    out = mm.outputs[0]
    users = [n for n, _ in out.uses()]
    total = _projection(mm).out_features
    while (
        len(users) == 1
        and users[0].op_type not in ("Split", "Slice")
        and users[0].op_type in ("Add", "Reshape", "Identity")
    ):
        shape = const_array(users[0].inputs[1]) if users[0].op_type == "Reshape" else None
        if shape is not None and shape.size >= 2 and 0 < int(shape[-1]) < total:
            raise DiscoveryError(  # GPT-NeoX: [.., heads, 3·head_dim], split per head
                where,
                f"fused QKV interleaved per head (Reshape '{_name(users[0])}' to {shape.tolist()} "
                "before the split into Q, K and V)",
                "Q, K and V as column ranges of one fused projection, or three projections",
            )
        out = users[0].outputs[0]
        users = [n for n, _ in out.uses()]
    pieces: list[tuple[ir.Value, int, int]] = []
    for n in users:
        if n.op_type == "Split":
            sizes = const_array(n.inputs[1]) if len(n.inputs) > 1 else None
            k = len(n.outputs)
            sizes_l = [int(s) for s in sizes] if sizes is not None else [total // k] * k
            start = 0
            for o, s in zip(n.outputs, sizes_l):
                pieces.append((o, start, start + s))
                start += s
        elif n.op_type == "Slice":
            st, en = const_array(n.inputs[1]), const_array(n.inputs[2])
            if st is None or en is None:
                raise DiscoveryError(
                    where, "fused QKV sliced with non-constant bounds", "constant Slice bounds"
                )
            pieces.append((n.outputs[0], int(st[-1]), min(int(en[-1]), total)))
    found: dict[str, tuple[int, int]] = {}
    for val, a, b in pieces:
        for node, slot in forward_reach([val], lambda n: _is_act_mm(n) or _is_weight_mm(n)):
            if node is qk:
                found["q" if slot == 0 else "k"] = (a, b)
            elif node is pv and slot == 1:
                found["v"] = (a, b)
    if set(found) != {"q", "k", "v"}:
        raise DiscoveryError(
            where, f"fused QKV split into {sorted(found)}", "three column ranges for Q, K and V"
        )
    return found


def _match_attention(softmax: ir.Node, where: str) -> _AttnMatch:
    qks = backward_reach(softmax.inputs[0], _is_act_mm)  # type: ignore[arg-type]
    if len(qks) != 1:
        raise DiscoveryError(
            where,
            f"Softmax '{_name(softmax)}' is not fed by one Q·Kᵀ MatMul",
            "scores = Q·Kᵀ (scaled, masked) → Softmax",
        )
    qk = qks[0]
    pvs = forward_reach(softmax.outputs, _is_act_mm)
    pvs = [(n, s) for n, s in pvs if s == 0]
    if len(pvs) != 1:
        raise DiscoveryError(
            where, f"Softmax '{_name(softmax)}' output is not multiplied by V", "Softmax(scores) · V"
        )
    pv = pvs[0][0]

    def proj_of(value: ir.Value | None, role: str) -> ir.Node:
        hits = backward_reach(value, _is_weight_mm) if value is not None else []  # type: ignore[arg-type]
        hits = list({id(h): h for h in hits}.values())
        if len(hits) != 1:
            raise DiscoveryError(
                where, f"{role} comes from {len(hits)} weight projections", f"exactly one {role} projection"
            )
        return hits[0]

    q = proj_of(qk.inputs[0], "Q")
    k = proj_of(qk.inputs[1], "K")
    v = proj_of(pv.inputs[1], "V")
    os_ = list({id(n): n for n, _ in forward_reach(pv.outputs, _is_weight_mm)}.values())
    if len(os_) != 1:
        raise DiscoveryError(
            where, f"attention output feeds {len(os_)} weight projections", "one output projection O"
        )
    o = os_[0]
    slices: dict[str, tuple[int, int] | None] = {"q": None, "k": None, "v": None}
    if q is k and k is v:
        slices.update(_split_slices(q, qk, pv, where))
    elif len({id(q), id(k), id(v)}) != 3:
        raise DiscoveryError(
            where, "two of Q, K, V share a projection but not all three", "separate or fully fused Q/K/V"
        )
    return _AttnMatch(q, k, v, o, qk, pv, softmax, slices)  # type: ignore[arg-type]


def _cache_io(value: ir.Value | None, graph: ir.Graph) -> tuple[str | None, str | None]:
    """The past-cache graph input feeding ``value`` and the present output written from it."""
    if value is None:
        return None, None
    inputs, _ = graph_input_ancestors(value, _is_weight_mm)
    past = next((v.name for v in inputs if len(v.shape or ()) == 4), None)
    present = None
    if past is not None:
        pin = next(i for i in graph.inputs if i.name == past)
        hits = forward_reach([pin], lambda n: any(o.is_graph_output() for o in n.outputs))
        outs = [o.name for n, _ in hits for o in n.outputs if o.is_graph_output()]
        present = outs[0] if outs else None
    return past, present


def _depends_on_positions(value: ir.Value, past_names: set[str]) -> bool:
    """Whether Q depends on a graph input other than the cache once the projection is left: RoPE."""
    inputs, passed = graph_input_ancestors(value, _is_weight_mm)
    return any(v.name not in past_names for v in inputs) or any(n.op_type in ("Sin", "Cos") for n in passed)


def _head_dim(
    att: _AttnMatch, past_key: str | None, graph: ir.Graph, kv_out: int, q_out: int, where: str
) -> int:
    if past_key is not None:
        pin = next(i for i in graph.inputs if i.name == past_key)
        d = static_dim(pin.shape[3]) if pin.shape is not None and len(pin.shape) == 4 else None
        if d is not None:
            return d
    # No cache input to read it from: take the last dim of a constant reshape on the K path.
    for node in backward_reach(att.qk.inputs[1], lambda n: n.op_type == "Reshape"):  # type: ignore[arg-type]
        shape = const_array(node.inputs[1])
        if shape is not None and shape.size >= 3 and int(shape[-1]) > 0 and kv_out % int(shape[-1]) == 0:
            return int(shape[-1])
    raise DiscoveryError(
        where,
        "head dimension cannot be inferred",
        "a static past_key shape [B, kv_heads, P, head_dim] or a constant reshape",
    )


#: √(2/π) and the cubic coefficient of the tanh approximation of GELU.
_GELU_TANH = (0.7978845608028654, 0.044715)


def _scalars(nodes: list[ir.Node]) -> list[float]:
    out = []
    for n in nodes:
        for i in n.inputs:
            arr = const_array(i)
            if arr is not None and arr.size == 1 and np.issubdtype(arr.dtype, np.floating):
                out.append(float(arr.reshape(())))
    return out


def _has(values: list[float], want: float, rtol: float = 1e-4) -> bool:
    return any(abs(v - want) <= rtol * abs(want) for v in values)


def _gate_activation(act_in: ir.Value, where: str) -> str:
    """The gate activation of a gated MLP, read from the nodes between the projections and down.

    SiLU as ``Sigmoid``/``Silu``/``Swish``; GELU as a ``Gelu`` op (its ``approximate`` attribute),
    as the tanh formula ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` or as the erf formula. Any
    other mixture is refused, naming the ops found.
    """
    region, _ = _region(act_in, _is_weight_mm, limit=64)
    ops = {n.op_type for n in region}
    silu = ops & {"Sigmoid", "Silu", "Swish"}
    gelu = ops & {"Gelu", "Tanh", "Erf"}
    if silu and not gelu:
        return "silu"
    consts = _scalars(region)
    if gelu == {"Gelu"} and not silu:
        approx = {n.attributes.get_string("approximate", "none") for n in region if n.op_type == "Gelu"}
        if approx in ({"tanh"}, {"none"}):
            return "gelu_tanh" if approx == {"tanh"} else "gelu"
    elif gelu == {"Tanh"} and not silu and all(_has(consts, c) for c in _GELU_TANH) and _has(consts, 0.5):
        return "gelu_tanh"
    elif gelu == {"Erf"} and not silu and (_has(consts, 2**-0.5) or _has(consts, 2**0.5)):
        return "gelu"
    raise DiscoveryError(
        where,
        f"gate activation not recognised among {sorted(ops)} (constants {sorted(set(round(c, 6) for c in consts))})",
        "SiLU, or GELU as a Gelu op, the tanh formula (√(2/π), 0.044715) or the erf formula",
    )


def _mlp_between(mms: list[ir.Node], where: str) -> tuple[MLP, ir.Node]:
    if not mms:
        raise DiscoveryError(
            where, "no MLP projections after the attention output", "an MLP (gate/up/down or fc1/fc2)"
        )
    down = mms[-1]
    feeders = backward_reach(down.inputs[0], _is_weight_mm)  # type: ignore[arg-type]
    feeders = list({id(n): n for n in feeders}.values())
    if not set(map(id, feeders)) <= set(map(id, mms[:-1])) or len(feeders) != len(mms) - 1:
        raise DiscoveryError(
            where,
            f"MLP down projection '{_name(down)}' is fed by {len(feeders)} of {len(mms) - 1} projections",
            "gate/up → down or fc1 → fc2",
        )
    if len(feeders) == 2:
        gate = up = None
        act_ops = ("Sigmoid", "Silu", "Swish", "Gelu", "Tanh", "Erf")
        for f in feeders:
            hits = forward_reach(f.outputs, lambda n: n.op_type in act_ops or _is_weight_mm(n))
            if any(n.op_type in act_ops for n, _ in hits):
                gate = f if gate is None else None
                if gate is None:
                    break
            else:
                up = f
        if gate is None or up is None:
            raise DiscoveryError(
                where,
                "two MLP input projections but no activation (SiLU or GELU) on exactly one",
                "a gated MLP: act(gate·x) ⊙ (up·x) with act SiLU (SwiGLU) or GELU (GeGLU)",
            )
        act = _gate_activation(down.inputs[0], where)  # type: ignore[arg-type]
        kind = "swiglu" if act == "silu" else "geglu"
        return MLP(kind, _projection(up), _projection(down), _projection(gate), act), down
    if len(feeders) == 1:
        up_p, down_p = _projection(feeders[0]), _projection(down)
        if up_p.out_features != down_p.in_features:  # a gate_up canonicalize could not split
            raise DiscoveryError(
                where,
                f"MLP input projection '{_name(feeders[0])}' gives {up_p.out_features} columns and the down "
                f"projection '{_name(down)}' takes {down_p.in_features} (a fused gate_up)",
                "separate gate and up projections, or a plain MLP (fc1 → fc2)",
            )
        ops = {n.op_type for n in backward_reach(down.inputs[0], _is_weight_mm, limit=64)}  # type: ignore[arg-type]
        region, _ = _region(down.inputs[0], _is_weight_mm)  # type: ignore[arg-type]
        ops |= {n.op_type for n in region}
        act = (
            "gelu"
            if ops & {"Gelu", "Tanh", "Erf"}
            else "relu"
            if "Relu" in ops
            else "silu"
            if "Sigmoid" in ops
            else "?"
        )
        if act == "?":
            raise DiscoveryError(
                where, f"MLP activation not recognised among {sorted(ops)}", "GELU, ReLU or SiLU"
            )
        return MLP("gelu" if act == "gelu" else act, up_p, down_p, None, act), down
    raise DiscoveryError(where, f"MLP with {len(feeders)} input projections", "SwiGLU (2) or a plain MLP (1)")


def _branch_output_norm(proj: ir.Node, hidden: int, where: str) -> tuple[Norm | None, ir.Node | None]:
    """The norm between a branch's output projection and its residual add, and that add.

    Llama adds the projection (and its bias) straight onto the residual stream; Gemma 3 normalizes
    it first. Anything else between them is refused by :func:`_norm_before`.
    """
    adds = list({id(n): n for n, _ in forward_reach(proj.outputs, _is_residual_add)}.values())
    if len(adds) != 1:
        return None, None
    add = adds[0]
    src = next(
        (i for i in add.inputs if i is not None and any(n is proj for n in backward_reach(i, _is_weight_mm))),
        None,
    )
    if src is None:
        return None, add
    prod = src.producer()
    if prod is proj or (
        prod is not None
        and prod.op_type == "Add"
        and any(i is not None and i.producer() is proj for i in prod.inputs)
        and any(const_array(i) is not None for i in prod.inputs)
    ):
        return None, add
    norm, _ = _norm_before(src, hidden, where)
    return norm, add


def _head_norm(value: ir.Value, head_dim: int, width: int, where: str) -> tuple[Norm | None, bool]:
    """The RMSNorm between a Q or K projection and the score MatMul, and whether it spans the
    projection's full width ``width`` (OLMo2's QK-norm) rather than each head (Qwen3, Gemma 3).

    Per head: a weight of ``head_dim`` entries. Full width: a weight of ``width`` entries and no
    Reshape/Transpose between the projection and the ReduceMean (the mean is over all columns);
    a ``width`` weight after a reshape is refused, not guessed.
    """
    region, _ = _region(value, _is_weight_mm, limit=128)
    if not any(
        n.op_type in ("ReduceMean", "RMSNormalization", "SimplifiedLayerNormalization") for n in region
    ):
        return None, False
    for n in region:
        if n.op_type in ("RMSNormalization", "SimplifiedLayerNormalization", "Mul"):
            for i in n.inputs:
                arr = const_array(i)
                if i is None or arr is None or arr.ndim != 1:
                    continue
                if arr.shape[0] == head_dim:
                    return Norm("rms", i.name), False
                if arr.shape[0] == width and width != head_dim:
                    reduce = [m for m in region if m.op_type in ("ReduceMean", "RMSNormalization",
                                                                 "SimplifiedLayerNormalization")]  # fmt: skip
                    between = {m.op_type for r in reduce for m in _region(r.inputs[0], _is_weight_mm)[0]}  # type: ignore[arg-type]
                    if len(reduce) != 1 or between & {"Reshape", "Transpose"}:
                        raise DiscoveryError(
                            where,
                            f"QK-norm weight '{i.name}' of {width} entries on a reshaped projection",
                            f"a norm per head ({head_dim} entries) or over the whole projection",
                        )
                    return Norm("rms", i.name), True
    return Norm("rms", None), False


#: ops that move or broadcast a tensor without changing its values
_LAYOUT_OPS = ("Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Identity", "Cast")


def _scalar_factor(node: ir.Node, data: ir.Value) -> float | None:
    """The constant scalar ``c`` of ``data · c`` or ``data / c`` at ``node``, else None."""
    if node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    slot = 1 if node.inputs[0] is data else 0 if node.inputs[1] is data else None
    arr = const_array(node.inputs[slot]) if slot is not None else None
    if slot is None or arr is None or arr.size != 1 or not np.issubdtype(arr.dtype, np.floating):
        return None
    c = float(arr.reshape(()))
    if node.op_type == "Div":
        return 1.0 / c if slot == 1 and c != 0 else None
    return c


def _score_facts(softmax: ir.Node, qk: ir.Node) -> tuple[float | None, float | None]:
    """The factor the scores are scaled by, and the soft-cap ``c`` of ``c·tanh(s / c)`` on them
    (Gemma 2; None: none): constant scalars on Q and K before Q·Kᵀ (transformers' exporter
    scales each by √scale) and on the scores between Q·Kᵀ and Softmax (ours), multiplied.

    The scores' path to Softmax may hold only those factors, one soft-cap (a scalar 1/c, Tanh, a
    scalar c), the mask's Add/Where and layout ops; anything else on it leaves the scale unread
    (None). No factor at all is 1.
    """
    factor = 1.0
    for side in qk.inputs[:2]:  # Q, then Kᵀ: back through layout ops to one scalar factor, if any
        v = side
        while v is not None and (n := v.producer()) is not None:
            data = next((i for i in n.inputs if i is not None and const_array(i) is None), None)
            c = _scalar_factor(n, data) if data is not None else None
            if c is not None:
                factor *= c
                break
            if n.op_type not in _LAYOUT_OPS:
                break
            v = n.inputs[0]
    v = qk.outputs[0]
    cap: float | None = None
    last: float | None = None  # the scalar factor of the previous node on the path
    closing = False  # after Tanh: the next node must be the factor c of the soft-cap
    for _ in range(16):
        uses = [n for n, _ in v.uses()]
        if len(uses) != 1:
            return None, None
        n = uses[0]
        if n is softmax:
            return (None, None) if closing else (factor, cap)
        c = _scalar_factor(n, v)
        if closing:
            if c is None or cap is None or abs(c - cap) > 1e-6 * cap:
                return None, None
            closing, last = False, None
        elif n.op_type == "Tanh":
            if last is None or cap is not None or not last > 0:
                return None, None
            factor /= last
            cap, closing = 1.0 / last, True
        elif c is not None:
            factor *= c
        elif n.op_type not in (*_LAYOUT_OPS, "Add", "Where"):
            return None, None
        last = c if not closing and n.op_type != "Tanh" else None
        v = n.outputs[0]
    return None, None


def _rope(q_out: ir.Value, head_dim: int) -> tuple[float | None, int | None]:
    """θ and the rotary width from the inverse-frequency table that Q's rotation is built from."""
    inputs, passed = graph_input_ancestors(q_out, _is_weight_mm)
    tables: list[np.ndarray] = []
    for n in passed:
        if n.op_type not in ("Mul", "MatMul"):  # MatMul: transformers' inv_freq @ positions
            continue
        for i in n.inputs:
            arr = carried_const(i)  # optimum's (TorchScript) export expands and casts it first
            if (
                arr is not None
                and np.issubdtype(arr.dtype, np.floating)
                and arr.ndim >= 1
                and arr.size > 1
                and arr.size * 2 <= head_dim
            ):
                t = np.asarray(arr, np.float64).ravel()
                if not any(np.array_equal(t, x) for x in tables):
                    tables.append(t)
    if len(tables) != 1:
        return None, None
    inv = tables[0]
    rot = 2 * inv.size
    if inv[0] != 1.0 or not np.all(inv > 0):
        return None, rot
    base = float(inv[-1] ** (-rot / (2 * (inv.size - 1))))
    want = base ** (-np.arange(inv.size) * 2.0 / rot)
    return (float(f"{base:.6g}") if np.allclose(inv, want, rtol=1e-4) else None), rot


def _rope_scale(q_out: ir.Value) -> float | None:
    """The factor RoPE's cos and sin are multiplied by (YaRN's attention factor), None when 1.

    Read forward from each ``Cos``/``Sin`` on Q's path through layout ops and scalar factors.
    """
    _, passed = graph_input_ancestors(q_out, _is_weight_mm)
    found: dict[str, set[float]] = {}
    for n in passed:
        if n.op_type not in ("Cos", "Sin"):
            continue
        v, c = n.outputs[0], 1.0
        for _ in range(8):
            uses = [u for u, _ in v.uses()]
            if len(uses) != 1:
                break
            f = _scalar_factor(uses[0], v)
            if f is None and uses[0].op_type not in _LAYOUT_OPS:
                break
            c *= 1.0 if f is None else f
            v = uses[0].outputs[0]
        found.setdefault(n.op_type, set()).add(float(f"{c:.6g}"))
    values = set().union(*found.values()) if found else set()
    if len(values) > 1:
        raise DiscoveryError(
            "RoPE", f"cos and sin scaled by different factors {sorted(values)}", "one factor on both"
        )
    c = values.pop() if values else 1.0
    return None if c == 1.0 else c


def _mask_value(softmax: ir.Node, qk: ir.Node) -> ir.Value | None:
    """The additive mask entering the scores: the non-score input of an Add before Softmax."""
    region, _ = _region(softmax.inputs[0], lambda n: n is qk, limit=16)  # type: ignore[arg-type]
    for n in region:
        if n.op_type == "Add":
            for i in n.inputs:
                if i is not None and not any(m is qk for m in backward_reach(i, lambda x: x is qk, limit=16)):
                    if const_array(i) is None:
                        return _mask_source(i)
    return None


#: per-layer ops that take a shared mask to a layer (TorchScript exports, optimum's: each layer
#: slices the model's mask to its key length and turns it additive), with their data input
_MASK_CARRY = {"Slice": 0, "Where": 0, "Cast": 0, "Expand": 0, "Unsqueeze": 0, "Squeeze": 0, "Reshape": 0,
               "Identity": 0}  # fmt: skip


def _mask_source(v: ir.Value) -> ir.Value:
    """The mask ``v`` is made from by :data:`_MASK_CARRY` ops whose other inputs are constants or
    shapes only (a Where's two values constants): layers reading the same source share a mask.
    """
    for _ in range(16):
        prod = v.producer()
        if prod is None or prod.op_type not in _MASK_CARRY:
            return v
        data = prod.inputs[_MASK_CARRY[prod.op_type]]
        others = [x for j, x in enumerate(prod.inputs) if j != _MASK_CARRY[prod.op_type] and x is not None]
        if prod.op_type == "Where":
            ok = all(const_array(x) is not None for x in others)
        else:
            ok = all(shape_derived(x) for x in others)
        if data is None or not ok:
            return v
        v = data
    return v


def _window_constant(nodes: list[ir.Node]) -> int | None:
    """The one integer constant > 1 that ``nodes`` (Sub/Add of a mask) subtract or add, else None."""
    cands = set()
    for n in nodes:
        if n.op_type not in ("Sub", "Add"):
            continue
        for i in n.inputs:
            arr = const_array(i)
            if arr is not None and arr.size == 1 and np.issubdtype(arr.dtype, np.integer):
                if int(arr.reshape(())) > 1:
                    cands.add(int(arr.reshape(())))
    return cands.pop() if len(cands) == 1 else None


def _windows(masks: list[ir.Value | None], where: str) -> tuple[list[int], list[int | None]]:
    """Mask groups per layer and the window of each windowed group.

    Layers reading the same mask value share a group; group 0 is the one with the fewest nodes
    (the causal mask). Another group's window is the one integer constant that its mask subtracts
    from a position and the causal mask does not; when that is not exactly one, the window is
    ``None`` (unread: code that needs it refuses). Group 0's own window (every layer windowed, as
    in Mistral) is the one integer constant above 1 that its mask adds or subtracts, if any.
    """
    distinct: list[ir.Value | None] = []
    for m in masks:
        if not any(m is d for d in distinct):
            distinct.append(m)
    regions = {
        id(d): (set(map(id, graph_input_ancestors(d)[1])), graph_input_ancestors(d)[1])
        if d is not None
        else (set(), [])
        for d in distinct
    }
    distinct.sort(key=lambda d: len(regions[id(d)][0]))
    base_ids = regions[id(distinct[0])][0]
    windows: list[int | None] = [_window_constant(regions[id(distinct[0])][1])]
    for d in distinct[1:]:
        windows.append(_window_constant([n for n in regions[id(d)][1] if id(n) not in base_ids]))
    groups = [next(j for j, d in enumerate(distinct) if d is m) for m in masks]
    return groups, [windows[g] for g in groups]


def _embedding_scale(emb_gather: ir.Node) -> float | None:
    # Shape/Size uses read the shape only (optimum's Gemma 2: the cache positions from it)
    uses = [n for n, _ in emb_gather.outputs[0].uses() if n.op_type not in SHAPE_ONLY]
    if len(uses) == 1 and uses[0].op_type == "Mul":
        for i in uses[0].inputs:
            arr = const_array(i)
            if arr is not None and arr.size == 1:
                return float(arr.reshape(()))
    return None


def _logit_softcap(head: ir.Node, graph: ir.Graph) -> float | None:
    """The c of ``c·tanh(logits / c)`` between the LM head and the logits output, else None."""
    out: ir.Value | None = next(o for o in graph.outputs if o.name == "logits")
    chain: list[ir.Node] = []  # the data path back to the head (shape inputs of Reshape left out)
    while out is not None and (node := out.producer()) is not None and node is not head and len(chain) < 16:
        chain.append(node)
        data = [i for i in node.inputs[: 1 if node.op_type == "Reshape" else None] if const_array(i) is None]
        out = data[0] if len(data) == 1 else None
    ops = {n.op_type for n in chain}
    if "Tanh" not in ops:
        return None
    divs = _scalars([n for n in chain if n.op_type == "Div"])
    muls = _scalars([n for n in chain if n.op_type == "Mul"])
    if ops <= {"Tanh", "Mul", "Div", "Reshape", "Identity", "Cast"} and len(divs) + len(muls) == 2:
        if len(divs) == 1 and len(muls) == 1 and abs(divs[0] - muls[0]) <= 1e-6 * abs(muls[0]):
            return muls[0]
        if len(muls) == 2 and abs(muls[0] * muls[1] - 1) <= 1e-6:
            return max(muls)
    raise DiscoveryError(
        "LM head",
        f"a Tanh between the LM head and the logits, ops {sorted(ops)}",
        "c·tanh(logits / c) (logit soft-capping)",
    )


def _architecture(layers: list[Layer], emb_scale: float | None, softcap: float | None) -> str:
    l0 = layers[0]
    post = any(x.attn_output_norm is not None or x.mlp_output_norm is not None for x in layers)
    qkn = any(x.attention.q_norm is not None for x in layers)
    if l0.mlp.kind == "swiglu" and l0.input_norm.kind == "rms" and not post and not qkn:
        if emb_scale is None and softcap is None and all(x.attention.mask_group == 0 for x in layers):
            return "llama"
    if l0.mlp.kind == "geglu" and l0.mlp.activation == "gelu_tanh" and post and qkn and emb_scale is not None:
        return "gemma3"
    if l0.mlp.kind == "gelu" and l0.input_norm.kind == "layer" and not post and not qkn:
        return "gpt2"
    return "decoder"


def _lm_head(graph: ir.Graph, logits_name: str) -> ir.Node:
    out = next((o for o in graph.outputs if o.name == logits_name), None)
    if out is None:
        raise DiscoveryError(
            "graph outputs", f"no '{logits_name}' output", "a causal LM with a logits output"
        )
    hits = backward_reach(out, _is_weight_mm)
    if len(hits) != 1:
        raise DiscoveryError(
            "LM head", f"logits come from {len(hits)} weight projections", "one LM head projection"
        )
    return hits[0]


def discover_units(model: ir.Model, block_size: int = 1) -> UnitMap:
    """Partition ``model`` (topologically sorted) into a :class:`UnitMap`. Block size is checked later."""
    graph = model.graph
    check_supported_ops(graph)
    ids = next((i for i in graph.inputs if i.name == "input_ids"), None)
    if ids is None:
        raise DiscoveryError("graph inputs", "no 'input_ids'", "a decoder LM with an input_ids input")
    emb_gather = next(
        (
            n
            for n, s in ids.uses()
            if n.op_type == "Gather" and s == 1 and n.inputs[0] is not None and n.inputs[0].is_initializer()
        ),
        None,
    )
    if emb_gather is None:
        raise DiscoveryError(
            "embedding", "input_ids does not index an embedding table", "Gather(embedding, input_ids)"
        )
    emb = emb_gather.inputs[0]
    assert emb is not None and emb.const_value is not None
    vocab, hidden = (int(x) for x in emb.const_value.shape.numpy())
    pos_emb = None
    for gi in graph.inputs:
        for n, s in gi.uses():
            if (
                n.op_type == "Gather"
                and s == 1
                and n is not emb_gather
                and n.inputs[0] is not None
                and n.inputs[0].is_initializer()
            ):
                pos_emb = n.inputs[0].name

    order = {id(n): i for i, n in enumerate(graph)}
    head = _lm_head(graph, "logits")
    softmaxes = [n for n in graph if n.op_type == "Softmax"]
    if not softmaxes:
        raise DiscoveryError("graph", "no attention (no Softmax)", "a decoder with self-attention layers")
    past_names = {i.name for i in graph.inputs if i.name and len(i.shape or ()) == 4}
    matches = [_match_attention(s, f"attention #{j} (Softmax '{_name(s)}')") for j, s in enumerate(softmaxes)]
    matches.sort(key=lambda m: order[id(m.q)])
    weight_mms = [n for n in graph if _is_weight_mm(n)]
    groups, windows = _windows([_mask_value(m.softmax, m.qk) for m in matches], "attention masks")
    layers: list[Layer] = []
    for li, att in enumerate(matches):
        where = f"layer {li}"
        nxt = order[id(matches[li + 1].q)] if li + 1 < len(matches) else order[id(head)]
        mlp_mms = [n for n in weight_mms if order[id(att.o)] < order[id(n)] < nxt and n is not head]
        mlp, down = _mlp_between(mlp_mms, where)
        past_k, present_k = _cache_io(att.qk.inputs[1], graph)
        past_v, present_v = _cache_io(att.pv.inputs[1], graph)
        q = _projection(att.q, att.slices["q"])
        k = _projection(att.k, att.slices["k"])
        v = _projection(att.v, att.slices["v"])
        o = _projection(att.o)
        d = _head_dim(att, past_k, graph, k.out_features, q.out_features, where)
        if q.out_features % d or k.out_features % d or (q.out_features // d) % (k.out_features // d):
            raise DiscoveryError(
                where,
                f"Q {q.out_features} / K {k.out_features} columns with head_dim {d}",
                "whole heads, query heads a multiple of KV heads",
            )
        attn_in = att.q.inputs[0]
        assert attn_in is not None
        attn_out_norm, _ = _branch_output_norm(att.o, hidden, f"{where} attention output norm")
        mlp_out_norm, out_add = _branch_output_norm(down, hidden, f"{where} MLP output norm")
        # no norm before a branch only where its output is normalized (OLMo2's post-norm layers)
        in_norm, resid_in = _norm_before(attn_in, hidden, f"{where} input norm", attn_out_norm is not None)
        mlp_in = mlp_mms[0].inputs[0]
        assert mlp_in is not None
        post_norm, mlp_resid = _norm_before(
            mlp_in, hidden, f"{where} post-attention norm", mlp_out_norm is not None
        )
        if mlp_resid is resid_in:  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            raise DiscoveryError(
                where,
                f"parallel residual (the MLP's norm reads the layer input '{resid_in.name}', as the attention's does)",
                "a sequential layer: the MLP reads the residual after the attention is added",
            )
        q_norm, q_full = _head_norm(att.qk.inputs[0], d, q.out_features, f"{where} Q norm")  # type: ignore[arg-type]
        k_norm, k_full = _head_norm(att.qk.inputs[1], d, k.out_features, f"{where} K norm")  # type: ignore[arg-type]
        if q_full != k_full:
            raise DiscoveryError(
                where,
                "QK-norm over the full width on one of Q and K only",
                "both per head or both full width",
            )
        resid_out = out_add.outputs[0] if out_add is not None else down.outputs[0]
        rope_base, rotary_dim = _rope(att.qk.inputs[0], d)  # type: ignore[arg-type]
        scores = _score_facts(att.softmax, att.qk)
        layers.append(
            Layer(
                index=li,
                input_norm=in_norm,
                attention=Attention(
                    q,
                    k,
                    v,
                    o,
                    num_heads=q.out_features // d,
                    num_kv_heads=k.out_features // d,
                    head_dim=d,
                    rope=_depends_on_positions(att.qk.inputs[0], past_names),  # type: ignore[arg-type]
                    past_key=past_k,
                    past_value=past_v,
                    present_key=present_k,
                    present_value=present_v,
                    fused_qkv=att.q is att.k,
                    q_norm=q_norm,
                    k_norm=k_norm,
                    qk_norm_full=q_full,
                    score_scale=scores[0],
                    attn_softcap=scores[1],
                    rope_base=rope_base,
                    rotary_dim=rotary_dim,
                    rope_scale=_rope_scale(att.qk.inputs[0]),  # type: ignore[arg-type]
                    mask_group=groups[li],
                    window=windows[li],
                ),  # fmt: skip
                post_attention_norm=post_norm,
                attn_output_norm=attn_out_norm,
                mlp_output_norm=mlp_out_norm,
                mlp=mlp,
                residual_in=resid_in.name or "",
                residual_out=resid_out.name or "",
                attn_input=attn_in.name or "",
                mlp_input=mlp_in.name or "",
                mlp_act=down.inputs[0].name or "",  # type: ignore[union-attr]
                attn_context=att.o.inputs[0].name or "",  # type: ignore[union-attr]
            )
        )
    head_in = head.inputs[0]
    assert head_in is not None
    final_norm, _ = _norm_before(head_in, hidden, "final norm")
    lm = _projection(head)
    hw = weight_of(head)
    tied = hw is emb
    if not tied and hw is not None and hw.const_value is not None and hw.const_value.shape == (hidden, vocab):
        tied = bool(np.array_equal(hw.const_value.numpy(), emb.const_value.numpy().T))
    emb_scale = _embedding_scale(emb_gather)
    softcap = _logit_softcap(head, graph)
    arch = _architecture(layers, emb_scale, softcap)
    unit_map = UnitMap(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        embedding=emb.name or "",
        lm_head=lm,
        lm_head_tied=tied,
        final_norm=final_norm,
        layers=layers,
        block_size=block_size,
        position_embedding=pos_emb,
        embedding_scale=emb_scale,
        logit_softcap=softcap,
    )
    unit_map.units = build_units(layers, block_size)
    return unit_map
