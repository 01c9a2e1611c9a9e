"""The native engine (:mod:`cscompile.native`): the model's block-quantized weights run by one C
call per token — the source GGUF's grid exactly when there is one, else round-to-nearest Q4_1
(int4) or Q8_0 (int8); the runtime's default engine when present. ``--native auto`` adds it to
int4/int8 cpu builds and says why not otherwise (the dense engine runs); ``on`` fails the build
if it cannot be made; ``off`` leaves it out. Reads the analyzed source, so it runs before the
dense stage rewrites that graph.
"""

from __future__ import annotations

from pathlib import Path

from cscompile.bundle.parts import BundlePart
from cscompile.errors import UserError
from cscompile.steps.base import BuildConfig, BuildContext


class NativeStep:
    name = "native"

    def wanted(self, config: BuildConfig) -> bool:
        return config.native == "on" or (
            config.native == "auto" and config.precision != "fp32" and config.target == "cpu"
        )

    def check(self, config: BuildConfig) -> None:
        if config.native not in ("auto", "on", "off"):
            raise UserError("--native", f"'{config.native}'", "auto, on or off")
        if config.native == "on" and (config.precision == "fp32" or config.target != "cpu"):
            raise UserError("--native on", f"with --precision {config.precision} --target {config.target}",
                            "--precision int4 or int8 with --target cpu (the engine runs block-quantized weights on the CPU)")  # fmt: skip

    def build(self, ctx: BuildContext) -> BundlePart | None:
        from cscompile.native.engine import part_from_weights, weights_from_model
        from cscompile.passes.precision import find_source_gguf

        grid = find_source_gguf(ctx.base)
        try:
            bits = 8 if ctx.config.precision == "int8" else 4
            ctx.native_weights = weights_from_model(
                ctx.onnx_path, Path(grid) if grid else None, bits=bits, graph=ctx.analysis()
            )
        except UserError as exc:
            if ctx.config.native == "on":
                raise
            ctx.warnings.append(f"no native engine ({exc.subject}: {exc.received}); the dense engine runs")
            return None
        note = str(ctx.native_weights.config.get("weights", ""))
        if grid and "RTN" in note:  # a GGUF tensor the step cannot keep (a float one): say which
            ctx.warnings.append(f"native engine weights: {note}")
        ctx.native_part = part_from_weights(ctx.native_weights)
        return ctx.native_part
