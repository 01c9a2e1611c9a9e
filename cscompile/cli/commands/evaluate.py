"""``cscompile eval``: the prompt set and perplexity on a model, as a table and JSON."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from cscompile.cli.commands.common import (
    THREADS,
    IntIn,
    console,
    err_console,
    prompt_options,
    resolve_model_dir,
)


@click.command("eval")
@click.argument("model")
@prompt_options
@click.option("-n", "--max-new-tokens", default=64, show_default=True, type=IntIn(1, None))
@click.option(
    "--ppl-tokens",
    default=20480,
    show_default=True,
    type=IntIn(0, None),
    help="Tokens of corpus for perplexity (0 = skip).",
)
@click.option("--window", default=512, show_default=True, type=IntIn(2, None))
@click.option("--stride", default=512, show_default=True, type=IntIn(1, None))
@click.option(
    "--corpus",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Text file (default: pydoc_data.topics).",
)
@click.option("--threads", type=THREADS, default=None)
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the full report here."
)
def eval_cmd(model: str, prompts_path: Path | None, families: tuple[str, ...], max_new_tokens: int, ppl_tokens: int,
             window: int, stride: int, corpus: Path | None, threads: int | None, json_out: Path | None) -> None:  # fmt: skip
    """Measure MODEL: prefill, decode ms/token (median, p90), tokens/s, peak RSS, perplexity."""
    from cscompile.cache import atomic_write_json
    from cscompile.evaluation.report import evaluate_model
    from cscompile.runtime import load_text_model

    tm = load_text_model(resolve_model_dir(model), threads=threads)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(what: str, i: int, n: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=n)
            bar.update(tasks[what], completed=i)

        report = evaluate_model(
            tm,
            prompts_path,
            list(families) or None,
            max_new_tokens,
            ppl_tokens,
            window,
            stride,
            corpus,
            progress,
        )
    table = Table(
        "family",
        "prompts",
        "prompt tok",
        "prefill ms",
        "decode ms/tok",
        "p90",
        "tok/s",
        "retrieval acc",
        title=f"cscompile eval — {model}",
    )
    summ = report["summary"]
    for name, row in [*summ["families"].items(), ("all", summ["overall"])]:
        acc = "" if row["retrieval_accuracy"] is None else f"{row['retrieval_accuracy']:.2f}"
        table.add_row(name, str(row["prompts"]), f"{row['prompt_tokens_median']:.0f}", f"{row['prefill_ms_median']:.1f}",
                      f"{row['decode_ms_median']:.2f}", f"{row['decode_ms_p90']:.2f}", f"{row['tokens_per_s']:.1f}", acc)  # fmt: skip
    console.print(table)
    if report["perplexity"]:
        p = report["perplexity"]
        console.print(
            f"perplexity {p['perplexity']:.3f} over {p['tokens_scored']} tokens ({p['windows']} windows of {p['window']}, stride {p['stride']}, {p['corpus']})"
        )
    console.print(f"peak RSS {report['peak_rss_mb']:.0f} MB, threads {report['threads']}")
    if json_out:
        atomic_write_json(json_out, report)
        console.print(f"report written to {json_out}")
