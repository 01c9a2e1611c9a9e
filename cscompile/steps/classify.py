"""Text classification with early exits (:mod:`cscompile.exits.classifier`): ``--labels``,
``--train`` rows ``{"text", "label"}`` (with ``--teacher`` unlabelled rows are labelled by the
full model), exit adapters after ``--exit-layers`` (default about ten blocks), thresholds
calibrated to lose at most ``--max-loss`` accuracy. Reads the dense engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cscompile.bundle.parts import BundlePart
from cscompile.errors import UserError
from cscompile.steps.base import BuildConfig, BuildContext


class ClassifierStep:
    name = "classify"

    def wanted(self, config: BuildConfig) -> bool:
        return config.task == "classify"

    def check(self, config: BuildConfig) -> None:
        if config.task != "classify":
            if (config.labels is not None or config.train is not None or config.teacher
                    or config.exit_layers is not None):  # fmt: skip
                raise UserError("--labels/--train/--teacher/--exit-layers", "given without --task classify",
                                "--task classify")  # fmt: skip
            return
        if config.labels is None or config.train is None:
            raise UserError("--task classify", "without " + ("--labels" if config.labels is None else "--train"),
                            "--labels A,B,... and --train rows.jsonl")  # fmt: skip
        if not 0 <= config.max_loss < 1:
            raise UserError("--max-loss", f"{config.max_loss}", "an accuracy fraction in [0, 1)")

    @staticmethod
    def examples(config: BuildConfig) -> tuple[list[str], list[Any]]:
        """The labels and training rows (read and checked before any work)."""
        from cscompile.exits.classifier import parse_labels, read_examples

        labels = parse_labels(config.labels)  # type: ignore[arg-type]
        return labels, read_examples(Path(config.train), labels, config.teacher)  # type: ignore[arg-type]

    def build(self, ctx: BuildContext) -> BundlePart | None:
        from cscompile.exits.classifier import classify_part

        assert ctx.engine_path is not None and ctx.unit_map is not None
        assert ctx.examples is not None and ctx.labels is not None  # read at check (ClassifierStep.examples)
        c = ctx.config
        labels = ctx.labels
        return classify_part(  # type: ignore[no-any-return]
            ctx.engine_path, ctx.unit_map.to_dict()["layers"], ctx.tokenizer(), ctx.examples, labels,
            ctx.work / "classify", exit_layers=c.exit_layers, max_loss=c.max_loss, say=ctx.say(self.name),
        )  # fmt: skip
