"""``cscompile build``: a model in, a bundle (directory or ``.csb`` archive) out."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from cscompile.cli.commands.common import FloatIn, IntIn, console, err_console, resolve_model_dir

PRECISION_HELP = (
    "Weight precision of the dense engine. Default int4: the measured lever on SmolLM2 "
    "(2.3x decode vs fp32, +0.4% perplexity) when the source GGUF grid is in the model's cache entry "
    "(`cscompile model fetch`); without it int4 is round-to-nearest (+35% perplexity there), so prefer "
    "int8 or fp32 for other models. fp32 still gets attention fusion where the model allows it."
)

STAGE_TEXT = {
    "check": "checking the input",
    "analyze": "analyzing (unit map)",
    "quantize": "building the dense engine ({precision})",
    "native": "packing the native engine (the source grid for the C decode step)",
    "vocab": "sensing the vocabulary: the LM head's preview, its margin and K (calibration, held-out)",
    "motifs": "compiling the motif family (calibration, allocation, profiling)",
    "pareto": "searching the Pareto front (proxy, latency table, points)",
    "prompt": "calibrating the prompt scorer (heads, depth-limited graph, ratio grid)",
    "classify": "training the classifier (layer blocks, exit adapters, thresholds)",
    "trt": "TensorRT: lowering, building and checking the engines",
    "gate": "checking every engine against the source (ONNX Runtime)",
    "package": "writing and verifying the bundle",
}


@click.command("build")
@click.argument("model")
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle path: ending in .csb writes one archive file, anything else a directory.",
)
@click.option(
    "--tokenizer",
    type=click.Path(path_type=Path),
    default=None,
    help="Tokenizer directory (default: the model directory's tokenizer/).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "int8", "int4"]),
    default="int4",
    show_default=True,
    help=PRECISION_HELP,
)
@click.option(
    "--target",
    type=click.Choice(["cpu", "trt"]),
    default="cpu",
    show_default=True,
    help="cpu: runs here with ONNX Runtime. trt: also TensorRT engines (dense and, with --motifs, the "
    "sparse motif engine), built and checked on this machine's NVIDIA GPU; needs cscompile[trt]. "
    "See docs/gpu.md.",
)
@click.option(
    "--trt-precision",
    type=click.Choice(["fp16", "bf16", "fp32"]),
    default="fp16",
    show_default=True,
    help="With --target trt: the precision TensorRT may use inside the engines.",
)
@click.option(
    "--trt-context",
    type=IntIn(16, None),
    default=2048,
    show_default=True,
    help="With --target trt: tokens (prompt + generated) the engines' profiles and KV buffers hold.",
)
@click.option(
    "--block-size",
    type=IntIn(1, None),
    default=None,
    help="FFN channels per unit (default: the smallest the target admits: 1 cpu, 16 trt).",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    default=None,
    help="Calibration text file for motif engines (recorded by hash in build.json).",
)
@click.option(
    "--max-engines",
    type=IntIn(1, 64),
    default=4,
    show_default=True,
    help="Most motif engines besides the dense one (used by the motif step).",
)
@click.option("--seed", type=IntIn(0, None), default=0, show_default=True, help="Build seed.")
@click.option(
    "--native",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Also add the native engine: block-quantized weights decoded by one C step per token (the source "
    "GGUF's grid exactly when there is one, else round-to-nearest Q4_1/Q8_0 for int4/int8), the default "
    "engine at run time (SmolLM2: about 2x llama.cpp's decode at the fp32 model's perplexity). auto: for "
    "int4/int8 builds of plain Llama decoders and Gemma 3 (without a logit soft-cap).",
)
@click.option(
    "--sensed-head",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Give the native engine a sensed vocabulary head: greedy steps score a 4-bit preview of the LM "
    "head, compute only the top candidates' exact logits, and run the full head whenever a margin "
    "calibrated at build time is not met (docs/design.md 'Sensed vocabulary head'). auto: whenever the "
    "build has a native engine and the margin held on held-out tokens.",
)
@click.option(
    "--motifs/--no-motifs",
    default=False,
    show_default=True,
    help="Also compile the motif family and switching runtime (SwiGLU models; minutes of calibration). "
    "Off by default: on SmolLM2 the motif engines are not yet faster than the dense int4 engine.",
)
@click.option(
    "--motif-m", type=IntIn(8, 4096), default=256, show_default=True, help="Measurements per layer."
)
@click.option(
    "--motif-banks",
    type=IntIn(1, 16),
    default=1,
    show_default=True,
    help="Task-conditioned predictor banks (k-means over calibration prompts; chosen at prefill). "
    "Each bank adds the decoders' size (~45 MB on SmolLM2 at m=256).",
)
@click.option(
    "--latency-budget",
    type=FloatIn(0, None, min_open=True),
    default=None,
    help="Decode ms/token the dense engine must reach on this machine, or the build fails (exit 2, "
    "nothing written). Measured, reported, not stored in the bundle.",
)
@click.option(
    "--pareto/--no-pareto",
    default=False,
    show_default=True,
    help="Also search the joint Pareto front and add its points as engines: with the native engine its "
    "width x depth x precision front (native-K, configurations over its weights), else the ONNX Runtime "
    "depth x precision front (pareto-K). Pick one at run time with --slo-ms-per-token / --max-ppl-increase. "
    "Needs the export extra; about 18 minutes on SmolLM2 on 2 cores. The latency table is measured here unless "
    "--latency-table pins it.",
)
@click.option(
    "--latency-table",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="With --pareto: a JSON latency table (coef_ms, e.g. a bundle's pareto.json) instead of measuring.",
)
@click.option(
    "--prompt-scorer/--no-prompt-scorer",
    default=False,
    show_default=True,
    help="Also add the prompt scorer (the engine's first layers, calibrated question-to-token attention "
    "heads, and the quality of each kept ratio) so `run --prompt-budget/--latency-budget` can compress long "
    "prompts. About 2 minutes and 55 MB on SmolLM2.",
)
@click.option(
    "--scorer-layers",
    type=IntIn(1, None),
    default=None,
    help="With --prompt-scorer: read attention from the first N layers at most (the scorer's cost; "
    "default a third of the model).",
)
@click.option(
    "--task",
    type=click.Choice(["generate", "classify"]),
    default="generate",
    show_default=True,
    help="classify: also train a text classifier with layer- and sentence-wise early exits "
    "(`cscompile classify`); needs --labels and --train.",
)
@click.option(
    "--labels", default=None, help="With --task classify: the label set, comma-separated (positive,negative)."
)
@click.option(
    "--train",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help='With --task classify: training rows, JSONL {"text": ..., "label": ...}; a fifth calibrates the exits.',
)
@click.option(
    "--teacher/--no-teacher",
    default=False,
    show_default=True,
    help="With --task classify: rows without a label are labelled by the full model (prompted for the label).",
)
@click.option(
    "--exit-layers",
    default=None,
    help="With --task classify: layer counts after which an exit adapter reads, e.g. 3,6,12 (default: about ten).",
)
@click.option(
    "--max-loss",
    type=FloatIn(0, 1, max_open=True),
    default=0.01,
    show_default=True,
    help="With --task classify: accuracy the early exits may lose against the full model (calibrated).",
)
def build_cmd(model: str, out: Path, tokenizer: Path | None, precision: str, target: str, block_size: int | None,
              calib: Path | None, max_engines: int, seed: int, motifs: bool, motif_m: int, motif_banks: int,
              latency_budget: float | None, pareto: bool, latency_table: Path | None,
              prompt_scorer: bool, scorer_layers: int | None, task: str, labels: str | None, train: Path | None,
              teacher: bool, exit_layers: str | None, max_loss: float, trt_precision: str,
              trt_context: int, native: str, sensed_head: str) -> None:  # fmt: skip
    """Compile MODEL (a name such as smollm2, a model directory or an .onnx file) into a bundle."""
    from cscompile.compiler.build import build_bundle

    model_path = resolve_model_dir(model)
    # transient: the stages vanish when done (their times are in the summary), so an error stays one line
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        reporter = _BarReporter(bar, precision)
        result = build_bundle(
            model_path,
            out,
            tokenizer=tokenizer,
            precision=precision,
            target=target,
            block_size=block_size,
            calib=calib,
            max_engines=max_engines,
            seed=seed,
            progress=reporter,
            motifs=motifs,
            motif_m=motif_m,
            motif_banks=motif_banks,
            latency_budget_ms=latency_budget,
            pareto=pareto,
            latency_table=latency_table,
            prompt_scorer=prompt_scorer,
            scorer_layers=scorer_layers,
            task=task,
            labels=labels,
            train=train,
            teacher=teacher,
            exit_layers=exit_layers,
            max_loss=max_loss,
            trt_precision=trt_precision,
            trt_context=trt_context,
            native=native,
            sensed_head=sensed_head,
        )
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {warning}")
    table = Table(title=f"cscompile build — {result.path}", show_header=False)
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")  # the content hash is never cut
    engines = ", ".join(f"{e['name']} ({e['kind']})" for e in result.manifest["engines"])
    stages = ", ".join(f"{k} {v:.1f}" for k, v in result.stage_seconds.items())
    rows = [
        ("bundle", f"{result.path} ({'archive' if result.archive else 'directory'})"),
        ("engines", engines),
        ("precision", f"{result.precision} ({result.build['quantize']['plan']})"),
        ("target", result.target),
        ("block size", str(result.block_size)),
        ("files", str(result.files)),
        ("size", f"{result.disk_bytes / 1e6:.1f} MB"),
        ("content hash", result.content_hash),
        *(
            [("decode here", f"{result.decode_ms:.2f} ms/token (budget {latency_budget:g})")]
            if result.decode_ms
            else []
        ),
        ("build time", f"{result.seconds:.1f} s ({stages})"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


#: how a step's progress messages are prefixed on its line
SAY_PREFIX = {"trt": "TensorRT: ", "classify": "classifier: ", "motifs": "motif family: ", "pareto": ""}


class _BarReporter:
    """The build's one progress display: a line per stage, updated by the stage's messages."""

    def __init__(self, bar: Progress, precision: str) -> None:
        self.bar, self.precision = bar, precision
        self.tasks: dict[str, TaskID] = {}

    def start(self, stage: str) -> None:
        self.tasks[stage] = self.bar.add_task(
            STAGE_TEXT.get(stage, stage).format(precision=self.precision), total=1
        )

    def done(self, stage: str) -> None:
        if stage in self.tasks:
            self.bar.update(self.tasks[stage], completed=1)

    def say(self, stage: str, message: str) -> None:
        if stage in self.tasks:
            self.bar.update(self.tasks[stage], description=SAY_PREFIX.get(stage, "") + message)
