"""A minimal, export-friendly PyTorch decoder that mirrors a Hugging Face Llama-family model.

Why our own module instead of tracing transformers' model: the graph it exports is plain,
predictable ONNX (one MatMul per projection, a visible RoPE, a visible GQA broadcast, the LM
head as a Gemm sharing the embedding initializer when the weights are tied), it does not
depend on transformers' cache classes or their patches, and every later pass is written
against graphs like this one. Parity with transformers is a test, not an assumption.

Importing this module imports torch; import it lazily.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cscompile.errors import UserError
from cscompile.model_config import check_rope_scaling


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of a Llama-family decoder (Llama, SmolLM2, Qwen2-like, Mistral-like)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    family: str = "llama"  # "llama" (RMSNorm, RoPE, SwiGLU), "gpt2" (LayerNorm, learned positions, GELU, fused QKV)  # or "gemma3" (GeGLU, QK-norm, four norms per layer, sliding-window local layers)
    # Layers with a sliding window (Gemma 3: with the local RoPE base) and the window; Gemma 3 only:
    # the attention scale (query_pre_attn_scalar ** -0.5), the embedding scale and the logit soft-cap.
    sliding_layers: tuple[int, ...] = ()
    sliding_window: int = 0
    attn_scale: float = 0.0
    embed_scale: float = 1.0
    final_logit_softcapping: float = 0.0
    qk_norm: bool = False  # Qwen3: RMSNorm on each query and key head before RoPE
    rotary_dim: int = 0  # channels of a head that RoPE rotates (0: all; Phi-3's partial_rotary_factor)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def config_from_hf(hf_config: Any) -> DecoderConfig:
    """Read a transformers config, refusing what we cannot export."""
    model_type = getattr(hf_config, "model_type", "?")
    if model_type == "gpt2":
        h = hf_config.n_embd
        return DecoderConfig(
            vocab_size=hf_config.vocab_size,
            hidden_size=h,
            intermediate_size=hf_config.n_inner or 4 * h,
            num_layers=hf_config.n_layer,
            num_heads=hf_config.n_head,
            num_kv_heads=hf_config.n_head,
            head_dim=h // hf_config.n_head,
            rms_norm_eps=float(hf_config.layer_norm_epsilon),
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            max_position_embeddings=hf_config.n_positions,
            hidden_act=hf_config.activation_function,
            family="gpt2",
        )
    if model_type == "gemma3_text":
        return _gemma3_config(hf_config)
    if model_type not in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        raise UserError(
            "model architecture",
            f"model_type '{model_type}'",
            "a Llama-family decoder (llama, mistral, qwen2, qwen3, phi3), gemma3_text or gpt2",
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UserError("model activation", f"hidden_act '{act}'", "'silu' (SwiGLU MLP)")
    check_rope_scaling(hf_config.to_dict(), "model config")
    sliding_layers, window = _sliding_layers(hf_config)
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return DecoderConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(hf_config, "attention_bias", model_type == "qwen2")),
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 2048)),
        hidden_act=act,
        sliding_layers=sliding_layers,
        sliding_window=window,
        qk_norm=model_type == "qwen3",
        rotary_dim=_rotary_dim(hf_config, head_dim),
    )


def _rotary_dim(c: Any, head_dim: int) -> int:
    """The rotated channels of a head when only part of it rotates (``partial_rotary_factor``), else 0."""
    params = getattr(c, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)) or 1.0
    rot = int(head_dim * float(factor))
    if rot <= 0 or rot % 2 or rot > head_dim:
        raise UserError(
            "model config", f"partial_rotary_factor {factor} of head_dim {head_dim}", "an even width"
        )
    return 0 if rot == head_dim else rot


def _sliding_layers(c: Any) -> tuple[tuple[int, ...], int]:
    """The layers with a sliding window and the window, as transformers 5 applies them.

    ``layer_types`` when the config has them (Qwen2 writes them from ``use_sliding_window`` and
    ``max_window_layers``); otherwise every layer when ``sliding_window`` is set (Mistral).
    """
    window = int(getattr(c, "sliding_window", None) or 0)
    types = getattr(c, "layer_types", None)
    if types is not None:
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise UserError("model config", f"layer_types {unknown}", "sliding_attention or full_attention")
        layers = tuple(i for i, t in enumerate(types[: c.num_hidden_layers]) if t == "sliding_attention")
    else:
        layers = tuple(range(c.num_hidden_layers)) if window else ()
    if layers and window <= 0:
        raise UserError("model config", f"sliding layers {list(layers)} without a sliding_window", "a window")
    return (layers, window) if layers else ((), 0)


def _gemma3_config(c: Any) -> DecoderConfig:
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", "?")
    if act != "gelu_pytorch_tanh":
        raise UserError(
            "model activation", f"hidden_activation '{act}'", "'gelu_pytorch_tanh' (Gemma 3 GeGLU)"
        )
    if getattr(c, "attn_logit_softcapping", None) is not None:
        raise UserError("gemma3 config", f"attn_logit_softcapping {c.attn_logit_softcapping}", "None")
    if getattr(c, "use_bidirectional_attention", False):
        raise UserError("gemma3 config", "use_bidirectional_attention True", "a causal decoder")
    check_rope_scaling(c.to_dict(), "gemma3 config")
    types = list(c.layer_types)
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise UserError("gemma3 config", f"layer_types {unknown}", "sliding_attention or full_attention")
    return DecoderConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        rms_norm_eps=float(c.rms_norm_eps),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        attention_bias=bool(getattr(c, "attention_bias", False)),
        max_position_embeddings=int(c.max_position_embeddings),
        hidden_act=act,
        family="gemma3",
        sliding_layers=tuple(
            i for i, t in enumerate(types[: c.num_hidden_layers]) if t == "sliding_attention"
        ),
        sliding_window=int(c.sliding_window or 0),
        attn_scale=float(c.query_pre_attn_scalar) ** -0.5,
        embed_scale=float(c.hidden_size) ** 0.5,
        final_logit_softcapping=float(getattr(c, "final_logit_softcapping", None) or 0.0),
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int = 0) -> torch.Tensor:
    """RoPE on the first ``rot`` channels of each head (0: all of them; partial rotary otherwise)."""
    if not rot:
        return x * cos + _rotate_half(x) * sin
    head = x[..., :rot]
    return torch.cat([head * cos + _rotate_half(head) * sin, x[..., rot:]], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, H]
        cos: torch.Tensor,  # [B, 1, S, D]
        sin: torch.Tensor,  # [B, 1, S, D]
        mask: torch.Tensor,  # [B, 1, 1, S, T] additive
        past_k: torch.Tensor,  # [B, KV, P, D]
        past_v: torch.Tensor,  # [B, KV, P, D]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        b, s = x.shape[0], x.shape[1]
        kv, d = cfg.num_kv_heads, cfg.head_dim
        q = self.q_proj(x).reshape(b, s, cfg.num_heads, d).transpose(1, 2)  # [B, NH, S, D]
        k = self.k_proj(x).reshape(b, s, kv, d).transpose(1, 2)  # [B, KV, S, D]
        v = self.v_proj(x).reshape(b, s, kv, d).transpose(1, 2)
        q = _rope(q, cos, sin, cfg.rotary_dim)
        k = _rope(k, cos, sin, cfg.rotary_dim)
        k = torch.cat([past_k, k], dim=2)  # [B, KV, T, D]
        v = torch.cat([past_v, v], dim=2)
        # GQA by broadcasting: query heads of one KV group share that group's K/V, no copy.
        return self.o_proj(_attend(q, k, v, mask, kv, d)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"  # GeGLU (Gemma) instead of SwiGLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        act = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        return self.down_proj(act * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GemmaAttention(cfg) if cfg.qk_norm else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past_k, past_v):  # type: ignore[no-untyped-def]
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class ExportDecoder(nn.Module):
    """Decoder with an explicit KV cache in the optimum/transformers ONNX I/O convention.

    Inputs: ``input_ids [B,S]``, ``attention_mask [B,P+S]``, ``position_ids [B,S]`` and
    ``past_key_values.{i}.key/value [B,KV,P,D]``. Outputs: ``logits [B,S,V]`` and
    ``present.{i}.key/value [B,KV,P+S,D]``.
    """

    def __init__(self, cfg: DecoderConfig, inv_freq: torch.Tensor, rope_scale: float = 1.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", inv_freq.float().clone(), persistent=False)
        self.rope_scale = rope_scale

    def forward(self, input_ids, attention_mask, position_ids, *past):  # type: ignore[no-untyped-def]
        b, s = input_ids.shape[0], input_ids.shape[1]
        x = self.embed_tokens(input_ids)  # [B, S, H]
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # [B, S, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.rope_scale).unsqueeze(1)  # [B, 1, S, D]
        sin = (emb.sin() * self.rope_scale).unsqueeze(1)
        # Key positions come from the mask itself (left padding safe): pos_k = cumsum(mask) - 1.
        mask = _causal_mask(attention_mask, position_ids, x.dtype)  # [B, 1, 1, S, T]
        local = (
            _causal_mask(attention_mask, position_ids, x.dtype, self.cfg.sliding_window)
            if self.cfg.sliding_layers
            else mask
        )
        presents = []
        for i, layer in enumerate(self.layers):
            m = local if i in self.cfg.sliding_layers else mask
            x, k, v = layer(x, cos, sin, m, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        x = self.norm(x)
        # LM head as a 2-D Gemm (transB=1) so a tied head reuses the embedding initializer.
        logits = F.linear(x.reshape(b * s, self.cfg.hidden_size), self.lm_head.weight)
        return (logits.reshape(b, s, self.cfg.vocab_size), *presents)


def _attend(q, k, v, mask, num_kv_heads: int, head_dim: int, scale: float = 0.0):  # type: ignore[no-untyped-def]
    """Scaled dot-product attention with GQA by broadcast. q [B,NH,S,D], k/v [B,KV,T,D]."""
    b, nh, s = q.shape[0], q.shape[1], q.shape[2]
    g = nh // num_kv_heads
    q5 = q.reshape(b, num_kv_heads, g, s, head_dim)  # [B, KV, G, S, D]
    scores = torch.matmul(q5, k.unsqueeze(2).transpose(-1, -2)) * (
        scale or head_dim**-0.5
    )  # [B, KV, G, S, T]
    probs = torch.softmax(scores + mask, dim=-1)
    ctx = torch.matmul(probs, v.unsqueeze(2))  # [B, KV, G, S, D]
    return ctx.reshape(b, nh, s, head_dim).transpose(1, 2).reshape(b, s, nh * head_dim)


def _causal_mask(attention_mask, position_ids, dtype, window: int = 0):  # type: ignore[no-untyped-def]
    """Additive mask [B,1,1,S,T]: keys at positions <= the query's, padding excluded.

    With ``window``: only keys at positions > the query's - window (transformers' sliding window).
    """
    key_pos = torch.cumsum(attention_mask, dim=-1) - 1  # [B, T]
    allowed = (key_pos.unsqueeze(1) <= position_ids.unsqueeze(2)) & (attention_mask.unsqueeze(1) > 0)
    if window:
        allowed = allowed & (key_pos.unsqueeze(1) > position_ids.unsqueeze(2) - window)
    return torch.where(allowed, 0.0, -1e30).to(dtype).unsqueeze(1).unsqueeze(1)


class GPT2Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.cfg = cfg
        self.ln_1 = nn.LayerNorm(h, eps=cfg.rms_norm_eps)
        self.c_attn = nn.Linear(h, 3 * h)
        self.c_proj = nn.Linear(h, h)
        self.ln_2 = nn.LayerNorm(h, eps=cfg.rms_norm_eps)
        self.c_fc = nn.Linear(h, cfg.intermediate_size)
        self.mlp_proj = nn.Linear(cfg.intermediate_size, h)

    def forward(self, x, mask, past_k, past_v):  # type: ignore[no-untyped-def]
        cfg = self.cfg
        b, s, h = x.shape[0], x.shape[1], cfg.hidden_size
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=-1)
        q = q.reshape(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = torch.cat([past_k, k.reshape(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)], dim=2)
        v = torch.cat([past_v, v.reshape(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)], dim=2)
        x = x + self.c_proj(_attend(q, k, v, mask, cfg.num_kv_heads, cfg.head_dim))
        x = x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))
        return x, k, v


class GPT2ExportDecoder(nn.Module):
    """GPT-2-style decoder (LayerNorm, learned positions, fused QKV, GELU MLP), same I/O as :class:`ExportDecoder`."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, input_ids, attention_mask, position_ids, *past):  # type: ignore[no-untyped-def]
        b, s = input_ids.shape[0], input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(position_ids)
        mask = _causal_mask(attention_mask, position_ids, x.dtype)
        presents = []
        for i, block in enumerate(self.h):
            x, k, v = block(x, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        logits = F.linear(self.ln_f(x).reshape(b * s, self.cfg.hidden_size), self.wte.weight)
        return (logits.reshape(b, s, self.cfg.vocab_size), *presents)


def _gpt2_from_hf(hf_model: Any, cfg: DecoderConfig) -> GPT2ExportDecoder:
    if cfg.hidden_act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(
            "model activation", f"activation_function '{cfg.hidden_act}'", "'gelu_new' (tanh GELU)"
        )
    model = GPT2ExportDecoder(cfg)
    sd = {
        k[len("transformer.") :]: v for k, v in hf_model.state_dict().items() if k.startswith("transformer.")
    }
    ours = {}
    for name, t in sd.items():
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            continue
        name = name.replace(".attn.c_attn.", ".c_attn.").replace(".attn.c_proj.", ".c_proj.")
        name = name.replace(".mlp.c_fc.", ".c_fc.").replace(".mlp.c_proj.", ".mlp_proj.")
        if name.endswith(".weight") and t.dim() == 2 and not name.startswith(("wte", "wpe")):
            t = t.t()  # transformers' Conv1D stores [in, out]
        ours[name] = t
    model.load_state_dict(ours, strict=True)
    return model.eval()


class GemmaAttention(nn.Module):
    """Gemma 3 (and Qwen3) attention: Llama's plus RMSNorm on each query and key head before RoPE."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_k, past_v):  # type: ignore[no-untyped-def]
        cfg = self.cfg
        b, s = x.shape[0], x.shape[1]
        kv, d = cfg.num_kv_heads, cfg.head_dim
        q = self.q_norm(self.q_proj(x).reshape(b, s, cfg.num_heads, d).transpose(1, 2))  # [B, NH, S, D]
        k = self.k_norm(self.k_proj(x).reshape(b, s, kv, d).transpose(1, 2))  # [B, KV, S, D]
        v = self.v_proj(x).reshape(b, s, kv, d).transpose(1, 2)
        q = _rope(q, cos, sin, cfg.rotary_dim)
        k = _rope(k, cos, sin, cfg.rotary_dim)
        k = torch.cat([past_k, k], dim=2)  # [B, KV, T, D]
        v = torch.cat([past_v, v], dim=2)
        return self.o_proj(_attend(q, k, v, mask, kv, d, cfg.attn_scale)), k, v


class GemmaBlock(nn.Module):
    """Gemma 3 layer: norms before and after attention and before and after a GeGLU MLP."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn = GemmaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(h, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_k, past_v):  # type: ignore[no-untyped-def]
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + self.post_attention_layernorm(a)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, k, v


class GemmaExportDecoder(nn.Module):
    """Gemma 3 text decoder, same I/O as :class:`ExportDecoder`.

    Gemma's norms scale by ``1 + w``; the loader stores ``1 + w`` (computed in fp32, as
    transformers does) as a plain RMSNorm weight, so the graph has ordinary RMSNorms. Sliding
    layers keep every key in the cache and mask those outside the window (positions from the
    mask, as for full layers); they use the local RoPE base.
    """

    def __init__(
        self, cfg: DecoderConfig, inv_freq: dict[str, torch.Tensor], rope_scale: dict[str, float]
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer(
            "embed_scale", torch.tensor(cfg.embed_scale, dtype=torch.float32), persistent=False
        )
        self.register_buffer("inv_freq_full", inv_freq["full_attention"].float().clone(), persistent=False)
        self.register_buffer(
            "inv_freq_local", inv_freq["sliding_attention"].float().clone(), persistent=False
        )
        self.rope_scale = rope_scale

    def _rope(self, position_ids, inv_freq, scale):  # type: ignore[no-untyped-def]
        freqs = position_ids.unsqueeze(-1).float() * inv_freq  # [B, S, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * scale).unsqueeze(1), (emb.sin() * scale).unsqueeze(1)  # [B, 1, S, D]

    def forward(self, input_ids, attention_mask, position_ids, *past):  # type: ignore[no-untyped-def]
        cfg = self.cfg
        b, s = input_ids.shape[0], input_ids.shape[1]
        x = self.embed_tokens(input_ids) * self.embed_scale  # [B, S, H]
        rope_full = self._rope(position_ids, self.inv_freq_full, self.rope_scale["full_attention"])
        rope_local = self._rope(position_ids, self.inv_freq_local, self.rope_scale["sliding_attention"])
        mask_full = _causal_mask(attention_mask, position_ids, x.dtype)  # [B, 1, 1, S, T]
        mask_local = _causal_mask(attention_mask, position_ids, x.dtype, cfg.sliding_window)
        presents = []
        for i, layer in enumerate(self.layers):
            local = i in cfg.sliding_layers
            cos, sin = rope_local if local else rope_full
            x, k, v = layer(x, cos, sin, mask_local if local else mask_full, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        x = self.norm(x)
        logits = F.linear(x.reshape(b * s, cfg.hidden_size), self.lm_head.weight)
        if cfg.final_logit_softcapping:
            logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        return (logits.reshape(b, s, cfg.vocab_size), *presents)


def _gemma3_from_hf(hf_model: Any, cfg: DecoderConfig) -> GemmaExportDecoder:
    rot = hf_model.model.rotary_emb
    kinds = ("full_attention", "sliding_attention")
    inv = {t: getattr(rot, f"{t}_inv_freq").detach() for t in kinds if hasattr(rot, f"{t}_inv_freq")}
    for kind in kinds:  # a model with one kind of layer only: the other's RoPE is never used
        inv.setdefault(kind, next(iter(inv.values())))
    scale = {kind: float(getattr(rot, f"{kind}_attention_scaling", 1.0)) for kind in kinds}
    model = GemmaExportDecoder(cfg, inv, scale)
    sd = {}
    for name, t in _hf_state_dict(hf_model).items():
        if name.endswith("norm.weight"):
            t = 1.0 + t.float()  # Gemma's RMSNorm scales by (1 + w)
        sd[name] = t
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(
            "model weights",
            f"missing {missing[:3]} unexpected {unexpected[:3]}",
            "a transformers Gemma 3 state dict",
        )
    return model.eval()


def from_hf(hf_model: Any) -> nn.Module:
    """Build an export module holding the weights of a transformers model (Llama family, Gemma 3 or GPT-2)."""
    cfg = config_from_hf(hf_model.config)
    if cfg.family == "gpt2":
        return _gpt2_from_hf(hf_model, cfg)
    if cfg.family == "gemma3":
        return _gemma3_from_hf(hf_model, cfg)
    rot = hf_model.model.rotary_emb
    inv_freq = rot.inv_freq.detach()
    scale = float(getattr(rot, "attention_scaling", 1.0))
    model = ExportDecoder(cfg, inv_freq, scale)
    missing, unexpected = model.load_state_dict(_unfuse(_hf_state_dict(hf_model), cfg), strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(
            "model weights",
            f"missing {missing[:3]} unexpected {unexpected[:3]}",
            "a transformers Llama-family state dict",
        )
    return model.eval()


def _unfuse(sd: dict[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Phi-3's fused ``qkv_proj`` ([Q; K; V] rows) and ``gate_up_proj`` ([gate; up]) as Llama's."""
    out = {}
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for name, t in sd.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            stem = name[: -len("qkv_proj.weight")]
            for part, rows in zip(("q", "k", "v"), t.split([q, kv, kv], dim=0)):
                out[f"{stem}{part}_proj.weight"] = rows
        elif name.endswith("mlp.gate_up_proj.weight"):
            stem = name[: -len("gate_up_proj.weight")]
            gate, up = t.chunk(2, dim=0)
            out[f"{stem}gate_proj.weight"], out[f"{stem}up_proj.weight"] = gate, up
        else:
            out[name] = t
    return out


def _hf_state_dict(hf_model: Any) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in hf_model.state_dict().items():
        if name.startswith("model."):
            name = name[len("model.") :]
        if "rotary_emb" in name:
            continue
        out[name] = tensor
    return out


def export_onnx(model: nn.Module, path: str, opset: int = 17) -> None:
    """Trace ``model`` to ONNX with dynamic batch, sequence and past lengths."""
    cfg: DecoderConfig = model.cfg  # type: ignore[assignment]
    b, s, p = 1, 4, 3
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).unsqueeze(0)
    past = []
    names_in = ["input_ids", "attention_mask", "position_ids"]
    names_out = ["logits"]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            past.append(torch.zeros(b, cfg.num_kv_heads, p, cfg.head_dim))
            iname, oname = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
            names_in.append(iname)
            names_out.append(oname)
            axes[iname] = {0: "batch_size", 2: "past_sequence_length"}
            axes[oname] = {0: "batch_size", 2: "total_sequence_length"}
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, mask, pos, *past),
            path,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
