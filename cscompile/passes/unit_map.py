"""The unit map: which structured units a decoder has and which weights each one owns.

Produced by :class:`~cscompile.passes.discover.DiscoverUnitsPass` from the graph's dataflow
(names are hints only) and consumed by alignment, permutation, instrumentation, calibration
and motif lowering. Versioned and JSON-serializable; ``UnitMap.from_json(m.to_json()) == m``.

Units, per layer ``l``:

- ``L{l}.attn.g{j}``: KV group ``j`` — its ``G = heads / kv_heads`` query heads (rows of Q,
  columns of O) and its K/V head (rows of K and V). Head groups are aligned to KV groups
  because the cache layout must stay identical across motifs.
- ``L{l}.ffn.b{j}``: FFN channels ``[j·b, (j+1)·b)`` (gate/up output columns, down input rows).
- ``L{l}.layer``: the whole layer (skip unit).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from cscompile.errors import UserError

UNIT_MAP_VERSION = 1

#: Where the passes keep the unit map of a model (``model.meta[META_KEY]``).
META_KEY = "cscompile.unit_map"


def require_unit_map(model: Any, who: str) -> None:
    """Precondition of every pass that reads the unit map."""
    from onnx_ir.passes import PreconditionError

    if META_KEY not in model.meta:
        raise PreconditionError(f"{who} needs the unit map (run DiscoverUnitsPass first)")


@dataclass(frozen=True)
class Projection:
    """A weight multiply: ``y = x @ W`` (MatMul, weight ``[in, out]``) or ``x @ W^T`` (Gemm transB / fused)."""

    node: str  # node name (a hint for humans; identity is by dataflow)
    weight: str  # initializer name
    in_features: int
    out_features: int
    weight_layout: str  # "in_out" ([in, out], MatMul) or "out_in" ([out, in], Gemm transB=1)
    bias: str | None = None
    out_slice: tuple[int, int] | None = None  # columns of a fused weight this projection owns

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class Norm:
    kind: str  # "rms", "layer", or "none": no norm before a branch whose output is normed (OLMo2)
    weight: str | None
    bias: str | None = None


@dataclass(frozen=True)
class Attention:
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool
    past_key: str | None = None
    past_value: str | None = None
    present_key: str | None = None
    present_value: str | None = None
    fused_qkv: bool = False
    # Facts read from the graph (None: not present / not readable, never assumed).
    q_norm: Norm | None = None  # per-head RMSNorm on Q after the projection (Gemma 3)
    k_norm: Norm | None = None
    qk_norm_full: bool = False  # q_norm/k_norm span the whole projection (OLMo2), not one head
    score_scale: float | None = None  # the constant scaling Q·Kᵀ before Softmax (None: not one constant)
    rope_base: float | None = None  # θ of inv_freq[i] = θ^(-2i/rotary_dim); None: not a plain geometric table
    rotary_dim: int | None = None  # channels of a head that rotate (head_dim: full rotation)
    rope_scale: float | None = None  # the factor on RoPE's cos and sin (YaRN's attention factor); None: 1
    mask_group: int = 0  # layers with the same attention mask share a group; group 0 has the fewest mask ops
    window: int | None = None  # sliding window read from this layer's mask (None: no window or unread)
    attn_softcap: float | None = None  # c of c·tanh(scores / c) before the mask and Softmax (Gemma 2)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class MLP:
    kind: str  # "swiglu" (silu gate), "geglu" (GELU gate), "gelu" or "relu" (one input projection)
    up: Projection
    down: Projection
    gate: Projection | None = None
    activation: str = "silu"  # "silu", "gelu_tanh" (tanh approximation) or "gelu" (erf), "relu"

    @property
    def intermediate_size(self) -> int:
        return self.up.out_features


@dataclass(frozen=True)
class Layer:
    index: int
    input_norm: Norm
    attention: Attention
    post_attention_norm: Norm
    mlp: MLP
    residual_in: str  # value entering the layer (hints for instrumentation)
    residual_out: str
    attn_input: str  # normed value feeding Q/K/V: the feature f(h) for sensing
    mlp_input: str
    mlp_act: str  # FFN intermediate value (input of down)
    attn_context: str  # input of O (concatenated heads)
    ffn: bool = True  # False once DropLayersPass removed this layer's FFN (``mlp`` is then history)
    # Norms applied to a branch's output before its residual add (Gemma 3's post_attention_layernorm
    # and post_feedforward_layernorm). ``post_attention_norm`` above is the norm *before* the MLP.
    attn_output_norm: Norm | None = None
    mlp_output_norm: Norm | None = None


@dataclass(frozen=True)
class TensorSlice:
    initializer: str
    axis: int
    start: int
    stop: int


@dataclass(frozen=True)
class Unit:
    id: str
    kind: str  # "head_group" | "ffn_block" | "layer"
    layer: int
    index: int
    params: int
    slices: tuple[TensorSlice, ...] = ()


@dataclass
class UnitMap:
    architecture: str  # "llama", "gemma3", "gpt2" or "decoder" (none of these): see ``_architecture``
    vocab_size: int
    hidden_size: int
    embedding: str
    lm_head: Projection
    lm_head_tied: bool
    final_norm: Norm
    layers: list[Layer]
    block_size: int = 1
    position_embedding: str | None = None
    embedding_scale: float | None = None  # constant multiplying the embedding rows (Gemma: √hidden)
    logit_softcap: float | None = None  # c of c·tanh(logits / c) after the LM head
    version: int = UNIT_MAP_VERSION
    units: list[Unit] = field(default_factory=list)

    # -- derived facts ----------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def intermediate_size(self) -> int:
        return self.layers[0].mlp.intermediate_size

    def params_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for u in self.units:
            if u.kind != "layer":
                out[u.kind] = out.get(u.kind, 0) + u.params
        return out

    def llama_deviations(self, rope_table: bool = True) -> list[str]:
        """What this decoder does beyond a plain Llama (RMSNorm, RoPE, SwiGLU), one phrase each.

        Code written for Llama (attention fusion, the native step, motifs) refuses a model with
        any, naming the first. ``rope_table=False`` leaves out RoPE frequencies that are not
        θ^(-2i/d) and a factor on cos/sin (a RoPE scaling): for code that reads the graph's own
        table and factor (attention fusion).
        """
        out: list[str] = []
        if self.architecture not in ("llama",):
            out.append(f"architecture '{self.architecture}'")
        if self.embedding_scale is not None:
            out.append(f"embedding scale {self.embedding_scale:g}")
        if self.logit_softcap is not None:
            out.append(f"logit soft-cap {self.logit_softcap:g}")
        for layer in self.layers:
            a, m, i = layer.attention, layer.mlp, layer.index
            if layer.ffn and (m.kind != "swiglu" or m.activation != "silu"):
                out.append(f"layer {i} MLP {m.kind} ({m.activation})")
            if "none" in (layer.input_norm.kind, layer.post_attention_norm.kind):
                out.append(f"layer {i} no norm before the attention/MLP (norms after the branches)")
            if layer.attn_output_norm is not None or layer.mlp_output_norm is not None:
                out.append(f"layer {i} norms on the attention/MLP outputs")
            if a.qk_norm_full:
                out.append(f"layer {i} QK-norm over the full projection width")
            if a.q_norm is not None or a.k_norm is not None:
                out.append(f"layer {i} QK-norm")
            if a.window is not None or a.mask_group != 0:
                out.append(f"layer {i} sliding-window mask (window {a.window})")
            if a.attn_softcap is not None:
                out.append(f"layer {i} attention soft-cap {a.attn_softcap:g}")
            if a.score_scale is not None and abs(a.score_scale * a.head_dim**0.5 - 1) > 1e-4:
                out.append(f"layer {i} attention scale {a.score_scale:g} (not head_dim^-0.5)")
            if rope_table and a.rope and a.rope_base is None and a.rotary_dim is not None:
                out.append(f"layer {i} RoPE frequencies not θ^(-2i/d) (a RoPE scaling)")
            if rope_table and a.rope_scale is not None:
                out.append(f"layer {i} RoPE cos/sin scaled by {a.rope_scale:g} (an attention factor)")
            if a.rotary_dim is not None and a.rotary_dim != a.head_dim:
                out.append(f"layer {i} partial rotary ({a.rotary_dim} of {a.head_dim})")
        bases = {layer.attention.rope_base for layer in self.layers}
        if len(bases) > 1:
            out.append(f"RoPE bases {sorted(b for b in bases if b is not None)} differ by layer")
        return out

    def units_of(self, layer: int, kind: str) -> list[Unit]:
        return [u for u in self.units if u.layer == layer and u.kind == kind]

    # -- serialization ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnitMap:
        if d.get("version") != UNIT_MAP_VERSION:
            raise UserError("unit map", f"version {d.get('version')!r}", f"version {UNIT_MAP_VERSION}")

        def proj(p: dict[str, Any] | None) -> Projection | None:
            if p is None:
                return None
            p = dict(p)
            if p.get("out_slice") is not None:
                p["out_slice"] = tuple(p["out_slice"])
            return Projection(**p)

        def norm(n: dict[str, Any]) -> Norm:
            return Norm(**n)

        def opt_norm(n: dict[str, Any] | None) -> Norm | None:
            return None if n is None else Norm(**n)

        layers = []
        for ld in d["layers"]:
            a = dict(ld["attention"])
            for k in ("q", "k", "v", "o"):
                a[k] = proj(a[k])
            for k in ("q_norm", "k_norm"):
                a[k] = opt_norm(a.get(k))
            m = dict(ld["mlp"])
            for k in ("up", "down", "gate"):
                m[k] = proj(m.get(k))
            layers.append(
                Layer(
                    **{
                        **ld,
                        "attention": Attention(**a),
                        "mlp": MLP(**m),
                        "input_norm": norm(ld["input_norm"]),
                        "post_attention_norm": norm(ld["post_attention_norm"]),
                        "attn_output_norm": opt_norm(ld.get("attn_output_norm")),
                        "mlp_output_norm": opt_norm(ld.get("mlp_output_norm")),
                    }
                )
            )
        units = [
            Unit(**{**u, "slices": tuple(TensorSlice(**s) for s in u["slices"])}) for u in d.get("units", [])
        ]
        lm = proj(d["lm_head"])
        assert lm is not None
        return cls(
            architecture=d["architecture"],
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            embedding=d["embedding"],
            lm_head=lm,
            lm_head_tied=d["lm_head_tied"],
            final_norm=norm(d["final_norm"]),
            layers=layers,
            block_size=d["block_size"],
            position_embedding=d.get("position_embedding"),
            embedding_scale=d.get("embedding_scale"),
            logit_softcap=d.get("logit_softcap"),
            version=d["version"],
            units=units,
        )

    @classmethod
    def from_json(cls, text: str) -> UnitMap:
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(
                "unit map", f"malformed JSON ({exc})", "a unit map written by cscompile"
            ) from None


def _weight_slice(p: Projection, start: int, stop: int, side: str) -> TensorSlice:
    """The slice of ``p``'s weight holding output columns (``side='out'``) or input rows (``'in'``)."""
    offset = p.out_slice[0] if (side == "out" and p.out_slice) else 0
    if side == "out":
        axis = 1 if p.weight_layout == "in_out" else 0
    else:
        axis = 0 if p.weight_layout == "in_out" else 1
    return TensorSlice(p.weight, axis, offset + start, offset + stop)


def _out_slices(p: Projection, start: int, stop: int) -> tuple[TensorSlice, ...]:
    """Weight columns (and bias entries) of output features ``[start, stop)`` of ``p``."""
    w = _weight_slice(p, start, stop, "out")
    if p.bias is None:
        return (w,)
    return (w, TensorSlice(p.bias, 0, w.start, w.stop))


def build_units(layers: list[Layer], block_size: int) -> list[Unit]:
    """Enumerate head-group, FFN-block and layer units (block size already checked)."""
    units: list[Unit] = []
    for layer in layers:
        a, m = layer.attention, layer.mlp
        d, g = a.head_dim, a.group_size
        for j in range(a.num_kv_heads):
            q0, q1 = j * g * d, (j + 1) * g * d
            kv0, kv1 = j * d, (j + 1) * d
            slices = (
                *_out_slices(a.q, q0, q1),
                *_out_slices(a.k, kv0, kv1),
                *_out_slices(a.v, kv0, kv1),
                _weight_slice(a.o, q0, q1, "in"),
            )
            params = (q1 - q0) * a.q.in_features * 2 + (kv1 - kv0) * a.k.in_features * 2
            units.append(Unit(f"L{layer.index}.attn.g{j}", "head_group", layer.index, j, params, slices))
        projs = [p for p in (m.gate, m.up) if p is not None]
        for j in range(m.intermediate_size // block_size):
            c0, c1 = j * block_size, (j + 1) * block_size
            ffn_slices = tuple(sl for p in projs for sl in _out_slices(p, c0, c1))
            ffn_slices += (_weight_slice(m.down, c0, c1, "in"),)
            params = (c1 - c0) * (m.up.in_features * len(projs) + m.down.out_features)
            units.append(Unit(f"L{layer.index}.ffn.b{j}", "ffn_block", layer.index, j, params, ffn_slices))
        layer_params = (
            a.q.params + a.k.params + a.v.params + a.o.params + sum(p.params for p in projs) + m.down.params
        )
        units.append(Unit(f"L{layer.index}.layer", "layer", layer.index, 0, layer_params))
    return units
