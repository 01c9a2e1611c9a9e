"""What every build step shares: the build's configuration, its context and the step interface.

The context analyzes the source once (canonicalize, discover units, shape inference: the
expensive part of a build on a 500 MB graph) and hands the same graph, unit map, tokenizer and
calibration ids to every step that reads them; :attr:`BuildContext.analyses` counts the
analyses (a test holds a default build to one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cscompile.bundle.parts import BundlePart
from cscompile.errors import UserError

if TYPE_CHECKING:
    import onnx_ir as ir

    from cscompile.decode.tokenizer import Tokenizer
    from cscompile.native.engine import NativeWeights
    from cscompile.passes.unit_map import UnitMap

PRECISIONS = ("fp32", "int8", "int4")
TARGETS = ("cpu", "trt")
TASKS = ("generate", "classify")


@dataclass(frozen=True)
class BuildConfig:
    """Every setting of a build (``cscompile build``'s flags); :meth:`check` refuses bad ones."""

    tokenizer: Path | None = None
    precision: str = "int4"
    target: str = "cpu"
    block_size: int | None = None
    calib: Path | None = None
    max_engines: int = 4
    seed: int = 0
    native: str = "auto"  # auto | on | off
    sensed_head: str = "auto"  # auto | on | off: the native engine's sensed vocabulary head
    latency_budget_ms: float | None = None
    motifs: bool = False
    motif_m: int = 256
    motif_banks: int = 1
    pareto: bool = False
    latency_table: Path | None = None
    prompt_scorer: bool = False
    scorer_layers: int | None = None
    task: str = "generate"
    labels: str | Sequence[str] | None = None
    train: Path | None = None
    teacher: bool = False
    exit_layers: str | Sequence[int] | None = None
    max_loss: float = 0.01
    trt_precision: str = "fp16"
    trt_context: int = 2048

    def check(self) -> None:
        """The flags every build reads (each step checks its own in :meth:`Step.check`)."""
        if self.precision not in PRECISIONS:
            raise UserError("--precision", f"'{self.precision}'", f"one of {', '.join(PRECISIONS)}")
        if self.target not in TARGETS:
            raise UserError("--target", f"'{self.target}'", f"one of {', '.join(TARGETS)}")
        if self.block_size is not None and (isinstance(self.block_size, bool) or self.block_size < 1):
            raise UserError("--block-size", f"{self.block_size}", "a positive integer")
        if (
            isinstance(self.max_engines, bool)
            or not isinstance(self.max_engines, int)
            or self.max_engines < 1
        ):
            raise UserError("--max-engines", f"{self.max_engines}", "a positive integer")
        if self.task not in TASKS:
            raise UserError("--task", f"'{self.task}'", f"one of {', '.join(TASKS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError("--seed", f"{self.seed}", "an integer >= 0")
        if self.calib is not None and not Path(self.calib).expanduser().is_file():
            raise UserError(
                "--calib", f"no file at {Path(self.calib).expanduser()}", "a calibration text file"
            )


class Reporter(Protocol):
    """Where a build shows its progress: one display for every stage (the CLI's is rich)."""

    def start(self, stage: str) -> None: ...

    def done(self, stage: str) -> None: ...

    def say(self, stage: str, message: str) -> None: ...


class Silent:
    """A :class:`Reporter` that shows nothing (the Python API's default)."""

    def start(self, stage: str) -> None:
        return None

    def done(self, stage: str) -> None:
        return None

    def say(self, stage: str, message: str) -> None:
        return None


@dataclass
class BuildContext:
    """What the steps of one build share; filled in stage by stage."""

    config: BuildConfig
    onnx_path: Path
    base: Path  # the model directory
    work: Path  # scratch beside the output, removed after the build
    tok_files: dict[str, Path]
    progress: Reporter = field(default_factory=Silent)
    warnings: list[str] = field(default_factory=list)
    #: set by the analyze stage
    unit_map: UnitMap | None = None
    block: int = 1
    #: set by the dense stage
    engine_path: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)
    fused: bool = False
    grid: Path | None = None
    decode_ms: float | None = None
    #: set by the gate stage: the measured errors per engine (build.json's ``gate``)
    gate: dict[str, Any] | None = None
    #: set by steps other steps read
    native_weights: NativeWeights | None = None
    #: the native engine's bundle part (the vocab step rewrites its weights with the head as bit planes)
    native_part: BundlePart | None = None
    motif_files: dict[str, Path | bytes] | None = None
    labels: list[str] | None = None  # --task classify: parsed labels and training rows, read once at check
    examples: list[Any] | None = None
    analyses: int = 0
    _analysis: tuple[ir.Model, UnitMap] | None = None
    _tokenizer: Tokenizer | None = None
    _calibration: list[np.ndarray] | None = None

    def analysis(self) -> tuple[ir.Model, UnitMap]:
        """The analyzed source graph and its unit map (analyzed on first use; read, don't modify)."""
        if self._analysis is None:
            from cscompile.passes.pipeline import analyze

            self._analysis = analyze(self.onnx_path)
            self.analyses += 1
        return self._analysis

    def take_analysis(self) -> tuple[ir.Model, UnitMap]:
        """The analyzed graph for a stage that rewrites it; a later :meth:`analysis` analyzes anew."""
        out = self.analysis()
        self._analysis = None
        return out

    def say(self, stage: str) -> Any:
        """A ``say(message)`` callback for the step ``stage``'s long work."""
        return lambda message: self.progress.say(stage, message)

    def tokenizer_dir(self) -> Path:
        """The bundle's tokenizer files as a plain directory under :attr:`work` (made once)."""
        tok_dir = (self.work / "tok").resolve()
        if not tok_dir.is_dir():
            tok_dir.mkdir()
            for rel, src in self.tok_files.items():
                (tok_dir / rel.rsplit("/", 1)[-1]).write_bytes(Path(src).read_bytes())
        return tok_dir

    def tokenizer(self) -> Tokenizer:
        """The bundle's tokenizer (built once per build)."""
        if self._tokenizer is None:
            from cscompile.decode.tokenizer import Tokenizer

            self._tokenizer = Tokenizer(self.tokenizer_dir())
        return self._tokenizer

    def calibration(self) -> list[np.ndarray]:
        """The calibration prompts' token ids (``--calib`` or the shipped prompt set; made once)."""
        if self._calibration is None:
            from cscompile.motifs.artifact import calibration_prompts

            calib = Path(self.config.calib).expanduser() if self.config.calib is not None else None
            self._calibration = calibration_prompts(self.tokenizer_dir(), calib)
        return self._calibration


class Step(Protocol):
    """One optional part of a bundle."""

    #: the stage name shown in progress and timings
    name: str

    def wanted(self, config: BuildConfig) -> bool:
        """Whether this build runs the step."""
        ...

    def check(self, config: BuildConfig) -> None:
        """Refuse the step's bad flags before any work (a :class:`UserError`)."""
        ...

    def build(self, ctx: BuildContext) -> BundlePart | None:
        """The part this step adds (None: nothing, with the reason in ``ctx.warnings``)."""
        ...


class Lines:
    """A :class:`Reporter` that writes one line per event through ``write`` (logs, scripts)."""

    def __init__(self, write: Any = print) -> None:
        self.write = write

    def start(self, stage: str) -> None:
        self.write(f"  build: {stage} start")

    def done(self, stage: str) -> None:
        self.write(f"  build: {stage} done")

    def say(self, stage: str, message: str) -> None:
        self.write(f"  {stage}: {message}")
