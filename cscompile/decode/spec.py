"""What a decoder ONNX looks like from the outside: its inputs, outputs and KV-cache layout.

Exporters disagree on names (``past_key_values.0.key`` from optimum and our exporter,
``past_key_values.layers.0.keys`` from transformers' own exporter, ``past.0.key`` elsewhere),
so the cache tensors are matched by pattern and paired by (layer, key|value).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cscompile.errors import UserError

_PAST = [
    re.compile(r"^past_key_values\.(\d+)\.(key|value)$"),
    re.compile(r"^input\.past_key_values\.layers\.(\d+)\.(key|value)s$"),
    re.compile(r"^past_key_values\.layers\.(\d+)\.(key|value)s$"),
    re.compile(r"^past\.(\d+)\.(key|value)$"),
    re.compile(r"^past_(key|value)_(\d+)$"),
]
_PRESENT = [
    re.compile(r"^present\.(\d+)\.(key|value)$"),
    re.compile(r"^output\.past_key_values\.layers\.(\d+)\.(key|value)s$"),
    re.compile(r"^present_key_values\.(\d+)\.(key|value)$"),
    re.compile(r"^past_key_values\.layers\.(\d+)\.(key|value)s$"),
    re.compile(r"^present\.layers\.(\d+)\.(key|value)s$"),
    re.compile(r"^cache\.layers\.(\d+)\.(key|value)s$"),  # transformers 5.24 exporter
    re.compile(r"^present_(key|value)_(\d+)$"),
]


def _match_cache(name: str, patterns: Sequence[re.Pattern[str]]) -> tuple[int, str] | None:
    for pat in patterns:
        m = pat.match(name)
        if m:
            a, b = m.group(1), m.group(2)
            return (int(b), a) if a in ("key", "value") else (int(a), b)
    return None


def _static(d: int | str | None) -> int | str | None:
    """A dimension, with a static size written as a symbolic name (``"2"``, as transformers' exporter
    writes them) read as the number.
    """
    return int(d) if isinstance(d, str) and d.isdigit() else d


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | str | None, ...]
    dtype: str


@dataclass(frozen=True)
class DecoderSpec:
    """I/O layout of a KV-cache decoder ONNX.

    ``past_inputs[i] = (key_name, value_name)`` for layer i; ``present_outputs`` likewise.
    """

    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    logits: str
    past_inputs: tuple[tuple[str, str], ...]
    present_outputs: tuple[tuple[str, str], ...]
    num_kv_heads: int
    head_dim: int
    kv_dtype: str
    other_inputs: tuple[str, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.past_inputs)

    @classmethod
    def from_io(
        cls, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo], source: str = "model"
    ) -> DecoderSpec:
        """Match a model's inputs and outputs against the decoder conventions we accept."""
        names = {t.name: t for t in inputs}
        if "input_ids" not in names:
            raise UserError(
                f"{source} inputs",
                f"no 'input_ids' among {sorted(names)[:6]}",
                "a decoder-only LM exported with an 'input_ids' input",
            )
        past: dict[int, dict[str, TensorInfo]] = {}
        known = {"input_ids", "attention_mask", "position_ids"}
        other = []
        for t in inputs:
            m = _match_cache(t.name, _PAST)
            if m:
                past.setdefault(m[0], {})[m[1]] = t
            elif t.name not in known:
                other.append(t.name)
        if not past:
            raise UserError(
                f"{source}",
                "has no KV-cache inputs (past_key_values.N.key / .value)",
                "a decoder exported with its KV cache (e.g. optimum 'text-generation-with-past' or `cscompile model fetch`)",
            )
        present: dict[int, dict[str, TensorInfo]] = {}
        logits = None
        for t in outputs:
            m = _match_cache(t.name, _PRESENT)
            if m:
                present.setdefault(m[0], {})[m[1]] = t
            elif t.name == "logits" or (logits is None and "logits" in t.name):
                logits = t.name
        if logits is None:
            raise UserError(f"{source} outputs", "no 'logits' output", "a causal LM with a 'logits' output")
        layers = sorted(past)
        if layers != list(range(len(layers))) or sorted(present) != layers:
            raise UserError(
                f"{source} KV cache",
                f"past layers {layers[:4]}..., present layers {sorted(present)[:4]}...",
                "past and present tensors for the same consecutive layers 0..N-1",
            )
        for i in layers:
            if set(past[i]) != {"key", "value"} or set(present[i]) != {"key", "value"}:
                raise UserError(
                    f"{source} KV cache", f"layer {i} lacks a key or value tensor", "both per layer"
                )
        k0 = past[0]["key"]
        if len(k0.shape) != 4:
            raise UserError(
                f"{source} KV cache",
                f"'{k0.name}' has rank {len(k0.shape)}",
                "rank 4 [batch, kv_heads, past, head_dim]",
            )
        kv_heads, head_dim = _static(k0.shape[1]), _static(k0.shape[3])
        if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
            raise UserError(
                f"{source} KV cache",
                f"'{k0.name}' has symbolic heads or head_dim {k0.shape}",
                "static kv_heads and head_dim",
            )
        unknown = [n for n in other if not n.startswith("cache_position")]
        sliding = [n for n in unknown if n.endswith("_sliding_window_tensor")]
        if sliding:  # transformers 5's sliding-window cache layers: keys cut to the window
            raise UserError(
                f"{source} inputs",
                f"transformers' sliding-window cache inputs {sliding[:2]}{', …' if len(sliding) > 2 else ''}",
                "a graph exported with a full cache on every layer (transformers.DynamicCache() without "
                "the config, as cscompile.models.export.export_with_transformers does) or by cscompile's exporter",
            )
        if unknown:
            raise UserError(
                f"{source} inputs",
                f"unsupported extra inputs {unknown[:4]}",
                "only input_ids, attention_mask, position_ids and the KV cache",
            )
        return cls(
            input_ids="input_ids",
            attention_mask="attention_mask" if "attention_mask" in names else None,
            position_ids="position_ids" if "position_ids" in names else None,
            logits=logits,
            past_inputs=tuple((past[i]["key"].name, past[i]["value"].name) for i in layers),
            present_outputs=tuple((present[i]["key"].name, present[i]["value"].name) for i in layers),
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            kv_dtype=k0.dtype,
            other_inputs=tuple(other),
        )

    @classmethod
    def from_ort(cls, session: Any, source: str = "model") -> DecoderSpec:
        def info(args: Sequence[Any]) -> list[TensorInfo]:
            return [TensorInfo(a.name, tuple(_static(d) for d in a.shape), a.type) for a in args]

        return cls.from_io(info(session.get_inputs()), info(session.get_outputs()), source)
