"""Cut a decoder graph into per-layer ONNX segments around its FFNs.

A motif engine on CPU is: ONNX Runtime for everything but the FFNs (embedding, attention,
norms, LM head) and the channel-sparse kernel (``cscompile.motifs.kernel``) for each FFN,
because no stock ORT op can skip channel rows without copying them. The graph is therefore
cut at every FFN:

- ``seg0``: embedding, everything that depends only on positions and the mask (RoPE tables,
  the causal mask: computed once per step and handed to the other segments), and layer 0 up
  to its FFN input. Outputs: ``mid`` (the residual after attention), ``x`` (the normed FFN
  input), the layer's present K/V, and the shared position tensors.
- ``seg{l}`` for ``l ≥ 1``: from the previous layer's residual output to this layer's FFN
  input, the same outputs.
- ``head``: the last residual → final norm → LM head → logits.

- ``kv{l}`` for ``l ≥ 1``: the same input as ``seg{l}``, only the layer's present K/V (input norm,
  K and V projections, RoPE, the cache concat). A motif that *skips* layer ``l`` for a token runs
  this instead of ``seg{l}`` and the FFN: the residual passes through unchanged, and the cache
  still gets the token's K/V, so a later token that runs the layer attends to a complete cache
  (every motif shares one cache layout; skipping never loses history).

The runtime computes ``mid += FFN(x)`` in between. Segments carry *hollow* initializers (type
and shape, no data): every session gets the weights through ``SessionOptions.add_initializer``
from one shared store, so all engines of a bundle hold a single copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from cscompile.errors import UserError
from cscompile.passes.unit_map import UnitMap

MID, X = "cs_mid", "cs_x"
HIDDEN_IN = "cs_hidden"
#: external-data location of hollow initializers (a name, never a file that is read)
SHARED_LOCATION = "cscompile-shared-weights"


@dataclass
class Segment:
    """One ONNX segment: its serialized model and its interface (names inside the segment)."""

    name: str
    model: bytes
    inputs: list[str]
    outputs: list[str]
    weights: list[str]  # initializer names supplied from the shared store


@dataclass
class FFNWeights:
    gate: np.ndarray  # [I, H]
    up: np.ndarray  # [I, H]
    down: np.ndarray  # [H, I]


@dataclass
class SegmentPlan:
    segments: list[Segment]
    shared: list[str]  # position/mask tensors produced by seg0 and read by later segments
    store: dict[str, np.ndarray]  # every initializer the segments use
    ffn: list[FFNWeights]
    hidden_size: int
    present: list[tuple[str, str]] = field(default_factory=list)
    past: list[tuple[str, str]] = field(default_factory=list)
    #: per layer, the K/V-only segment a skipped layer runs (None for layer 0: never skipped)
    kv_segments: list[Segment | None] = field(default_factory=list)


def _producer_index(graph: ir.Graph) -> dict[int, int]:
    return {id(n): i for i, n in enumerate(graph)}


def _hidden_dependent(start: ir.Value) -> set[int]:
    """Ids of every value forward-reachable from ``start`` (through any node)."""
    seen: set[int] = {id(start)}
    stack = [start]
    while stack:
        v = stack.pop()
        for node, _ in v.uses():
            for o in node.outputs:
                if id(o) not in seen:
                    seen.add(id(o))
                    stack.append(o)
    return seen


def find_value(graph: ir.Graph, name: str) -> ir.Value:
    for node in graph:
        for o in node.outputs:
            if o.name == name:
                return o
    for v in graph.inputs:
        if v.name == name:
            return v
    raise UserError("motif lowering", f"the graph has no value named '{name}'", "the unit map of this graph")


def _weight_array(value: ir.Value) -> np.ndarray:
    assert value.const_value is not None
    return np.asarray(value.const_value.numpy())


def _ffn_weights(graph: ir.Graph, um: UnitMap, layer: int) -> FFNWeights:
    mlp = um.layers[layer].mlp
    if mlp.kind != "swiglu" or mlp.gate is None:
        raise UserError(
            "motif lowering",
            f"layer {layer} has a '{mlp.kind}' FFN",
            "a SwiGLU FFN (Llama/Qwen/Mistral family); other FFNs run dense",
        )
    inits = graph.initializers

    def rows(p) -> np.ndarray:  # noqa: ANN001 - a Projection; returns [out, in]
        w = _weight_array(inits[p.weight])
        w = w.T if p.weight_layout == "in_out" else w
        if p.out_slice is not None:
            w = w[p.out_slice[0] : p.out_slice[1]]
        if p.bias is not None:
            raise UserError("motif lowering", f"layer {layer} FFN has biases", "a bias-free SwiGLU FFN")
        return np.ascontiguousarray(w, dtype=np.float32)

    gate, up = rows(mlp.gate), rows(mlp.up)
    down = rows(mlp.down)  # [H, I]
    return FFNWeights(gate=gate, up=up, down=down)


def down_output_and_mid(graph: ir.Graph, um: UnitMap, layer: int) -> tuple[ir.Value, ir.Value]:
    """The layer's residual output ``Add(mid, ffn_out)``: returns ``(mid, residual_out)``."""
    out = find_value(graph, um.layers[layer].residual_out)
    add = out.producer()
    act = find_value(graph, um.layers[layer].mlp_act)
    if add is None or add.op_type != "Add":
        raise UserError(
            "motif lowering", f"layer {layer} does not end in a residual Add", "a pre-norm decoder"
        )
    # the input of the Add that the FFN does not feed is the post-attention residual
    for i, v in enumerate(add.inputs):
        other = add.inputs[1 - i]
        if v is None or other is None:
            continue
        if _depends_on(v, act):
            return other, out
    raise UserError("motif lowering", f"layer {layer}: FFN output not found", "a residual FFN")


def _depends_on(v: ir.Value, target: ir.Value, limit: int = 200) -> bool:
    stack, seen = [v], set[int]()
    while stack and len(seen) < limit:
        x = stack.pop()
        if x is target:
            return True
        if id(x) in seen:
            continue
        seen.add(id(x))
        p = x.producer()
        if p is not None:
            stack.extend(i for i in p.inputs if i is not None and not i.is_initializer())
    return False


#: what the motif engines lower (the ``expected`` of their refusal)
LOWERS = "a Llama-family decoder (RMSNorm, RoPE, a bias-free SwiGLU FFN; Llama/Qwen/Mistral)"


def lowering_refusal(um: UnitMap) -> str | None:
    """Why the motif engines cannot lower the model of ``um`` (one phrase), or None when they can.

    Read from the unit map alone, so a build refuses ``--motifs`` right after its analysis, before
    the expensive steps (the segments' own checks stay, for what only the graph shows).
    """
    deviations = um.llama_deviations()  # the motif layer is Llama's: refuse what it does not compute
    if deviations:
        return deviations[0]
    for lay in um.layers:
        m = lay.mlp
        if m.kind != "swiglu" or m.gate is None:
            return f"layer {lay.index} has a '{m.kind}' FFN"
        if any(p.bias is not None for p in (m.gate, m.up, m.down)):
            return f"layer {lay.index} FFN has biases"
    return None


def plan_segments(model: ir.Model, um: UnitMap) -> SegmentPlan:
    """Cut ``model`` (canonicalized, with its unit map) into layer segments."""
    graph = model.graph
    why = lowering_refusal(um)
    if why is not None:
        raise UserError("motif lowering", why, LOWERS)
    order = _producer_index(graph)
    embed_out = next(
        (
            o
            for n in graph
            if n.op_type == "Gather"
            for o in n.outputs
            if n.inputs[0] is graph.initializers.get(um.embedding)
        ),
        None,
    )
    if embed_out is None:
        raise UserError("motif lowering", "no embedding Gather found", "a decoder with a token embedding")
    hidden = _hidden_dependent(embed_out)
    n_layers = um.num_layers
    mids, outs = zip(*(down_output_and_mid(graph, um, layer) for layer in range(n_layers)))
    xs = [find_value(graph, um.layers[layer].mlp_input) for layer in range(n_layers)]
    graph_outputs = {v.name: v for v in graph.outputs}
    logits = graph.outputs[0]
    presents = []
    for lay in um.layers:
        a = lay.attention
        if not (a.present_key and a.present_value and a.past_key and a.past_value):
            raise UserError("motif lowering", f"layer {lay.index} has no KV cache I/O", "a KV-cache decoder")
        presents.append((a.present_key, a.present_value))

    store: dict[str, np.ndarray] = {}
    shared: dict[str, ir.Value] = {}

    def region(
        outputs: list[ir.Value], boundary: dict[int, str], first: bool
    ) -> tuple[list[ir.Node], list[ir.Value]]:
        """Nodes needed for ``outputs``; the segment inputs met on the way (graph inputs,
        boundary values, and — outside seg0 — position-only values computed by seg0).
        """
        nodes: dict[int, ir.Node] = {}
        inputs: dict[int, ir.Value] = {}
        stack = list(outputs)
        seen: set[int] = set()
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            if id(v) in boundary or v.is_graph_input():
                inputs[id(v)] = v
                continue
            if v.is_initializer():
                continue
            p = v.producer()
            if p is None:
                raise UserError("motif lowering", f"value '{v.name}' has no producer", "a well-formed graph")
            if not first and id(v) not in hidden and p.op_type != "Constant":
                shared[v.name or ""] = v
                inputs[id(v)] = v
                continue
            nodes[id(p)] = p
            stack.extend(i for i in p.inputs if i is not None)
            for attr in p.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    raise UserError(
                        "motif lowering", f"node {p.name} has a subgraph", "a graph without control flow"
                    )
        ordered = sorted(nodes.values(), key=lambda n: order[id(n)])
        return ordered, list(inputs.values())

    raw: list[tuple[str, list[ir.Node], list[ir.Value], list[tuple[ir.Value, str]]]] = []
    for layer in range(n_layers):
        pk, pv = presents[layer]
        outs_l = [(mids[layer], MID), (xs[layer], X), (graph_outputs[pk], pk), (graph_outputs[pv], pv)]
        boundary = {} if layer == 0 else {id(outs[layer - 1]): HIDDEN_IN}
        nodes, ins = region([v for v, _ in outs_l], boundary, first=layer == 0)
        raw.append((f"seg{layer}", nodes, ins, outs_l))
    nodes, ins = region([logits], {id(outs[-1]): HIDDEN_IN}, first=False)
    raw.append(("head", nodes, ins, [(logits, logits.name or "logits")]))

    # seg0 also produces every shared position tensor the others read
    shared_vals = sorted(shared.values(), key=lambda v: order[id(v.producer())])  # type: ignore[arg-type]
    if shared_vals:
        name0, _, _, outs0 = raw[0]
        outs0 = outs0 + [(v, v.name or "") for v in shared_vals]
        nodes0, ins0 = region([v for v, _ in outs0], {}, first=True)
        raw[0] = (name0, nodes0, ins0, outs0)

    segments = []
    for name, nodes, ins, seg_outs in raw:
        segments.append(_serialize(model, name, nodes, ins, seg_outs, outs, store))
    kv_segments: list[Segment | None] = [None]
    known = {HIDDEN_IN, *(v.name for v in shared_vals), *(v.name for v in graph.inputs)}
    for layer in range(1, n_layers):
        pk, pv = presents[layer]
        kv_outs = [(graph_outputs[pk], pk), (graph_outputs[pv], pv)]
        nodes, ins = region([v for v, _ in kv_outs], {id(outs[layer - 1]): HIDDEN_IN}, first=False)
        seg = _serialize(model, f"kv{layer}", nodes, ins, kv_outs, outs, store)
        if not set(seg.inputs) <= known:
            raise UserError("motif lowering", f"layer {layer}'s K/V needs {sorted(set(seg.inputs) - known)}",
                            "K/V computed from the layer input and the shared position tensors")  # fmt: skip
        kv_segments.append(seg)
    ffn = [_ffn_weights(graph, um, layer) for layer in range(n_layers)]
    past = [(lay.attention.past_key or "", lay.attention.past_value or "") for lay in um.layers]
    return SegmentPlan(
        segments=segments,
        shared=[v.name or "" for v in shared_vals],
        store=store,
        ffn=ffn,
        hidden_size=um.hidden_size,
        present=presents,
        past=past,
        kv_segments=kv_segments,
    )


def _value_info(v: ir.Value, name: str) -> onnx.ValueInfoProto:
    proto = ir.serde.serialize_value(v)
    proto.name = name
    return proto


def _serialize(
    model: ir.Model,
    name: str,
    nodes: list[ir.Node],
    ins: list[ir.Value],
    outs: list[tuple[ir.Value, str]],
    residual_outs: tuple[ir.Value, ...],
    store: dict[str, np.ndarray],
) -> Segment:
    rename: dict[str, str] = {}
    for v in ins:
        if v in residual_outs:
            rename[v.name or ""] = HIDDEN_IN
    for v, new in outs:
        rename[v.name or ""] = new
    node_protos = []
    weights: dict[str, ir.Value] = {}
    for n in nodes:
        p = ir.serde.serialize_node(n)
        p.input[:] = [rename.get(i, i) for i in p.input]
        p.output[:] = [rename.get(o, o) for o in p.output]
        node_protos.append(p)
        for i in n.inputs:
            if i is not None and i.is_initializer():
                weights[i.name or ""] = i
    inits = []
    for wname, v in weights.items():
        arr = _weight_array(v)
        store.setdefault(wname, arr)
        if arr.size <= 64:  # small constants keep their data (scalars of shape arithmetic)
            t = onnx.numpy_helper.from_array(arr, wname)
        else:  # data supplied at session creation (add_external_initializers), never copied
            t = onnx.TensorProto(name=wname, data_type=int(v.const_value.dtype))  # type: ignore[union-attr]
            t.dims.extend(arr.shape)
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, val in (("location", SHARED_LOCATION), ("offset", "0"), ("length", str(arr.nbytes))):
                t.external_data.add(key=key, value=val)
        inits.append(t)
    graph = onnx.helper.make_graph(
        node_protos,
        name,
        [_value_info(v, rename.get(v.name or "", v.name or "")) for v in ins],
        [_value_info(v, new) for v, new in outs],
        inits,
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    return Segment(
        name=name,
        model=proto.SerializeToString(),
        inputs=[rename.get(v.name or "", v.name or "") for v in ins],
        outputs=[new for _, new in outs],
        weights=[w for w in weights if _weight_array(weights[w]).size > 64],
    )
