"""The joint width × depth × precision front (:mod:`cscompile.search`): with the native engine its
front (``native-K``: configurations over the native weights), else the ONNX Runtime depth ×
precision front (``pareto-K``; needs the fetched model's ``hf/`` checkpoint and the export extra).
``--latency-table`` pins the table (a JSON with ``coef_ms``) instead of measuring it here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cscompile.bundle.parts import BundlePart
from cscompile.errors import UserError
from cscompile.steps.base import BuildConfig, BuildContext


class ParetoStep:
    name = "pareto"

    def wanted(self, config: BuildConfig) -> bool:
        return config.pareto

    def check(self, config: BuildConfig) -> None:
        if config.latency_table is not None and not config.pareto:
            raise UserError(
                "--latency-table", "given without --pareto", "--pareto (the table is the front's)"
            )
        if config.pareto and config.precision != "int4":
            raise UserError(
                "--pareto", f"with --precision {config.precision}", "--precision int4 (the front's base)"
            )

    def build(self, ctx: BuildContext) -> BundlePart | None:
        from cscompile.search.artifact import native_pareto_part, pareto_part

        ids = np.concatenate(ctx.calibration())[:2048]
        table, say = ctx.config.latency_table, ctx.say(self.name)
        if ctx.native_weights is not None:  # the front of the engine that runs by default
            return native_pareto_part(ctx.base, ids, ctx.native_weights, latency_table=table, say=say)  # type: ignore[no-any-return]
        return pareto_part(  # type: ignore[no-any-return]
            ctx.base,
            ids,
            ctx.work / "pareto",
            gguf=Path(ctx.grid) if ctx.grid else None,
            latency_table=table,
            say=say,
        )
