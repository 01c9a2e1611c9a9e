"""Shared pieces of the subcommands: resolving a model argument, console output."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from cscompile.errors import UserError

console = Console(stderr=False)
err_console = Console(stderr=True)


def resolve_model_dir(model: str) -> Path:
    """A zoo name (fetched on first use) or a path to a model directory / ``.onnx`` file."""
    from cscompile.models.zoo import ZOO, fetch

    if model in ZOO:
        return fetch(model, progress=lambda m: err_console.print(f"[dim]{m}[/dim]")).directory
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(
            "model",
            f"'{model}' is neither a known model name nor an existing path",
            f"one of {sorted(ZOO)} or a path to a model directory or .onnx file",
        )
    return path


def prompt_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--prompts FILE`` and ``--family F`` (repeatable), shared by the commands that read prompts."""
    fn = click.option("--family", "families", multiple=True, help="Only these task families (repeatable).")(
        fn
    )
    return click.option(
        "--prompts",
        "prompts_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="jsonl or text file (default: the shipped set).",
    )(fn)
