"""Small dataflow helpers over an ``onnx_ir`` graph, shared by the passes."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

#: Ops that move or reshape data without mixing positions of the hidden dimension's meaning.
SHAPE_OPS = frozenset(
    {
        "Reshape",
        "Transpose",
        "Unsqueeze",
        "Squeeze",
        "Identity",
        "Cast",
        "Flatten",
        "Expand",
        "Slice",
        "Split",
        "Concat",
    }
)


#: Ops whose output depends only on the *shape* of their input: dataflow walks do not cross them.
SHAPE_ONLY = frozenset({"Shape", "Size"})


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer or a Constant node's output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    prod = value.producer()
    if prod is not None and prod.op_type == "Constant" and prod.domain in ("", "ai.onnx"):
        attr = prod.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
    return None


#: ops that pass a tensor's values on unchanged (a dtype, a broadcast, a shape without reordering)
CARRY_OPS = frozenset({"Cast", "Expand", "Unsqueeze", "Squeeze", "Reshape", "Identity"})


def carried_const(value: ir.Value | None, limit: int = 8) -> np.ndarray | None:
    """The constant whose values ``value`` carries unchanged through :data:`CARRY_OPS` (their data
    input), else None: e.g. RoPE's inverse frequencies, which a TorchScript export (optimum's)
    expands to the batch and casts before its ``MatMul`` with the positions.
    """
    for _ in range(limit):
        arr = const_array(value)
        if arr is not None or value is None:
            return arr
        prod = value.producer()
        if prod is None or prod.op_type not in CARRY_OPS or not prod.inputs:
            return None
        value = prod.inputs[0]
    return None


def shape_derived(value: ir.Value | None, limit: int = 64) -> bool:
    """Whether ``value`` is computed only from constants and ``Shape``/``Size`` of tensors (no data)."""
    stack, seen, steps = [value], set(), 0
    while stack:
        v = stack.pop()
        steps += 1
        if v is None or id(v) in seen or const_array(v) is not None:
            continue
        seen.add(id(v))
        prod = v.producer()
        if prod is None or steps > limit:
            return False
        if prod.op_type not in SHAPE_ONLY:
            stack.extend(prod.inputs)
    return True


def static_dim(dim: object) -> int | None:
    """A dimension as an int: ints, and symbolic names that are numbers ("8"), which some exporters write."""
    if isinstance(dim, int):
        return dim
    value = getattr(dim, "value", dim)
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else None


def is_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer()


def transposed_weight(value: ir.Value | None) -> ir.Value | None:
    """``W`` if ``value`` is ``Transpose(W)`` of a 2-D initializer (how some exporters tie an LM head)."""
    prod = value.producer() if value is not None else None
    if (
        prod is None
        or prod.op_type != "Transpose"
        or prod.inputs[0] is None
        or not prod.inputs[0].is_initializer()
    ):
        return None
    perm = prod.attributes.get_ints("perm", None)
    src = prod.inputs[0]
    shape = src.const_value.shape if src.const_value is not None else None
    if shape is None or len(shape) != 2 or (perm is not None and list(perm) != [1, 0]):
        return None
    return src


def weight_of(node: ir.Node) -> ir.Value | None:
    """The constant 2-D weight of a MatMul / Gemm, or None if it multiplies two activations.

    ``MatMul(x, Transpose(W))`` counts as a weight multiply by ``W`` in ``[out, in]`` layout.
    """
    if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if w is None:
        return None
    if not is_initializer(w):
        return transposed_weight(w) if node.op_type == "MatMul" else None
    shape = w.const_value.shape if w.const_value is not None else None
    if shape is None or len(shape) != 2:
        return None
    return w


def consumers(value: ir.Value) -> list[ir.Node]:
    return [n for n, _ in value.uses()]


def forward_reach(
    start: Iterable[ir.Value], stop: Callable[[ir.Node], bool], limit: int = 400
) -> list[tuple[ir.Node, int]]:
    """Nodes satisfying ``stop`` first reached forward from ``start`` (not walking past them),
    with the input slot through which each was reached.
    """
    seen: set[int] = set()
    hits: list[tuple[ir.Node, int]] = []
    queue: deque[ir.Value] = deque(start)
    steps = 0
    while queue and steps < limit:
        v = queue.popleft()
        for node, slot in v.uses():
            steps += 1
            if stop(node):
                if (id(node), slot) not in seen:
                    seen.add((id(node), slot))  # type: ignore[arg-type]
                    hits.append((node, slot))
                continue
            if id(node) in seen or node.op_type in SHAPE_ONLY:
                continue
            seen.add(id(node))
            queue.extend(o for o in node.outputs)
    return hits


def backward_region(
    start: ir.Value, stop: Callable[[ir.Node], bool], limit: int = 400, skip_constants: bool = False
) -> tuple[list[ir.Node], list[ir.Node]]:
    """Walk producers back from ``start``: the nodes passed (``region``) and the ``stop`` nodes hit.

    Initializers end the walk (and Constant outputs with ``skip_constants``); ``Shape``/``Size``
    nodes are never crossed.
    """
    seen: set[int] = set()
    region: list[ir.Node] = []
    hits: list[ir.Node] = []
    queue: deque[ir.Value] = deque([start])
    steps = 0
    while queue and steps < limit:
        v = queue.popleft()
        node = v.producer()
        steps += 1
        if node is None or id(node) in seen or node.op_type in SHAPE_ONLY:
            continue
        seen.add(id(node))
        if stop(node):
            hits.append(node)
            continue
        region.append(node)
        queue.extend(
            i
            for i in node.inputs
            if i is not None
            and not i.is_initializer()
            and not (skip_constants and const_array(i) is not None)
        )
    return region, hits


def backward_reach(start: ir.Value, stop: Callable[[ir.Node], bool], limit: int = 400) -> list[ir.Node]:
    """Nodes satisfying ``stop`` first reached backward from ``start`` (producers, not past them)."""
    return backward_region(start, stop, limit)[1]


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named ``name`` (with shape and dtype set)."""
    v = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    v.shape = ir.Shape(array.shape)
    v.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(v)
    return v


def graph_input_ancestors(
    start: ir.Value, stop: Callable[[ir.Node], bool] | None = None, limit: int = 2000
) -> tuple[list[ir.Value], list[ir.Node]]:
    """Graph inputs that ``start`` depends on, and the nodes passed to reach them.

    The walk does not go through ``stop`` nodes, initializers or ``Shape``/``Size`` nodes.
    """
    inputs: list[ir.Value] = []
    passed: list[ir.Node] = []
    seen: set[int] = set()
    queue: deque[ir.Value] = deque([start])
    steps = 0
    while queue and steps < limit:
        v = queue.popleft()
        steps += 1
        if v.is_graph_input():
            if id(v) not in seen:
                seen.add(id(v))
                inputs.append(v)
            continue
        node = v.producer()
        if (
            node is None
            or id(node) in seen
            or node.op_type in SHAPE_ONLY
            or (stop is not None and stop(node))
        ):
            continue
        seen.add(id(node))
        passed.append(node)
        queue.extend(i for i in node.inputs if i is not None and not i.is_initializer())
    return inputs, passed
