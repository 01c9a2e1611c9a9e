"""The prompt scorer: the first layers of the bundle's own engine, read as question → token attention.

A depth-limited motif of the dense engine (layers ``0..L-1``, no LM head) runs over the whole
prompt once. Its graph outputs, per scored layer, the query projection that enters
``GroupQueryAttention`` and the rotated keys it writes to the cache; numpy rotates the
question's queries with the engine's own RoPE tables and computes, for a few calibrated
heads, how much attention the question pays to every prompt token. That is the token score
(LongLLMLingua's question-aware idea, computed by the model being served instead of a second
model).

Why attention and not self-information: on SmolLM2 the LM head holds as many weights as eight
layers (49152 × 576), so LLMLingua's per-token perplexity pays it on every prompt token, and it
does not know the question. Measured (``tools/exp_prompt_scores.py``, BENCHMARKS.md): from the
first 4 layers + head it cost 435–586 ms against 218 ms for the attention scorer and kept the
retrieval evidence in 29% of prompts against 100%.
The build's calibration report (``prompt/scorer.json``) for SmolLM2: the two chosen heads together
rank the evidence sentence 1st–3rd on all 16 calibration examples (~33 sentences each; three
same-form distractors on retrieval), while most single heads of those layers average rank 12–22.

Rules:

1. Only fused engines (``cscompile.attention == gqa``, the CPU default) are read: their rotated
   keys and query inputs are explicit tensors. A plain graph is a one-line error.
2. The scorer ONNX keeps only what the chosen layers need (dead nodes, inputs and
   initializers removed); it shares nothing at run time with the serving session.
3. ``heads`` are ``(layer, query head)`` pairs; each head's attention rows are averaged over
   the query tokens, then the heads are averaged with equal weight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.errors import UserError


@dataclass(frozen=True)
class ScorerSpec:
    """What the scorer graph computes and how to read it (stored as ``prompt/scorer.json``)."""

    heads: tuple[tuple[int, int], ...]  # (layer, query head)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.heads}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "heads": [list(h) for h in self.heads],
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "scale": self.scale,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "prompt scorer") -> ScorerSpec:
        try:
            heads = tuple((int(a), int(b)) for a, b in d["heads"])
            spec = cls(
                heads, int(d["num_heads"]), int(d["num_kv_heads"]), int(d["head_dim"]), float(d["scale"])
            )
        except (KeyError, TypeError, ValueError):
            raise UserError(
                where, "is malformed", "heads, num_heads, num_kv_heads, head_dim, scale"
            ) from None
        ok = (
            spec.heads
            and spec.num_kv_heads >= 1
            and spec.num_heads % spec.num_kv_heads == 0
            and spec.head_dim % 2 == 0
            and all(layer >= 0 and 0 <= h < spec.num_heads for layer, h in spec.heads)
        )
        if not ok:
            raise UserError(
                where, f"has an inconsistent head list {d.get('heads')}", "(layer, head) pairs in range"
            )
        return spec


def _gqa_nodes(model: Any) -> dict[int, Any]:
    import re

    out = {}
    for node in model.graph:
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
            m = re.fullmatch(r"cs\.L(\d+)\.gqa", node.name or "")
            if m:
                out[int(m.group(1))] = node
    return out


def engine_attention(engine: Path) -> tuple[int, int]:
    """(fused attention layers, positions of the RoPE table; 8192 if unknown) of ``engine``."""
    import onnx_ir as ir

    nodes = _gqa_nodes(ir.load(str(engine)))
    first = next(iter(nodes.values()), None)
    table = first.inputs[7] if first is not None else None
    positions = int(table.shape[0]) if table is not None and table.shape is not None else 8192
    return len(nodes), positions


def build_scorer(
    engine: Path, layers: list[int] | tuple[int, ...], out: Path
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Cut ``engine`` down to the layers up to ``max(layers)`` with outputs ``q{l}``/``k{l}`` per layer.

    Writes ``out`` (one ONNX file, weights inline) and returns (the attention attributes,
    ``{"cos", "sin"}`` RoPE tables).
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common

    from cscompile.passes.pipeline import save_model

    model = ir.load(str(engine))
    nodes = _gqa_nodes(model)
    if not nodes:
        raise UserError(
            f"engine {Path(engine).name}",
            "has no fused attention (GroupQueryAttention) to read scores from",
            "a bundle whose dense engine fuses attention (the CPU default)",
        )
    missing = sorted(set(layers) - set(nodes))
    if missing:
        raise UserError(
            "prompt scorer", f"layers {missing} are not in the engine", f"layers in 0..{max(nodes)}"
        )
    first = nodes[min(layers)]
    attrs = {k: first.attributes[k].value for k in ("num_heads", "kv_num_heads", "scale")}
    if not first.attributes["do_rotary"].value or first.attributes["rotary_interleaved"].value:
        raise UserError(
            "prompt scorer", "the engine's attention does not use half-rotation RoPE", "a Llama-style GQA"
        )
    tables = {}
    for key, idx in (("cos", 7), ("sin", 8)):
        value = first.inputs[idx]
        if value is None or value.const_value is None:
            raise UserError(
                "prompt scorer", "the engine's RoPE tables are not constants", "a cscompile-fused engine"
            )
        tables[key] = np.asarray(value.const_value.numpy(), np.float32)
    graph = model.graph
    outputs = []
    for layer in sorted(set(layers)):
        node = nodes[layer]
        q, k = node.inputs[0], node.outputs[1]
        q.name, k.name = f"q{layer}", f"k{layer}"
        outputs += [q, k]
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    common.RemoveUnusedNodesPass()(model)
    used = {v.name for n in graph for v in n.inputs if v is not None}
    kept_inputs = [v for v in graph.inputs if v.name in used]
    graph.inputs.clear()
    graph.inputs.extend(kept_inputs)
    common.RemoveUnusedNodesPass()(model)
    model.metadata_props["cscompile.role"] = "prompt-scorer"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    return attrs, tables


class PromptScorer:
    """Run the scorer graph and turn its outputs into per-token scores."""

    def __init__(
        self, path: Path, spec: ScorerSpec, rope: dict[str, np.ndarray], threads: int | None = None
    ) -> None:
        from cscompile.decode.session import open_onnx_session

        self.spec = spec
        self.cos, self.sin = rope["cos"], rope["sin"]
        if self.cos.shape != self.sin.shape or self.cos.ndim != 2 or 2 * self.cos.shape[1] != spec.head_dim:
            raise UserError(
                "prompt scorer",
                f"RoPE tables of shape {self.cos.shape}",
                f"[positions, {spec.head_dim // 2}]",
            )
        self.session = open_onnx_session(path, threads)
        self._inputs = [i.name for i in self.session.get_inputs()]
        names = {o.name for o in self.session.get_outputs()}
        need = {f"{c}{layer}" for layer in spec.layers for c in "qk"}
        if not need <= names:
            raise UserError(
                "prompt scorer", f"graph lacks outputs {sorted(need - names)}", "q/k outputs per scored layer"
            )

    @property
    def max_positions(self) -> int:
        return int(self.cos.shape[0])

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Half-rotation RoPE of ``x [n, d]`` at positions ``pos [n]`` (as GroupQueryAttention does)."""
        c, s = self.cos[pos], self.sin[pos]
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    def run(self, ids: list[int] | np.ndarray) -> dict[str, np.ndarray]:
        ids_arr = np.asarray(ids, np.int64)[None, :]
        s = ids_arr.shape[1]
        if s > self.max_positions:
            raise UserError(
                "prompt", f"{s} tokens", f"at most {self.max_positions} (the scorer's RoPE table)"
            )
        d, kv = self.spec.head_dim, self.spec.num_kv_heads
        feed: dict[str, np.ndarray] = {}
        for name in self._inputs:
            if name == "input_ids":
                feed[name] = ids_arr
            elif name == "attention_mask":
                feed[name] = np.ones_like(ids_arr)
            else:  # an empty past per kept layer
                feed[name] = np.zeros((1, kv, 0, d), np.float32)
        outs = self.session.run(None, feed)
        return dict(zip([o.name for o in self.session.get_outputs()], outs))

    def head_attention(
        self, outs: dict[str, np.ndarray], query: np.ndarray, layer: int, head: int
    ) -> np.ndarray:
        """Mean attention row ``[S]`` of query head ``head`` at ``layer`` over the query positions."""
        sp = self.spec
        d = sp.head_dim
        q = outs[f"q{layer}"][0][query, head * d : (head + 1) * d].astype(np.float32)  # packed QKV: Q first
        keys = outs[f"k{layer}"][0][head // (sp.num_heads // sp.num_kv_heads)]  # [S, d], rotated
        logits = (self._rope(q, query) @ keys.T) * sp.scale  # [nq, S]
        logits = np.where(np.arange(keys.shape[0])[None, :] > query[:, None], -np.inf, logits)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        return np.asarray(p.mean(axis=0))

    def scores(self, ids: list[int] | np.ndarray, query: np.ndarray) -> tuple[np.ndarray, float]:
        """Per-token scores ``[S]`` (attention the ``query`` positions pay) and the time it took in ms."""
        t0 = time.perf_counter()
        query = np.asarray(query, np.int64)
        if query.size == 0:
            raise UserError("prompt scorer", "no query tokens", "a question (or the prompt's last tokens)")
        outs = self.run(ids)
        total = sum(self.head_attention(outs, query, layer, head) for layer, head in self.spec.heads)
        return np.asarray(total) / len(self.spec.heads), (time.perf_counter() - t0) * 1e3


class SelfInfoScorer:
    """LLMLingua's score: each token's self-information ``−log p(x_i | x_<i)`` under a depth-limited
    engine (the first layers + the LM head, e.g. from :func:`cscompile.search.joint.assemble`).

    Question-agnostic, and it pays the LM head on every prompt token; kept as the measured
    alternative to :class:`PromptScorer` (``tools/exp_prompt_scores.py``).
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        from cscompile.decode.session import DecoderSession

        self.session = DecoderSession(path, threads=threads)

    def scores(self, ids: list[int] | np.ndarray, query: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        arr = np.asarray(ids, np.int64)
        logits = self.session.forward(arr[None], self.session.new_state())[0]  # [S, V]
        z = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)  # float32: [S, V] is large
        logp = z[np.arange(len(arr) - 1), arr[1:]] - np.log(np.exp(z).sum(axis=1))
        info = np.concatenate([[0.0], -logp])
        return info, (time.perf_counter() - t0) * 1e3
