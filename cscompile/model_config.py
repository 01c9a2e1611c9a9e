"""What a model directory's ``config.json`` says that every layer needs (core: imports errors and limits only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cscompile.errors import UserError
from cscompile.limits import INT32_MAX, is_int32


def read_context_length(base: Path) -> int | None:
    """``max_position_embeddings`` from the ``config.json`` beside the model (or in ``tokenizer/``)."""
    for cfg_path in (base / "config.json", base / "tokenizer" / "config.json"):
        if cfg_path.is_file():
            try:
                value = json.loads(cfg_path.read_text(encoding="utf-8")).get("max_position_embeddings")
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                raise UserError(
                    "model config", f"{cfg_path} is not a JSON object", "a transformers config.json"
                ) from None
            if value is not None and not is_int32(value):
                raise UserError(f"model config {cfg_path}", f"has max_position_embeddings {value!r}",
                                f"an integer in [1, {INT32_MAX}] (or none)")  # fmt: skip
            return value  # type: ignore[no-any-return]
    return None


#: RoPE scalings whose frequencies are fixed once the config is read: the exported graph holds
#: them exactly. ``dynamic`` recomputes them from the sequence length past the original context
#: and ``longrope`` switches between two tables there; a graph traced once cannot follow either.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def check_rope_scaling(cfg: dict[str, Any], subject: str) -> None:
    """Refuse a config whose RoPE frequencies depend on the sequence length (transformers 5 writes
    the scaling into ``rope_parameters``, older configs into ``rope_scaling``; per layer type for
    Gemma-style configs).
    """
    found: list[dict[str, Any]] = []
    for key in ("rope_parameters", "rope_scaling"):
        p = cfg.get(key)
        if isinstance(p, dict):
            found += [v for v in p.values() if isinstance(v, dict)] or [p]
    for p in found:
        kind = p.get("rope_type") or p.get("type") or "default"
        if kind == "longrope" and p.get("short_factor") == p.get("long_factor"):
            continue  # one table whatever the length
        if kind not in STATIC_ROPE:
            raise UserError(
                subject,
                f"RoPE scaling '{kind}' (frequencies that change with the sequence length past "
                f"the original context {p.get('original_max_position_embeddings') or cfg.get('max_position_embeddings')})",
                f"RoPE fixed at export ({', '.join(STATIC_ROPE)})",
            )


def check_config_rope(base: Path) -> None:
    """:func:`check_rope_scaling` on the ``config.json`` beside a model, if there is one."""
    path = base / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(
                "model config", f"{path} is not a JSON object", "a transformers config.json"
            ) from None
        if isinstance(cfg, dict):
            check_rope_scaling(cfg, f"model config {path}")
