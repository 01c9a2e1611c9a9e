"""``cscompile quantize``: weight precision per unit type (fp32 / int8 / int4) into a new model directory."""

from __future__ import annotations

from pathlib import Path

import click

from cscompile.cli.commands.common import IntIn, console, resolve_model_dir
from cscompile.errors import UserError

PRECISION = click.Choice(["fp32", "int8", "int4"])


def parse_overrides(items: tuple[str, ...]) -> dict[int, dict[str, str]]:
    """``L:kind=precision`` items (e.g. ``0:attn=fp32``) into per-layer overrides."""
    out: dict[int, dict[str, str]] = {}
    for item in items:
        try:
            layer, rest = item.split(":", 1)
            kind, precision = rest.split("=", 1)
            index = int(layer)
        except ValueError:
            raise UserError("--layer", f"'{item}'", "LAYER:KIND=PRECISION, e.g. 0:attn=fp32") from None
        if kind not in ("attn", "ffn") or precision not in ("fp32", "int8", "int4"):
            raise UserError("--layer", f"'{item}'", "KIND attn or ffn and PRECISION fp32, int8 or int4")
        out.setdefault(index, {})[kind] = precision
    return out


@click.command("quantize")
@click.argument("model")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--attn", default="int4", show_default=True, type=PRECISION, help="Attention projections.")
@click.option("--ffn", default="int4", show_default=True, type=PRECISION, help="FFN projections.")
@click.option(
    "--lm-head", default="int8", show_default=True, type=PRECISION, help="LM head (4-bit hurts it)."
)
@click.option(
    "--layer", "layers", multiple=True, help="Per-layer override LAYER:KIND=PRECISION (repeatable)."
)
@click.option(
    "--grid",
    default="auto",
    show_default=True,
    help="Source GGUF to keep its grid exactly: auto, none or a path.",
)
@click.option(
    "--accuracy-level",
    default=4,
    show_default=True,
    type=IntIn(0, 4),
    help="MatMulNBits accuracy level (4 = fast int8 compute).",
)
@click.option(
    "--fuse-attention",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="One GroupQueryAttention per layer (faster; unpadded sequences only). auto = where the model allows.",
)
def quantize_cmd(model: str, out_dir: Path, attn: str, ffn: str, lm_head: str, layers: tuple[str, ...], grid: str,
                 accuracy_level: int, fuse_attention: str) -> None:  # fmt: skip
    """Write MODEL with quantized weights into a new model directory (runs with `cscompile run`)."""
    from cscompile.passes.precision import quantize_model
    from cscompile.passes.quantize import PrecisionPlan

    plan = PrecisionPlan(attn=attn, ffn=ffn, lm_head=lm_head, layers=parse_overrides(layers))
    report = quantize_model(resolve_model_dir(model), out_dir, plan, grid, accuracy_level, fuse_attention)
    console.print(
        f"{out_dir}: {report['plan']}; projections {report['projections']}; "
        f"grid {report['grid'] or 'none (RTN)'}; attention {report['attention']}"
    )
