"""What a build step adds to a bundle: files, engines (manifest entries) and sections.

Every build step (native engine, motif family, Pareto front, prompt scorer, classifier, TensorRT)
returns one :class:`BundlePart`; the build merges them, refusing a second file, engine or section
of the same name, and the bundle writer packages the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cscompile.errors import UserError


@dataclass
class BundlePart:
    """What a later build step adds to the bundle: files, engines (manifest entries), sections."""

    files: dict[str, Path | bytes] = field(default_factory=dict)
    engines: list[dict[str, Any]] = field(default_factory=list)
    sections: dict[str, str] = field(default_factory=dict)


def merge_parts(
    files: dict[str, Path | bytes],
    engines: list[dict[str, Any]],
    sections: dict[str, str],
    parts: Sequence[BundlePart],
) -> None:
    """Add every part's files, engines and sections, refusing duplicates by name."""
    for i, part in enumerate(parts):
        where = f"build part {i}"
        for rel, src in part.files.items():
            if rel in files:
                raise UserError(
                    where, f"adds the file {rel!r} a previous step already wrote", "distinct paths"
                )
            files[rel] = src
        for eng in part.engines:
            name = eng.get("name") if isinstance(eng, Mapping) else None
            if any(e["name"] == name for e in engines):
                raise UserError(where, f"adds a second engine named {name!r}", "unique engine names")
            engines.append(dict(eng))
        for name, rel in part.sections.items():
            if name in sections:
                raise UserError(where, f"adds a second section {name!r}", "unique section names")
            sections[name] = rel
