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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def config_from_hf(hf_config: Any) -> DecoderConfig:
    """Read a transformers ``LlamaConfig``-like object, refusing what we cannot export."""
    model_type = getattr(hf_config, "model_type", "?")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise UserError(
            "model architecture",
            f"model_type '{model_type}'",
            "a Llama-family decoder (llama, mistral, qwen2)",
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UserError("model activation", f"hidden_act '{act}'", "'silu' (SwiGLU MLP)")
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
        g = cfg.num_heads // kv
        q = self.q_proj(x).reshape(b, s, cfg.num_heads, d).transpose(1, 2)  # [B, NH, S, D]
        k = self.k_proj(x).reshape(b, s, kv, d).transpose(1, 2)  # [B, KV, S, D]
        v = self.v_proj(x).reshape(b, s, kv, d).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)  # [B, KV, T, D]
        v = torch.cat([past_v, v], dim=2)
        # GQA by broadcasting: query heads of one KV group share that group's K/V, no copy.
        q5 = q.reshape(b, kv, g, s, d)  # [B, KV, G, S, D]
        scores = torch.matmul(q5, k.unsqueeze(2).transpose(-1, -2)) * (d**-0.5)  # [B, KV, G, S, T]
        probs = torch.softmax(scores + mask, dim=-1)
        ctx = torch.matmul(probs, v.unsqueeze(2))  # [B, KV, G, S, D]
        ctx = ctx.reshape(b, cfg.num_heads, s, d).transpose(1, 2).reshape(b, s, cfg.num_heads * d)
        return self.o_proj(ctx), k, v


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
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
        key_pos = torch.cumsum(attention_mask, dim=-1) - 1  # [B, T]
        allowed = (key_pos.unsqueeze(1) <= position_ids.unsqueeze(2)) & (attention_mask.unsqueeze(1) > 0)
        mask = torch.where(allowed, 0.0, -1e30).to(x.dtype)  # [B, S, T]
        mask = mask.unsqueeze(1).unsqueeze(1)  # [B, 1, 1, S, T]
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        x = self.norm(x)
        # LM head as a 2-D Gemm (transB=1) so a tied head reuses the embedding initializer.
        logits = F.linear(x.reshape(b * s, self.cfg.hidden_size), self.lm_head.weight)
        return (logits.reshape(b, s, self.cfg.vocab_size), *presents)


def from_hf(hf_model: Any) -> ExportDecoder:
    """Build an :class:`ExportDecoder` holding the weights of a transformers Llama-family model."""
    cfg = config_from_hf(hf_model.config)
    rot = hf_model.model.rotary_emb
    inv_freq = rot.inv_freq.detach()
    scale = float(getattr(rot, "attention_scaling", 1.0))
    model = ExportDecoder(cfg, inv_freq, scale)
    missing, unexpected = model.load_state_dict(_hf_state_dict(hf_model), strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(
            "model weights",
            f"missing {missing[:3]} unexpected {unexpected[:3]}",
            "a transformers Llama-family state dict",
        )
    return model.eval()


def _hf_state_dict(hf_model: Any) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in hf_model.state_dict().items():
        if name.startswith("model."):
            name = name[len("model.") :]
        if "rotary_emb" in name:
            continue
        out[name] = tensor
    return out


def export_onnx(model: ExportDecoder, path: str, opset: int = 17) -> None:
    """Trace ``model`` to ONNX with dynamic batch, sequence and past lengths."""
    cfg = model.cfg
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
