"""The motif family (:mod:`cscompile.motifs`): per-layer FFN densities, sensing predictors with
``--motif-m`` measurements and the switching controller, compiled from the source's fp32 weights
on the calibration prompts, keeping at most ``--max-engines`` motifs on the measured front.
It rewrites the graph it segments, so it analyzes the source for itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cscompile.bundle.parts import BundlePart
from cscompile.errors import UserError
from cscompile.steps.base import BuildConfig, BuildContext

if TYPE_CHECKING:
    from cscompile.passes.unit_map import UnitMap


class MotifStep:
    name = "motifs"

    def wanted(self, config: BuildConfig) -> bool:
        return config.motifs

    def check(self, config: BuildConfig) -> None:
        if config.target == "trt" and config.motifs and config.motif_banks > 1:
            raise UserError(
                "--motif-banks",
                f"{config.motif_banks} with --target trt",
                "1 (the TensorRT runner has no banks)",
            )

    @staticmethod
    def check_units(um: UnitMap) -> None:
        """Refuse a model the motif engines cannot lower, from the build's analysis (before the
        native engine, the dense engine and the motif calibration run).
        """
        from cscompile.motifs.segments import LOWERS, lowering_refusal

        why = lowering_refusal(um)
        if why is not None:
            raise UserError("motif lowering", why, f"{LOWERS}, or a build without --motifs")

    def build(self, ctx: BuildContext) -> BundlePart | None:
        from cscompile.motifs.artifact import motif_part

        c = ctx.config
        calib = Path(c.calib).expanduser() if c.calib is not None else None
        part = motif_part(ctx.onnx_path, ctx.tokenizer_dir(), calib, m=c.motif_m, max_engines=c.max_engines,
                          seed=c.seed, say=ctx.say(self.name), banks=c.motif_banks)  # fmt: skip
        ctx.motif_files = part.files
        return part  # type: ignore[no-any-return]
