"""What a model directory's ``config.json`` says that every layer needs (core: imports errors and limits only)."""

from __future__ import annotations

import json
from pathlib import Path

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
