"""``build_bundle``: a decoder ONNX (or fetched model directory) in, a runnable bundle out.

The build, in order: **check** every flag and input before any work → **analyze** the source
once (canonicalize, discover units, align to the target's block size: the unit map) → the
steps that read the analyzed source (**native**) → **quantize**, the dense engine at the
requested precision (the source GGUF grid exactly when it sits in the model's cache entry,
round-to-nearest otherwise; GQA attention fusion where the model allows it) → the steps that
read the dense engine or run on their own (**motifs**, **prompt**, **classify**, **pareto**,
**trt**) → **gate** (:mod:`cscompile.compiler.gate`: the dense and native engines against the
source through ONNX Runtime, the motif engines and ORT Pareto points against the source with the
same units removed) → **package** (:mod:`cscompile.compiler.package`). Each step is one
:class:`~cscompile.steps.base.Step` and adds one :class:`~cscompile.bundle.parts.BundlePart`.

Deterministic: the same inputs, flags and seed give the same content hash. Atomic: the output
appears only when complete; the work directory beside it is removed on success, failure and
Ctrl-C alike.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cscompile import scratch
from cscompile.bundle.parts import BundlePart
from cscompile.errors import UserError
from cscompile.steps.base import BuildConfig, BuildContext, Reporter, Silent, Step
from cscompile.steps.classify import ClassifierStep
from cscompile.steps.motifs import MotifStep
from cscompile.steps.native import NativeStep
from cscompile.steps.pareto import ParetoStep
from cscompile.steps.prompt import PromptScorerStep
from cscompile.steps.trt import TrtStep
from cscompile.steps.vocab import VocabStep

#: Steps that read the analyzed source graph: they run before the dense stage rewrites it.
SOURCE_STEPS: tuple[Step, ...] = (NativeStep(), VocabStep())
#: Steps after the dense engine, in order. Order matters where one reads what another made:
#: pareto reads the native weights (its front is the native engine's), trt the motif family.
STEPS: tuple[Step, ...] = (MotifStep(), PromptScorerStep(), ClassifierStep(), ParetoStep(), TrtStep())


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_bundle` wrote."""

    path: Path
    archive: bool
    content_hash: str
    manifest: dict[str, Any]
    build: dict[str, Any]
    engines: tuple[str, ...]
    precision: str
    target: str
    block_size: int
    files: int
    total_bytes: int  # data files listed in the manifest
    disk_bytes: int  # what the output occupies (manifest and tar headers included)
    seconds: float
    stage_seconds: dict[str, float]
    warnings: tuple[str, ...] = ()
    decode_ms: float | None = None  # measured here when a latency budget was given (not stored)
    analyses: int = 1  # times the source graph was analyzed


class _Stages:
    """Times the build's stages and shows them on the reporter."""

    def __init__(self, progress: Reporter) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._since = 0.0

    def enter(self, name: str) -> None:
        self.finish()
        self._current, self._since = name, time.perf_counter()
        self.progress.start(name)

    def finish(self) -> None:
        if self._current is not None:
            self.seconds[self._current] = time.perf_counter() - self._since
            self.progress.done(self._current)
            self._current = None


def build_bundle(
    model: Path, out: Path, config: BuildConfig | None = None, *, progress: Reporter | None = None,
    extra_parts: tuple[BundlePart, ...] = (), analysis: Any = None, **options: Any,
) -> BuildResult:  # fmt: skip
    """Build ``model`` (a model directory or ``.onnx`` file) into the bundle ``out`` (``.csb`` = archive).

    ``config`` holds the settings (:class:`~cscompile.steps.base.BuildConfig`, one field per
    ``cscompile build`` flag); keyword ``options`` override its fields. ``latency_budget_ms``:
    measure the dense engine's decode latency here before writing; over budget the build fails
    (exit 2) and writes nothing; the measurement is reported, never stored. ``extra_parts``: parts
    made by the caller, added like a step's. ``analysis``: the source's
    :func:`~cscompile.passes.pipeline.analyze` result when the caller already made it (the build
    then does not analyze the source again).
    """
    from cscompile.bundle.format import ARCHIVE_SUFFIX
    from cscompile.bundle.writer import check_out
    from cscompile.compiler.gate import gate_stage
    from cscompile.compiler.intake import source_paths, tokenizer_files
    from cscompile.compiler.package import package

    cfg = dataclasses.replace(config or BuildConfig(), **options)
    t_start = time.perf_counter()
    stages = _Stages(progress or Silent())
    stages.enter("check")
    cfg.check()
    for step in (*SOURCE_STEPS, *STEPS):
        step.check(cfg)
    labels, examples = ClassifierStep.examples(cfg) if cfg.task == "classify" else (None, None)
    out = Path(out).expanduser()
    archive = out.name.endswith(ARCHIVE_SUFFIX)
    onnx_path, base = source_paths(Path(model))
    tok_files = tokenizer_files(cfg.tokenizer, base)
    check_out(out, archive)  # refuse a bad output path before minutes of work, not after
    try:  # the work directory sits next to the output: same file system, no copy across devices
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch.sweep(out.parent, f".{out.name}.build-")  # what killed builds left behind
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
        scratch.hold(work)
    except OSError as exc:
        raise UserError(
            f"output {out}", f"its directory cannot be written ({exc.strerror or exc})", "a writable location"
        ) from None
    ctx = BuildContext(
        cfg, onnx_path, base, work, tok_files, progress=stages.progress, labels=labels, examples=examples
    )
    ctx._analysis = analysis
    parts = list(extra_parts)
    try:
        stages.enter("analyze")
        _analyze(ctx)
        for step in SOURCE_STEPS:
            parts += _run(step, ctx, stages)
        stages.enter("quantize")
        _dense(ctx)
        for step in STEPS:
            parts += _run(step, ctx, stages)
        stages.enter("gate")  # every default engine against the source through ORT
        parts = gate_stage(ctx, parts)
        stages.enter("package")
        info, build_info = package(ctx, out, archive, parts)
        stages.finish()
    finally:
        scratch.remove(work)
    disk = out.stat().st_size if archive else info.total_bytes + (out / "manifest.json").stat().st_size
    return BuildResult(
        path=out, archive=archive, content_hash=info.content_hash, manifest=info.manifest, build=build_info,
        engines=tuple(e["name"] for e in info.manifest["engines"]), precision=cfg.precision, target=cfg.target,
        block_size=ctx.block, files=info.files, total_bytes=info.total_bytes, disk_bytes=disk,
        seconds=time.perf_counter() - t_start, stage_seconds=stages.seconds, warnings=tuple(ctx.warnings),
        decode_ms=ctx.decode_ms, analyses=ctx.analyses,
    )  # fmt: skip


def _run(step: Step, ctx: BuildContext, stages: _Stages) -> list[BundlePart]:
    if not step.wanted(ctx.config):
        return []
    stages.enter(step.name)
    part = step.build(ctx)
    return [part] if part is not None else []


def _analyze(ctx: BuildContext) -> None:
    """The unit map at the build's block size (and the decoder I/O check) from one analysis."""
    from cscompile.compiler.intake import check_config_matches_graph, check_decoder_io, check_decoder_io_file
    from cscompile.model_config import check_config_rope
    from cscompile.passes import AlignPass
    from cscompile.passes.align import admissible_block_sizes
    from cscompile.passes.pipeline import run_passes

    check_config_rope(ctx.base)  # RoPE that a traced graph cannot hold: refused before any work
    label = f"ONNX model {ctx.onnx_path.name}"
    try:
        graph, um = ctx.analysis()
    except UserError:
        check_decoder_io_file(ctx.onnx_path, label)  # the clearer error when the I/O is not a decoder's
        raise
    check_decoder_io(graph, label)
    check_config_matches_graph(ctx.base, um)  # a setting the exporter dropped: refused, not built
    target = ctx.config.target
    block = ctx.config.block_size
    if block is None:
        sizes = admissible_block_sizes(um, target)
        if not sizes:
            raise UserError(
                f"target {target}",
                f"no block size fits the FFN widths {sorted({la.mlp.intermediate_size for la in um.layers})}",
                "a model whose FFN width is a multiple of 16 (for trt), or --target cpu",
            )
        block = sizes[0]
    if block != um.block_size or target != "cpu":
        um = run_passes(graph, [("align", AlignPass(block, target))]).meta["cscompile.unit_map"]
    ctx.unit_map, ctx.block = um, block
    if ctx.config.motifs:  # a model the motif engines cannot lower: refused now, not after minutes
        MotifStep.check_units(um)


def _dense(ctx: BuildContext) -> None:
    """The dense ONNX Runtime engine at the requested precision, from the analyzed source."""
    from cscompile.decode.session import measure_decode_ms
    from cscompile.passes.precision import precision_plan, quantize_model

    c = ctx.config
    engine_dir = ctx.work / "engine"
    try:
        report = quantize_model(ctx.onnx_path, engine_dir, precision_plan(c.precision), "auto",
                                analyzed=ctx.take_analysis())  # fmt: skip
    except UserError as exc:
        if exc.subject != "quantization":
            raise
        raise UserError(
            f"--precision {c.precision}",
            f"{ctx.onnx_path.name} cannot be quantized ({exc.received})",
            f"{exc.expected}" + (" (or build with --precision fp32)" if c.precision != "fp32" else ""),
        ) from None
    ctx.report, ctx.engine_path = report, engine_dir / "model.onnx"
    ctx.grid = Path(report["grid"]) if report.get("grid") else None
    ctx.fused = str(report.get("attention", "")).startswith("GroupQueryAttention")
    if c.precision == "int4" and ctx.grid is None:
        ctx.warnings.append(
            "no source GGUF next to the model: int4 weights are round-to-nearest "
            "(+35% perplexity on SmolLM2); --precision int8 keeps more quality"
        )
    if c.latency_budget_ms is not None:
        ctx.decode_ms = measure_decode_ms(ctx.engine_path)
        if ctx.decode_ms > c.latency_budget_ms:
            raise UserError(
                "--latency-budget",
                f"the dense {c.precision} engine decodes at {ctx.decode_ms:.2f} ms/token on this machine, "
                f"over the budget of {c.latency_budget_ms:g} ms",
                "a larger budget, or a lower precision (--precision int4)",
            )
