"""TensorRT engines for GPU appliances (:mod:`cscompile.trt`): the dense graph and the motif
family lowered for TensorRT's ONNX parser, built into weight-stripped engines on this GPU and
compared with ONNX Runtime through Polygraphy. Needs an NVIDIA GPU (checked before any work).
"""

from __future__ import annotations

from cscompile.bundle.parts import BundlePart
from cscompile.errors import UserError
from cscompile.steps.base import BuildConfig, BuildContext


class TrtStep:
    name = "trt"

    def wanted(self, config: BuildConfig) -> bool:
        return config.target == "trt"

    def check(self, config: BuildConfig) -> None:
        if config.target != "trt":
            return
        from cscompile.trt.engine import require_gpu
        from cscompile.trt.spec import PRECISIONS as TRT_PRECISIONS

        if config.trt_precision not in TRT_PRECISIONS:
            raise UserError(
                "--trt-precision", f"'{config.trt_precision}'", f"one of {', '.join(TRT_PRECISIONS)}"
            )
        ctx = config.trt_context
        if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 16:
            raise UserError("--trt-context", f"{ctx}", "an integer >= 16 (tokens the engines hold)")
        require_gpu("--target trt")  # before minutes of work, not after

    def build(self, ctx: BuildContext) -> BundlePart | None:
        from cscompile.trt.artifact import compile_part, motifs_from_files, prepare

        assert ctx.unit_map is not None
        c = ctx.config
        family = (
            motifs_from_files(ctx.motif_files, ctx.unit_map.intermediate_size) if ctx.motif_files else None
        )
        plan = prepare(
            ctx.onnx_path, family, ctx.block, c.trt_precision, min(1024, c.trt_context), c.trt_context
        )
        return compile_part(plan, ctx.work / "trt", say=ctx.say(self.name))  # type: ignore[no-any-return]
