"""``cscompile classify``: label a text with a bundle built with ``--task classify``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cscompile.cli.commands.common import THREADS, console, err_console


@click.command("classify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("text", required=False)
@click.option(
    "--file",
    "text_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Read the text from a UTF-8 file instead (or '-' as TEXT for stdin).",
)
@click.option(
    "--policy",
    type=click.Choice(["2d", "layer", "sentence", "full"]),
    default="2d",
    show_default=True,
    help="2d: exit between layers and between sentences; layer / sentence: one of them; full: neither.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as one JSON object.")
@click.option("--threads", type=THREADS, default=None, help="Intra-op threads (default: all cores).")
def classify_cmd(bundle: Path, text: str | None, text_file: Path | None, policy: str, as_json: bool,
                 threads: int | None) -> None:  # fmt: skip
    """Label TEXT with BUNDLE's classifier: prints the label, its confidence and where it exited."""
    import dataclasses

    from cscompile.errors import UserError
    from cscompile.runtime import load

    if (text is None) == (text_file is None):
        raise UserError("classify", "needs exactly one of TEXT and --file", "a text argument or --file PATH")
    if text_file is not None:
        try:
            text = text_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--file {text_file}", "is not UTF-8 text", "a UTF-8 text file") from None
    elif text == "-":
        text = sys.stdin.read()
    with load(bundle, threads=threads) as model:
        res = model.classify(text or "", policy)
    if as_json:
        console.print_json(json.dumps(dataclasses.asdict(res)))
    else:
        click.echo(res.summary())
    if not res.in_distribution:
        err_console.print(
            "[yellow]warning:[/yellow] the text is unlike every training text (first exit): it was "
            "answered by the full model, and the label may still be unreliable"
        )
