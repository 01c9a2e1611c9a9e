"""``cscompile calibrate``: calibration traces (features and unit activities) for recovery."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cscompile.cli.commands.common import (
    THREADS,
    IntIn,
    console,
    err_console,
    prompt_options,
    resolve_model_dir,
)


@click.command("calibrate")
@click.argument("model")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@prompt_options
@click.option(
    "-n",
    "--max-new-tokens",
    default=32,
    show_default=True,
    type=IntIn(0, None),
    help="Greedy decode steps traced per prompt.",
)
@click.option("--threads", type=THREADS, default=None)
def calibrate_cmd(model: str, out_dir: Path, prompts_path: Path | None, families: tuple[str, ...], max_new_tokens: int, threads: int | None) -> None:  # fmt: skip
    """Trace MODEL over calibration prompts (prefill + greedy decode) into OUT_DIR."""
    from cscompile.data.prompts import load_prompts
    from cscompile.recovery.calibrate import collect_traces

    prompts = load_prompts(prompts_path, list(families) or None)
    with Progress(
        TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console
    ) as bar:
        task = bar.add_task("prompts", total=len(prompts))
        traces = collect_traces(
            resolve_model_dir(model),
            prompts,
            out_dir,
            max_new_tokens,
            threads,
            lambda i, n: bar.update(task, completed=i),
        )
    m = traces.manifest
    console.print(
        f"{out_dir}: {len(m['prompts'])} prompts, {m['tokens']} tokens, {m['layers']} layers traced"
    )
