"""The sensed vocabulary head (:mod:`cscompile.native.vocab`): the 4-bit preview that the native
engine's Q8_0 LM head holds in its high bit plane (no extra bytes), its margin calibrated on the
calibration prompts, and K chosen by the bytes expected per token on held-out tokens — the bundle's ``vocab`` section. ``--sensed-head auto``
adds it whenever the build has a native engine and the margin held on the held-out tokens.
"""

from __future__ import annotations

import numpy as np

from cscompile.bundle.parts import BundlePart
from cscompile.errors import UserError
from cscompile.steps.base import BuildConfig, BuildContext

#: calibration tokens for the margin, then as many held out to choose K and check the margin
CALIB_TOKENS = 512
MIN_TOKENS = 64


class VocabStep:
    name = "vocab"

    def wanted(self, config: BuildConfig) -> bool:
        return config.sensed_head != "off"

    def check(self, config: BuildConfig) -> None:
        if config.sensed_head not in ("auto", "on", "off"):
            raise UserError("--sensed-head", f"'{config.sensed_head}'", "auto, on or off")
        if config.sensed_head == "on" and config.native == "off":
            raise UserError(
                "--sensed-head on", "with --native off", "--native auto or on (it senses that engine's head)"
            )

    def build(self, ctx: BuildContext) -> BundlePart | None:
        from cscompile.native.engine import engine_files, head_as_planes
        from cscompile.native.vocab import plan_head, vocab_files

        on = ctx.config.sensed_head == "on"
        if ctx.native_weights is None:
            if on:
                raise UserError(
                    "--sensed-head on",
                    "a build without a native engine",
                    "a build whose native engine is made",
                )
            return None
        ids = np.concatenate(
            [np.asarray(p, np.int64).reshape(-1) for p in ctx.calibration()] or [np.zeros(0, np.int64)]
        )
        n = min(CALIB_TOKENS, len(ids) // 2)
        if n < MIN_TOKENS:
            return self._skip(on, f"{len(ids)} calibration tokens", f"at least {2 * MIN_TOKENS} (--calib)")
        plan = plan_head(ctx.native_weights, ids[:n], ids[n : 2 * n])
        ctx.report["sensed_head"] = {
            "k": plan.k, "tau": plan.tau, "calib_tokens": plan.calib_tokens, "heldout_tokens": plan.heldout_tokens,
            "heldout_worst_over_tau": plan.heldout_worst_over_tau, "shipped": plan.sensed is not None,
            **({"why_not": plan.why} if plan.why else {}),
        }  # fmt: skip
        if plan.sensed is None:
            return self._skip(on, plan.why, "a margin that holds on held-out tokens")
        # the head is stored once, as bit planes: the preview is their high plane (no extra bytes)
        ctx.native_weights = head_as_planes(ctx.native_weights)
        if ctx.native_part is not None:
            ctx.native_part.files.update(engine_files(ctx.native_weights))
        return BundlePart(
            files=dict(vocab_files(plan, ctx.native_weights.head)), sections={"vocab": "native/vocab.json"}
        )

    @staticmethod
    def _skip(on: bool, why: str, expected: str) -> None:
        if on:
            raise UserError("--sensed-head on", why, expected)
        return None
