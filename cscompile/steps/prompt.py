"""The prompt compressor's scorer (:mod:`cscompile.prompt`): the dense engine's first layers with
the attention heads that best find the evidence in the shipped calibration examples (needs a
fused-attention engine); ``--scorer-layers`` bounds its depth (its cost; default a third).
"""

from __future__ import annotations

from cscompile.bundle.parts import BundlePart
from cscompile.errors import UserError
from cscompile.steps.base import BuildConfig, BuildContext


class PromptScorerStep:
    name = "prompt"

    def wanted(self, config: BuildConfig) -> bool:
        return config.prompt_scorer

    def check(self, config: BuildConfig) -> None:
        if config.scorer_layers is not None and not config.prompt_scorer:
            raise UserError("--scorer-layers", "given without --prompt-scorer", "--prompt-scorer")

    def build(self, ctx: BuildContext) -> BundlePart | None:
        from cscompile.prompt.calibrate import prompt_part

        if not ctx.fused or ctx.engine_path is None:
            raise UserError(
                "--prompt-scorer",
                f"the {ctx.config.precision} engine of {ctx.onnx_path.name} has unfused attention",
                "a model whose attention fuses (Llama-style RoPE, head_dim a multiple of 16)",
            )
        return prompt_part(  # type: ignore[no-any-return]
            ctx.engine_path, ctx.tokenizer(), ctx.work / "prompt", max_layer=ctx.config.scorer_layers
        )
