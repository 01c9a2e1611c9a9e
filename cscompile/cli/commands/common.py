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


def _option_name(param: click.Parameter | None) -> str:
    opts = getattr(param, "opts", None) or []
    return max(opts, key=len) if opts else (param.name if param is not None and param.name else "value")


class _Bounded(click.ParamType):
    """A number option within bounds; a bad value is the one-line :class:`UserError` (exit 2),
    not click's three-line usage error. Same arguments as ``click.IntRange`` / ``FloatRange``;
    floats must be finite (``nan`` compares false with every bound).
    """

    kind: type = int

    def __init__(self, min: float | None = None, max: float | None = None,
                 min_open: bool = False, max_open: bool = False) -> None:  # fmt: skip
        self.low, self.high, self.low_open, self.high_open = min, max, min_open, max_open

    def expected(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {self.high}"
        return what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        import math

        bad = UserError(_option_name(param), f"{value!r}", self.expected())
        if isinstance(value, bool):
            raise bad
        try:
            parsed = self.kind(value)
        except (TypeError, ValueError, OverflowError):
            raise bad from None
        if self.kind is int and isinstance(value, float) and parsed != value:
            raise bad
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise bad
        if self.low is not None and (parsed < self.low or (self.low_open and parsed == self.low)):
            raise bad
        if self.high is not None and (parsed > self.high or (self.high_open and parsed == self.high)):
            raise bad
        return parsed


class IntIn(_Bounded):
    """An integer option within bounds (one-line error)."""

    name = "integer"
    kind = int


class FloatIn(_Bounded):
    """A finite number option within bounds (one-line error)."""

    name = "float"
    kind = float


class _Threads(click.ParamType):
    """``--threads``: an integer in ``[1, cscompile.limits.max_threads()]`` (one-line error)."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from cscompile.limits import check_threads

        try:
            parsed = value if isinstance(value, int) else int(str(value))
        except ValueError:
            parsed = value
        return check_threads(parsed, _option_name(param))


THREADS = _Threads()


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
