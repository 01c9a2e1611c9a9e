"""The prompt set the project ships (five task families) and user prompt files.

Shipped set: ``data/prompts.jsonl``, made by ``tools/make_prompts.py``. Each row has
``family``, ``id`` and ``messages`` (chat turns); retrieval rows carry the expected ``answer``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from cscompile.errors import UserError

FAMILIES = ("code", "math", "summarization", "dialogue", "retrieval")


@dataclass(frozen=True)
class Prompt:
    family: str
    id: str
    messages: list[dict[str, str]]
    answer: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


def _parse_rows(lines: list[str], source: str) -> list[Prompt]:
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"prompt file {source} line {n}", f"invalid JSON ({exc.msg})", "one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise UserError(f"prompt file {source} line {n}", type(row).__name__, "a JSON object")
        if "messages" in row:
            msgs = row["messages"]
        elif "prompt" in row or "text" in row:
            msgs = [{"role": "user", "content": str(row.get("prompt", row.get("text")))}]
        else:
            raise UserError(
                f"prompt file {source} line {n}", f"keys {sorted(row)}", "'messages', 'prompt' or 'text'"
            )
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "content" in m for m in msgs):
            raise UserError(
                f"prompt file {source} line {n}", "malformed 'messages'", "a list of {role, content} objects"
            )
        known = {"family", "id", "messages", "answer", "prompt", "text"}
        out.append(
            Prompt(
                family=str(row.get("family", "custom")),
                id=str(row.get("id", f"line-{n}")),
                messages=msgs,
                answer=row.get("answer"),
                extra={k: v for k, v in row.items() if k not in known},
            )
        )
    return out


def load_prompts(path: Path | str | None = None, families: list[str] | None = None) -> list[Prompt]:
    """The shipped prompt set (``path=None``) or a user's jsonl / plain-text file (one prompt per line)."""
    if path is None:
        text = resources.files("cscompile.data").joinpath("prompts.jsonl").read_text()
        prompts = _parse_rows(text.splitlines(), "prompts.jsonl")
    else:
        p = Path(path)
        if not p.is_file():
            raise UserError(
                "prompt file", f"no file at {p}", "a .jsonl file or a text file with one prompt per line"
            )
        lines = p.read_text().splitlines()
        if p.suffix == ".jsonl":
            prompts = _parse_rows(lines, p.name)
        else:
            prompts = [
                Prompt("custom", f"line-{i}", [{"role": "user", "content": line}])
                for i, line in enumerate(lines, 1)
                if line.strip()
            ]
    if families:
        unknown = sorted(set(families) - {p.family for p in prompts})
        if unknown:
            raise UserError("prompt families", f"{unknown}", f"some of {sorted({p.family for p in prompts})}")
        prompts = [p for p in prompts if p.family in families]
    return prompts
