"""What a model directory's ``config.json`` says that every layer needs (core: no other imports)."""

from __future__ import annotations

import json
from pathlib import Path

from cscompile.errors import UserError


def read_context_length(base: Path) -> int | None:
    """``max_position_embeddings`` from the ``config.json`` beside the model (or in ``tokenizer/``)."""
    for cfg_path in (base / "config.json", base / "tokenizer" / "config.json"):
        if cfg_path.is_file():
            try:
                return json.loads(cfg_path.read_text()).get("max_position_embeddings")
            except (json.JSONDecodeError, AttributeError):
                raise UserError(
                    "model config", f"{cfg_path} is not a JSON object", "a transformers config.json"
                ) from None
    return None
