"""Split fused projections: one MatMul whose columns several branches slice becomes one MatMul each.

transformers' ``OnnxExporter`` keeps Phi-3's fused ``qkv_proj`` (one ``[H, (h + 2 kv) d]`` weight
read by three last-axis ``Slice`` nodes) and ``gate_up_proj`` (one weight, a two-way ``Split``);
our own exporter writes the same model as separate Q/K/V and gate/up projections. Every later
pass (discovery, quantization, fusion, the native step) reads separate projections, so this
pass rewrites the first form into the second:

    y = x @ W;  a = y[..., s0:e0];  b = y[..., s1:e1]   →   a = x @ W[:, s0:e0];  b = x @ W[:, s1:e1]

which is the same arithmetic (each output column is the same dot product). It applies only where
every consumer of the MatMul is a ``Slice`` on the last axis with constant bounds and step 1, or a
``Split`` on the last axis with constant sizes, the weight is a constant 2-D initializer, the
column ranges tile the weight exactly (disjoint, covering it), and the product is not a graph
output. Anything else — a bias added
before the slices — is left as it is, and later passes refuse it by name as before. GPT-NeoX's
per-head interleaved QKV (a Reshape between) has its own rewrite, :class:`DeinterleaveHeadsQKVPass`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from cscompile.passes.graph_utils import const_array


def _ints(value: ir.Value | None) -> list[int] | None:
    """A constant 1-D integer input as a list, or None when it is not constant."""
    arr = const_array(value)
    if arr is None or arr.dtype.kind not in "iu" or arr.ndim > 1:
        return None
    return [int(x) for x in np.atleast_1d(arr)]


def _last_axis(axis: int, rank: int | None) -> bool:
    return axis == -1 or (rank is not None and axis == rank - 1)


def _column_ranges(consumer: ir.Node, n: int, rank: int | None) -> list[tuple[ir.Value, int, int]] | None:
    """``[(output, start, end)]`` for a last-axis Slice/Split of an ``n``-column product, or None."""
    if consumer.domain not in ("", "ai.onnx"):
        return None
    if consumer.op_type == "Slice":
        ins = list(consumer.inputs) + [None] * (5 - len(consumer.inputs))
        starts, ends, axes, steps = (_ints(v) for v in ins[1:5])
        if starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
            return None
        if ins[3] is None:  # axes absent: the first axis only
            return None
        if axes is None or len(axes) != 1 or not _last_axis(axes[0], rank):
            return None
        if ins[4] is not None and steps != [1]:
            return None
        s, e = starts[0], ends[0]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        return [(consumer.outputs[0], s, e)] if s < e else None
    if consumer.op_type == "Split":
        axis_attr = consumer.attributes.get("axis")
        axis = axis_attr.as_int() if axis_attr is not None else 0
        if not _last_axis(axis, rank):
            return None
        outs = list(consumer.outputs)
        if len(consumer.inputs) > 1 and consumer.inputs[1] is not None:
            sizes = _ints(consumer.inputs[1])
            if sizes is None or len(sizes) != len(outs):
                return None
        else:
            k = len(outs)
            if k == 0 or n % k:  # uneven num_outputs splits: not produced by the exporters we read
                return None
            sizes = [n // k] * k
        if sum(sizes) != n or min(sizes) <= 0:
            return None
        bounds = np.cumsum([0, *sizes])
        return [(o, int(bounds[i]), int(bounds[i + 1])) for i, o in enumerate(outs)]
    return None


class SplitFusedProjectionsPass(InPlacePass):
    """One MatMul per column range where a fused projection's product is only ever sliced."""

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        outputs = {id(v) for v in graph.outputs}
        modified = False
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            x, w = node.inputs
            product = node.outputs[0]
            if x is None or w is None or id(product) in outputs:
                continue
            tensor = ir.convenience.get_const_tensor(w)
            if tensor is None or len(tensor.shape) != 2:
                continue
            n = tensor.shape[1]
            if not isinstance(n, int):
                continue
            rank = len(x.shape) if x.shape is not None else None
            users = [u for u, _ in product.uses()]
            if not users or len({id(u) for u in users}) != len(users):
                continue
            ranges: list[tuple[ir.Value, int, int]] = []
            for u in users:
                got = _column_ranges(u, n, rank)
                if got is None:
                    ranges = []
                    break
                ranges += got
            spans = sorted((s, e) for _, s, e in ranges)
            tiled = all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
            if len(ranges) < 2 or spans[0][0] != 0 or spans[-1][1] != n or not tiled:
                continue
            weight = tensor.numpy()
            renames = []
            for out, s, e in ranges:
                part = ir.Value(
                    name=f"{w.name}.cols_{s}_{e}",
                    shape=ir.Shape([weight.shape[0], e - s]),
                    type=ir.TensorType(tensor.dtype),
                    const_value=ir.tensor(
                        np.ascontiguousarray(weight[:, s:e]), name=f"{w.name}.cols_{s}_{e}"
                    ),
                )
                graph.register_initializer(part)
                matmul = ir.node("MatMul", [x, part], name=f"{node.name}.cols_{s}_{e}")
                graph.insert_before(node, matmul)
                matmul.outputs[0].shape = out.shape
                matmul.outputs[0].type = out.type
                ir.convenience.replace_all_uses_with(out, matmul.outputs[0])
                renames.append((matmul.outputs[0], out.name))
            for u in users:
                graph.remove(u, safe=True)
            graph.remove(node, safe=True)
            for value, name in renames:  # the sliced values' names, for discovery's messages
                value.name = name
            modified = True
        return PassResult(model, modified)


def _single_user(value: ir.Value, op: str) -> ir.Node | None:
    users = [u for u, _ in value.uses()]
    if len(users) == 1 and users[0].op_type == op and users[0].domain in ("", "ai.onnx"):
        return users[0]
    return None


class DeinterleaveHeadsQKVPass(InPlacePass):
    """Three Q/K/V projections where a fused one is interleaved per head (GPT-NeoX).

    transformers' ``OnnxExporter`` writes GPT-NeoX's ``query_key_value`` as one MatMul (and bias)
    whose ``3·heads·d`` columns hold, per head, that head's Q, K and V (``d`` each); it reshapes
    the product to ``[..., heads, 3·d]``, transposes (the last axis stays last) and splits the last
    axis into three. This pass gives each of Q, K and V its own MatMul (and bias) over the columns
    ``h·3d + r·d + [0, d)`` of every head ``h`` (``r`` = 0, 1, 2), reshaped to ``[..., heads, d]``
    and transposed the same way: the same dot products, so the same values. It applies only to
    exactly that chain (one user each step, constant shapes, a three-way split into ``d``-wide
    pieces); anything else is left fused and refused by discovery, naming the Reshape.
    """

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            x, w = node.inputs
            tensor = ir.convenience.get_const_tensor(w) if w is not None else None
            if x is None or w is None or tensor is None or len(tensor.shape) != 2:
                continue
            n = tensor.shape[1]
            v: ir.Value = node.outputs[0]
            add = _single_user(v, "Add")
            bias = None
            if add is not None:
                other = add.inputs[1] if add.inputs[0] is v else add.inputs[0]
                bt = ir.convenience.get_const_tensor(other) if other is not None else None
                if bt is None or bt.shape != (n,):
                    continue
                bias = bt.numpy().reshape(-1)
                v = add.outputs[0]
            reshape = _single_user(v, "Reshape")
            shape = _ints(reshape.inputs[1]) if reshape is not None and len(reshape.inputs) > 1 else None
            transpose = _single_user(reshape.outputs[0], "Transpose") if reshape is not None else None
            if reshape is None or shape is None or transpose is None or len(shape) < 3:
                continue
            heads, width = shape[-2], shape[-1]
            perm_attr = transpose.attributes.get("perm")
            perm = perm_attr.as_ints() if perm_attr is not None else None
            split = _single_user(transpose.outputs[0], "Split")
            if heads <= 0 or width <= 0 or width % 3 or heads * width != n or perm is None or split is None:
                continue
            d = width // 3
            if list(perm)[-1] != len(shape) - 1 or len(split.outputs) != 3:
                continue
            axis_attr = split.attributes.get("axis")
            axis = axis_attr.as_int() if axis_attr is not None else 0
            sizes = (
                _ints(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else [d] * 3
            )
            if not _last_axis(axis, len(shape)) or sizes != [d] * 3:
                continue
            weight = tensor.numpy()
            new_shape = ir.tensor(np.array([*shape[:-1], d], np.int64), name=f"{reshape.name}.per_role_shape")
            shape_value = ir.Value(name=new_shape.name, const_value=new_shape)
            graph.register_initializer(shape_value)
            for r, out in enumerate(split.outputs):
                cols = (np.arange(heads)[:, None] * width + r * d + np.arange(d)[None]).reshape(-1)
                part = ir.Value(
                    name=f"{w.name}.role{r}",
                    shape=ir.Shape([weight.shape[0], len(cols)]),
                    type=ir.TensorType(tensor.dtype),
                    const_value=ir.tensor(np.ascontiguousarray(weight[:, cols]), name=f"{w.name}.role{r}"),
                )
                graph.register_initializer(part)
                chain = [ir.node("MatMul", [x, part], name=f"{node.name}.role{r}")]
                if bias is not None:
                    bname = f"{add.name}.role{r}.bias"  # type: ignore[union-attr]
                    bv = ir.Value(
                        name=bname, const_value=ir.tensor(np.ascontiguousarray(bias[cols]), name=bname)
                    )
                    graph.register_initializer(bv)
                    chain.append(ir.node("Add", [chain[-1].outputs[0], bv], name=f"{add.name}.role{r}"))  # type: ignore[union-attr]
                chain.append(
                    ir.node("Reshape", [chain[-1].outputs[0], shape_value], name=f"{reshape.name}.role{r}")
                )
                chain.append(
                    ir.node(
                        "Transpose",
                        [chain[-1].outputs[0]],
                        {"perm": list(perm)},
                        name=f"{transpose.name}.role{r}",
                    )
                )
                for c in chain:
                    graph.insert_before(node, c)
                chain[-1].outputs[0].shape, chain[-1].outputs[0].type = out.shape, out.type
                ir.convenience.replace_all_uses_with(out, chain[-1].outputs[0])
            for dead in (split, transpose, reshape, add, node):
                if dead is not None:
                    graph.remove(dead, safe=True)
            modified = True
        return PassResult(model, modified)
