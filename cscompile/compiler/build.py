"""``build_bundle``: a decoder ONNX (or fetched model directory) in, a runnable bundle out.

Stages, in order: **check** the input (an ONNX KV-cache decoder, a tokenizer, the flags) →
**analyze** (canonicalize, discover units, align to the target's block size: the unit map) →
**quantize** (the dense engine at the requested precision, through
:func:`~cscompile.passes.precision.quantize_model`: exact GGUF grid when the source GGUF sits
in the model's cache entry, round-to-nearest otherwise; GQA attention fusion where the model
allows it, at every precision) → **package** (:func:`~cscompile.bundle.write_bundle`).

Bundle layout: ``engines/dense.onnx`` (+ external data, if any), ``tokenizer/*``,
``config.json`` (if the model has one), ``unit_map.json`` (the source model's unit map at the
build's block size) and ``build.json`` (the build's parameters; no timestamps, no absolute
paths). Later build steps (motif engines) add files, engines and sections through
:class:`BundlePart`.

Deterministic: the same inputs, flags and seed give the same :func:`~cscompile.bundle.content_hash`
(quantization and ONNX serialization are deterministic; the bundle writer is byte-stable).
Atomic: the output appears only when complete; quantization works in a temporary sibling
directory of the output that is removed on success, failure and Ctrl-C alike.

Target ``trt`` (an NVIDIA GPU with TensorRT 10 is required, checked before any work) adds the
**trt** stage: the dense graph and the motif family lowered for TensorRT's ONNX parser, built into
weight-stripped engines on this GPU and compared with ONNX Runtime through Polygraphy
(:mod:`cscompile.trt`); the bundle is marked ``requires.target = "trt"`` and records the
TensorRT version and GPU it was built for.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from cscompile import __version__
from cscompile.bundle.parts import BundlePart, merge_parts
from cscompile.errors import UserError

PRECISIONS = ("fp32", "int8", "int4")
TARGETS = ("cpu", "trt")
TASKS = ("generate", "classify")
STAGES = ("check", "analyze", "quantize", "native", "motifs", "pareto", "trt", "package")
ENGINE_FILE = "engines/dense.onnx"
TOKENIZER_PREFIX = "tokenizer/"
#: Files taken from a model directory that has no ``tokenizer/`` subdirectory.
LOOSE_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)

#: ``progress(stage, status)`` with ``status`` "start" or "done"; stages are :data:`STAGES`.
Progress = Callable[[str, str], None]


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
    decode_ms: float | None = None  # measured on this machine when a latency budget was given (not stored)


def measure_decode_ms(engine: Path, threads: int | None = None, prompt: int = 32, steps: int = 16) -> float:
    """Median decode ms/token of an ONNX decoder here (teacher-forced on fixed ids after a prompt)."""
    from cscompile.decode.session import DecoderSession, decode_step_seconds

    return float(np.median(decode_step_seconds(DecoderSession(engine, threads=threads), prompt, steps))) * 1e3


def work_tokenizer(work: Path, tok_files: dict[str, Path]) -> Path:
    """The bundle's tokenizer files as a plain directory under ``work`` (made once per build)."""
    tok_dir = (work / "tok").resolve()
    if not tok_dir.is_dir():
        tok_dir.mkdir()
        for rel, src in tok_files.items():
            (tok_dir / rel.rsplit("/", 1)[-1]).write_bytes(Path(src).read_bytes())
    return tok_dir


def _noop(stage: str, status: str) -> None:
    return None


def precision_plan(precision: str) -> Any:
    """The :class:`~cscompile.passes.quantize.PrecisionPlan` behind each ``--precision``."""
    from cscompile.passes.quantize import PrecisionPlan

    if precision == "fp32":
        return PrecisionPlan(attn="fp32", ffn="fp32", lm_head="fp32")
    if precision == "int8":
        return PrecisionPlan(attn="int8", ffn="int8", lm_head="int8")
    if precision == "int4":
        return PrecisionPlan(attn="int4", ffn="int4", lm_head="int8")  # a 4-bit LM head hurts quality
    raise UserError("--precision", f"'{precision}'", f"one of {', '.join(PRECISIONS)}")


def source_paths(model: Path) -> tuple[Path, Path]:
    """``(source .onnx, model base directory)`` of a model directory or ``.onnx`` file."""
    model = Path(model).expanduser()
    if model.is_dir():
        onnx_path = model / "model.onnx"
        if not onnx_path.is_file():
            raise UserError(
                "model", f"directory {model} has no model.onnx", "a model directory or an .onnx file"
            )
        return onnx_path, model
    if not model.is_file():
        raise UserError("model", f"no file or directory at {model}", "a model directory or an .onnx file")
    if model.suffix != ".onnx":
        raise UserError("model", f"{model} is not an .onnx file", "a model directory or an .onnx file")
    return model, model.parent


def model_name(onnx_path: Path, base: Path) -> str:
    """A short name for the manifest's ``source.name``: the directory name, or the file's stem."""
    return onnx_path.stem if onnx_path.stem != "model" else (base.resolve().name or "model")


def tokenizer_files(tokenizer: Path | None, base: Path) -> dict[str, Path]:
    """``{bundle path: source file}`` of the tokenizer, checked by loading it once."""
    from cscompile.bundle.format import _SEGMENT
    from cscompile.decode.tokenizer import Tokenizer

    if tokenizer is not None:
        tok_dir = Path(tokenizer).expanduser()
        if not tok_dir.is_dir():
            raise UserError("--tokenizer", f"no directory at {tok_dir}", "a Hugging Face tokenizer directory")
        names = sorted(p.name for p in tok_dir.iterdir())
    elif (base / "tokenizer").is_dir():
        tok_dir = base / "tokenizer"
        names = sorted(p.name for p in tok_dir.iterdir())
    else:
        tok_dir = base
        names = [n for n in LOOSE_TOKENIZER_FILES if (base / n).is_file()]
    if not (tok_dir / "tokenizer.json").is_file():
        raise UserError(
            "tokenizer",
            f"no tokenizer.json in {tok_dir}",
            "a model directory with tokenizer/ (as `cscompile model fetch` writes), or --tokenizer DIR",
        )
    Tokenizer(tok_dir)  # parse errors surface here, not when the bundle is loaded
    out: dict[str, Path] = {}
    for name in names:
        path = tok_dir / name
        if path.is_file() and not path.is_symlink() and _SEGMENT.fullmatch(name) and not name.startswith("."):
            out[TOKENIZER_PREFIX + name] = path
    return out


def _tensor_info(name: str, dims: Sequence[Any], dtype: str) -> Any:
    from cscompile.decode.spec import TensorInfo

    return TensorInfo(name, tuple(d if isinstance(d, int) else str(d) for d in dims), dtype)


def check_decoder_io(model: Any, label: str) -> None:
    """Raise the runtime's one-line error unless ``model`` (onnx-ir) has KV-cache decoder I/O."""
    from cscompile.decode.spec import DecoderSpec

    def info(values: Sequence[Any]) -> list[Any]:
        out = []
        for v in values:
            dims = list(v.shape) if v.shape is not None else []
            dtype = f"tensor({v.dtype.name.lower()})" if v.dtype is not None else "tensor(float)"
            out.append(_tensor_info(v.name, [d if isinstance(d, int) else str(d) for d in dims], dtype))
        return out

    DecoderSpec.from_io(info(model.graph.inputs), info(model.graph.outputs), source=label)


def _check_decoder_io_file(onnx_path: Path, label: str) -> None:
    """The same check from the protobuf alone; silent if the file does not even parse."""
    import onnx

    from cscompile.decode.spec import DecoderSpec

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - the caller re-raises the parse error it already has
        return

    def info(values: Sequence[Any]) -> list[Any]:
        out = []
        for v in values:
            dims = [
                d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim
            ]
            out.append(_tensor_info(v.name, dims, "tensor(float)"))
        return out

    DecoderSpec.from_io(info(proto.graph.input), info(proto.graph.output), source=label)


def onnx_header(src: Path | bytes) -> tuple[dict[str, int], list[str]]:
    """``(opsets, external-data locations)`` of one ONNX file or serialized model (weights not loaded)."""
    import onnx

    from cscompile.bundle.loader import _tensors

    model = (
        onnx.load_from_string(src)
        if isinstance(src, bytes)
        else onnx.load(str(src), load_external_data=False)
    )
    opsets: dict[str, int] = {}
    for imp in model.opset_import:
        domain = "" if imp.domain in ("", "ai.onnx") else imp.domain
        opsets[domain] = max(opsets.get(domain, 0), int(imp.version))
    locations = {e.value for t in _tensors(model) for e in t.external_data if e.key == "location"}
    return opsets, sorted(locations)


def merge_opsets(headers: Sequence[dict[str, int]]) -> dict[str, int]:
    """The highest version of every operator domain over several models."""
    out: dict[str, int] = {}
    for opsets in headers:
        for domain, version in opsets.items():
            out[domain] = max(out.get(domain, 0), version)
    return out


def _default_block_size(um: Any, target: str) -> int:
    from cscompile.passes.align import admissible_block_sizes

    sizes = admissible_block_sizes(um, target)
    if not sizes:
        raise UserError(
            f"target {target}",
            f"no block size fits the FFN widths {sorted({la.mlp.intermediate_size for la in um.layers})}",
            "a model whose FFN width is a multiple of 16 (for trt), or --target cpu",
        )
    return sizes[0]


class _Stages:
    """Times the build's stages and reports them to ``progress``."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._since = 0.0

    def enter(self, name: str) -> None:
        self.finish()
        self._current, self._since = name, time.perf_counter()
        self.progress(name, "start")

    def finish(self) -> None:
        if self._current is not None:
            self.seconds[self._current] = time.perf_counter() - self._since
            self.progress(self._current, "done")
            self._current = None


def build_bundle(
    model: Path,
    out: Path,
    *,
    tokenizer: Path | None = None,
    precision: str = "int4",
    target: str = "cpu",
    block_size: int | None = None,
    calib: Path | None = None,
    max_engines: int = 4,
    seed: int = 0,
    extra_parts: Sequence[BundlePart] = (),
    progress: Progress = _noop,
    motifs: bool = False,
    motif_m: int = 256,
    motif_banks: int = 1,
    motif_say: Callable[[str], None] | None = None,
    latency_budget_ms: float | None = None,
    pareto: bool = False,
    latency_table: Path | None = None,
    pareto_say: Callable[[str], None] | None = None,
    prompt_scorer: bool = False,
    scorer_layers: int | None = None,
    task: str = "generate",
    labels: str | Sequence[str] | None = None,
    train: Path | None = None,
    teacher: bool = False,
    exit_layers: str | Sequence[int] | None = None,
    max_loss: float = 0.01,
    classify_say: Callable[[str], None] | None = None,
    trt_precision: str = "fp16",
    trt_context: int = 2048,
    trt_say: Callable[[str], None] | None = None,
    native: str = "auto",
) -> BuildResult:
    """Build ``model`` (a model directory or ``.onnx`` file) into the bundle ``out`` (``.csb`` = archive).

    ``block_size`` defaults to the smallest the target admits (1 for cpu, 16 for trt).
    ``native``: also add the native engine (:mod:`cscompile.native.engine`: block-quantized
    weights run by one C step per token — the source GGUF grid exactly when there is one, else
    round-to-nearest Q4_1 (int4) or Q8_0 (int8); the runtime's default engine when present).
    ``auto`` adds it for int4/int8 cpu builds of plain Llama decoders and warns why not
    otherwise; ``on`` fails the build if it cannot; ``off`` leaves it out.
    ``motifs``: also compile the motif family (per-layer FFN densities, sensing predictors with
    ``motif_m`` measurements, the switching controller) from the source's fp32 weights, on
    ``calib`` (a text or prompts ``.jsonl`` file; default: the shipped prompt set), keeping at
    most ``max_engines`` motifs on the measured Pareto front. The dense engine is built either way.
    ``latency_budget_ms``: measure the dense engine's decode latency on this machine before
    writing; if it is over budget the build fails (exit 2) and writes nothing. The measurement
    is reported, never stored (it would make the bundle's hash depend on the machine's noise).
    ``pareto``: also search the joint front (:mod:`cscompile.search`) and add its points as
    engines: with the native engine its width × depth × precision front (``native-K``,
    configurations over the native weights), else the ONNX Runtime depth × precision front
    (``pareto-K``) (needs the fetched model's ``hf/`` checkpoint and the export extra); ``latency_table`` pins the table (a JSON with ``coef_ms``) instead of
    measuring it here, which makes such a build reproducible.
    ``prompt_scorer``: also add the prompt compressor's scorer (:mod:`cscompile.prompt`): the
    dense engine's first layers, with the attention heads that best find the evidence in the
    shipped calibration examples (needs a fused-attention engine); ``scorer_layers`` bounds
    the scorer's depth (its cost; default a third of the layers).
    ``task="classify"``: also add a classifier with early exits (:mod:`cscompile.exits.classifier`):
    ``labels`` (comma-separated or a list), ``train`` (JSONL rows ``{"text", "label"}``; with
    ``teacher`` rows without a label are labelled by the full model), ``exit_layers`` (default
    about ten blocks), thresholds calibrated to lose at most ``max_loss`` accuracy.
    """
    from cscompile.bundle import write_bundle
    from cscompile.bundle.format import ARCHIVE_SUFFIX
    from cscompile.bundle.writer import _check_out
    from cscompile.cache import sha256_file
    from cscompile.passes import AlignPass
    from cscompile.passes import precision as quantize_mod
    from cscompile.passes.pipeline import analyze, run_passes

    t_start = time.perf_counter()
    stages = _Stages(progress)
    warnings: list[str] = []

    # -- check ---------------------------------------------------------------------------
    stages.enter("check")
    if precision not in PRECISIONS:
        raise UserError("--precision", f"'{precision}'", f"one of {', '.join(PRECISIONS)}")
    if target not in TARGETS:
        raise UserError("--target", f"'{target}'", f"one of {', '.join(TARGETS)}")
    if block_size is not None and (isinstance(block_size, bool) or block_size < 1):
        raise UserError("--block-size", f"{block_size}", "a positive integer")
    if isinstance(max_engines, bool) or not isinstance(max_engines, int) or max_engines < 1:
        raise UserError("--max-engines", f"{max_engines}", "a positive integer")
    if scorer_layers is not None and not prompt_scorer:
        raise UserError("--scorer-layers", "given without --prompt-scorer", "--prompt-scorer")
    if task not in TASKS:
        raise UserError("--task", f"'{task}'", f"one of {', '.join(TASKS)}")
    examples = None
    if task == "classify":
        from cscompile.exits.classifier import parse_labels, read_examples

        if labels is None or train is None:
            raise UserError("--task classify", "without " + ("--labels" if labels is None else "--train"),
                            "--labels A,B,... and --train rows.jsonl")  # fmt: skip
        if not 0 <= max_loss < 1:
            raise UserError("--max-loss", f"{max_loss}", "an accuracy fraction in [0, 1)")
        labels = parse_labels(labels)
        examples = read_examples(Path(train), labels, teacher)
    elif labels is not None or train is not None or teacher or exit_layers is not None:
        raise UserError("--labels/--train/--teacher/--exit-layers", "given without --task classify",
                        "--task classify")  # fmt: skip
    if native not in ("auto", "on", "off"):
        raise UserError("--native", f"'{native}'", "auto, on or off")
    if native == "on" and (precision == "fp32" or target != "cpu"):
        raise UserError("--native on", f"with --precision {precision} --target {target}",
                        "--precision int4 or int8 with --target cpu (the engine runs block-quantized weights on the CPU)")  # fmt: skip
    if latency_table is not None and not pareto:
        raise UserError("--latency-table", "given without --pareto", "--pareto (the table is the front's)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError("--seed", f"{seed}", "an integer >= 0")
    if target == "trt":
        from cscompile.trt.engine import require_gpu
        from cscompile.trt.spec import PRECISIONS as TRT_PRECISIONS

        if trt_precision not in TRT_PRECISIONS:
            raise UserError("--trt-precision", f"'{trt_precision}'", f"one of {', '.join(TRT_PRECISIONS)}")
        if isinstance(trt_context, bool) or not isinstance(trt_context, int) or trt_context < 16:
            raise UserError("--trt-context", f"{trt_context}", "an integer >= 16 (tokens the engines hold)")
        if motifs and motif_banks > 1:
            raise UserError(
                "--motif-banks", f"{motif_banks} with --target trt", "1 (the TensorRT runner has no banks)"
            )
        require_gpu("--target trt")  # before minutes of work, not after
    out = Path(out).expanduser()
    archive = out.name.endswith(ARCHIVE_SUFFIX)
    onnx_path, base = source_paths(Path(model))
    calib_sha = None
    if calib is not None:
        calib = Path(calib).expanduser()
        if not calib.is_file():
            raise UserError("--calib", f"no file at {calib}", "a calibration text file")
        calib_sha = sha256_file(calib)
    tok_files = tokenizer_files(tokenizer, base)
    _check_out(out, archive)  # refuse a bad output path before minutes of work, not after
    try:  # the work directory sits next to the output: same file system, no copy across devices
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    except OSError as exc:
        raise UserError(
            f"output {out}", f"its directory cannot be written ({exc.strerror or exc})", "a writable location"
        ) from None
    label = f"ONNX model {onnx_path.name}"

    try:
        # -- analyze -------------------------------------------------------------------------
        stages.enter("analyze")
        try:
            graph, um = analyze(onnx_path)
        except UserError:
            _check_decoder_io_file(onnx_path, label)  # the clearer error when the I/O is not a decoder's
            raise
        check_decoder_io(graph, label)
        block = block_size if block_size is not None else _default_block_size(um, target)
        if block != um.block_size or target != "cpu":
            um = run_passes(graph, [("align", AlignPass(block, target))]).meta["cscompile.unit_map"]
        del graph
        # compact: at block size 1 the unit list is most of the map (SmolLM2: 13.7 MB vs 25.8 MB indented)
        um_dict = um.to_dict()
        unit_map_json = (json.dumps(um_dict, sort_keys=True, separators=(",", ":")) + "\n").encode()

        # -- quantize ------------------------------------------------------------------------
        stages.enter("quantize")
        plan = precision_plan(precision)
        engine_dir = work / "engine"
        try:
            report = quantize_mod.quantize_model(onnx_path, engine_dir, plan, "auto")
        except UserError as exc:
            if exc.subject != "quantization":
                raise
            raise UserError(
                f"--precision {precision}",
                f"{onnx_path.name} cannot be quantized ({exc.received})",
                f"{exc.expected} (or build with --precision fp32)",
            ) from None
        grid = report.get("grid")
        if precision == "int4" and not grid:
            warnings.append(
                "no source GGUF next to the model: int4 weights are round-to-nearest "
                "(+35% perplexity on SmolLM2); --precision int8 keeps more quality"
            )
        fused = str(report.get("attention", "")).startswith("GroupQueryAttention")
        engine_path = engine_dir / "model.onnx"
        decode_ms = None
        if latency_budget_ms is not None:
            decode_ms = measure_decode_ms(engine_path)
            if decode_ms > latency_budget_ms:
                raise UserError(
                    "--latency-budget",
                    f"the dense {precision} engine decodes at {decode_ms:.2f} ms/token on this machine, "
                    f"over the budget of {latency_budget_ms:g} ms",
                    "a larger budget, or a lower precision (--precision int4)",
                )

        # -- native --------------------------------------------------------------------------
        native_weights = None
        if native == "on" or (native == "auto" and precision != "fp32" and target == "cpu"):
            stages.enter("native")
            from cscompile.native.engine import part_from_weights, weights_from_model

            try:
                bits = 8 if precision == "int8" else 4
                native_weights = weights_from_model(onnx_path, Path(grid) if grid else None, bits=bits)
                extra_parts = [*extra_parts, part_from_weights(native_weights)]
            except UserError as exc:
                if native == "on":
                    raise
                warnings.append(f"no native engine ({exc.subject}: {exc.received}); the dense engine runs")

        # -- motifs --------------------------------------------------------------------------
        motif_files = None
        if motifs:
            stages.enter("motifs")
            from cscompile.motifs.artifact import motif_part

            part = motif_part(
                onnx_path, work_tokenizer(work, tok_files), calib, m=motif_m, max_engines=max_engines, seed=seed, say=motif_say,
                banks=motif_banks,
            )  # fmt: skip
            motif_files = part.files
            extra_parts = [*extra_parts, part]

        # -- prompt scorer ---------------------------------------------------------------------
        if prompt_scorer:
            stages.enter("prompt")
            from cscompile.decode.tokenizer import Tokenizer
            from cscompile.prompt.calibrate import prompt_part

            if not fused:
                raise UserError(
                    "--prompt-scorer",
                    f"the {precision} engine of {onnx_path.name} has unfused attention",
                    "a model whose attention fuses (Llama-style RoPE, head_dim a multiple of 16)",
                )
            part = prompt_part(
                engine_path,
                Tokenizer(work_tokenizer(work, tok_files)),
                work / "prompt",
                max_layer=scorer_layers,
            )
            extra_parts = [*extra_parts, part]

        # -- classify ------------------------------------------------------------------------
        if examples is not None:
            stages.enter("classify")
            from cscompile.decode.tokenizer import Tokenizer
            from cscompile.exits.classifier import classify_part

            part = classify_part(
                engine_path, um_dict["layers"], Tokenizer(work_tokenizer(work, tok_files)),
                examples, list(labels or ()), work / "classify", exit_layers=exit_layers, max_loss=max_loss,
                say=classify_say or (lambda m: None),
            )  # fmt: skip
            extra_parts = [*extra_parts, part]

        # -- pareto --------------------------------------------------------------------------
        if pareto:
            stages.enter("pareto")
            if precision != "int4":
                raise UserError(
                    "--pareto", f"with --precision {precision}", "--precision int4 (the front's base)"
                )
            from cscompile.motifs.artifact import calibration_prompts
            from cscompile.search.artifact import native_pareto_part, pareto_part

            ids = np.concatenate(calibration_prompts(work_tokenizer(work, tok_files), calib))[:2048]
            if native_weights is not None:  # the front of the engine that runs by default
                part = native_pareto_part(base, ids, native_weights, latency_table=latency_table,
                                          say=pareto_say or (lambda m: None))  # fmt: skip
            else:
                part = pareto_part(
                    base, ids, work / "pareto", gguf=Path(grid) if grid else None, latency_table=latency_table,
                    say=pareto_say or (lambda m: None),
                )  # fmt: skip
            extra_parts = [*extra_parts, part]

        # -- trt -----------------------------------------------------------------------------
        if target == "trt":
            stages.enter("trt")
            from cscompile.trt.artifact import compile_part, motifs_from_files, prepare

            family = motifs_from_files(motif_files, um.intermediate_size) if motif_files else None
            plan_trt = prepare(onnx_path, family, block, trt_precision, min(1024, trt_context), trt_context)
            part = compile_part(plan_trt, work / "trt", say=trt_say)
            extra_parts = [*extra_parts, part]

        # -- package -------------------------------------------------------------------------
        stages.enter("package")
        import onnxruntime

        # the dense engine's weights beside its graph (engines/dense.bin): opening a bundle parses
        # every graph to check it, and inline weights made that parse a large transient (BENCHMARKS.md)
        # (the parts above were built from the inline engine; only the packaged copy is split)
        split_dir = work / "engine-split"
        split_dir.mkdir()
        ir.save(ir.load(str(engine_path)), str(split_dir / "dense.onnx"), external_data="dense.bin")
        files: dict[str, Path | bytes] = {ENGINE_FILE: split_dir / "dense.onnx"}
        headers = {ENGINE_FILE: onnx_header(split_dir / "dense.onnx")}
        for loc in headers[ENGINE_FILE][1]:
            files["engines/" + loc] = split_dir / loc
        files.update(tok_files)
        sections: dict[str, str] = {"build": "build.json", "unit_map": "unit_map.json"}
        if (base / "config.json").is_file():
            files["config.json"] = base / "config.json"
            sections["config"] = "config.json"
        engine_params = {
            "precision": precision,
            "plan": plan.describe(),
            "grid": "gguf-exact" if grid else ("rtn" if precision != "fp32" else None),
            "attention": "gqa" if fused else "plain",
            "accuracy_level": report.get("accuracy_level") if precision != "fp32" else None,
        }
        engines: list[dict[str, Any]] = [
            {"name": "dense", "file": ENGINE_FILE, "kind": "dense", "params": engine_params, "profile": {}}
        ]
        build_info: dict[str, Any] = {
            "cscompile": __version__,
            "precision": precision,
            "target": target,
            "block_size": block,
            "seed": seed,
            "max_engines": max_engines,
            "calib_sha256": calib_sha,
            "motifs": {"m": motif_m, "banks": motif_banks} if motifs else None,
            "pareto": {"latency_table": "pinned" if latency_table else "measured"} if pareto else None,
            "prompt_scorer": {"layers": scorer_layers} if prompt_scorer else None,
            "task": task,
            "trt": {"precision": trt_precision, "context": trt_context} if target == "trt" else None,
            "classify": (
                {
                    "labels": labels,
                    "train_sha256": sha256_file(Path(train)),
                    "teacher": teacher,
                    "max_loss": max_loss,
                    "exit_layers": exit_layers,
                }
                if examples is not None and train is not None
                else None
            ),
            "source": {"name": model_name(onnx_path, base), "sha256": report["source_sha256"]},
            "quantize": {
                "plan": report.get("plan"),
                "grid": Path(grid).name if grid else None,
                "accuracy_level": report.get("accuracy_level"),
                "projections": report.get("projections"),
                "attention": report.get("attention"),
            },
        }
        files["build.json"] = (json.dumps(build_info, indent=2, sort_keys=True) + "\n").encode()
        files["unit_map.json"] = unit_map_json
        merge_parts(files, engines, sections, extra_parts)
        requires = {
            "onnxruntime_min": _version_prefix(str(onnxruntime.__version__)),
            "opsets": merge_opsets(
                [
                    (headers[rel] if rel in headers else onnx_header(files[rel]))[0]
                    for rel in sorted(files)
                    if rel.endswith(".onnx")
                ]
            ),
            "target": target,
        }
        info = write_bundle(
            out,
            files=files,
            engines=engines,
            source={"name": build_info["source"]["name"], "sha256": report["source_sha256"]},
            requires=requires,
            tokenizer=TOKENIZER_PREFIX,
            sections=sections,
            archive=archive,
        )
        stages.finish()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    disk = out.stat().st_size if archive else info.total_bytes + (out / "manifest.json").stat().st_size
    return BuildResult(
        path=out,
        archive=archive,
        content_hash=info.content_hash,
        manifest=info.manifest,
        build=build_info,
        engines=tuple(e["name"] for e in info.manifest["engines"]),
        precision=precision,
        target=target,
        block_size=block,
        files=info.files,
        total_bytes=info.total_bytes,
        disk_bytes=disk,
        seconds=time.perf_counter() - t_start,
        stage_seconds=stages.seconds,
        warnings=tuple(warnings),
        decode_ms=decode_ms,
    )


def _version_prefix(version: str) -> str:
    """``1.32.0.dev20250101`` -> ``1.32.0`` (the manifest accepts numeric versions only)."""
    from cscompile.bundle.format import version_tuple

    parts = version_tuple(version)
    return ".".join(map(str, parts)) if parts else "0"
