"""``cscompile inspect``: the unit map of a decoder ONNX, as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from cscompile.cli.commands.common import IntIn, resolve_model_dir
from cscompile.passes.unit_map import UnitMap


def render_unit_map(um: UnitMap, name: str, admissible: dict[str, list[int]], console: Console) -> None:
    """The human-readable report (stable text: a golden test reads it)."""
    a, m = um.layers[0].attention, um.layers[0].mlp
    console.print(
        f"[bold]{name}[/bold]: {um.architecture}, {um.num_layers} layers, hidden {um.hidden_size}, vocab {um.vocab_size}"
    )
    console.print(
        f"attention: {a.num_heads} heads in {a.num_kv_heads} KV groups of {a.group_size}, head_dim {a.head_dim}, "
        f"RoPE {'yes' if a.rope else 'no'}, {'fused' if a.fused_qkv else 'separate'} QKV, "
        f"KV cache {'in/out' if a.past_key and a.present_key else 'none'}"
    )
    console.print(
        f"MLP: {m.kind} ({m.activation}), {m.intermediate_size} channels, block size {um.block_size}"
    )
    console.print(
        f"LM head: {'tied to the embedding' if um.lm_head_tied else 'separate weight'}; final norm {um.final_norm.kind}"
    )
    if um.architecture not in ("llama", "gpt2"):  # what else discovery found (Llama-only code refuses it)
        windows = sorted({x.attention.window for x in um.layers if x.attention.window is not None})
        bases = sorted({x.attention.rope_base for x in um.layers if x.attention.rope_base is not None})
        facts = [
            "norms on the attention/MLP outputs" if um.layers[0].attn_output_norm is not None else "",
            "no norm before the attention/MLP" if um.layers[0].input_norm.kind == "none" else "",
            ("QK-norm over the full projection" if a.qk_norm_full else "QK-norm")
            if a.q_norm is not None
            else "",
            f"score scale {a.score_scale:.4g}" if a.score_scale is not None else "",
            f"sliding window {windows} on {sum(x.attention.window is not None for x in um.layers)} layers"
            if windows
            else "",
            f"RoPE θ {', '.join(f'{b:g}' for b in bases)}" if bases else "",
            f"embedding ×{um.embedding_scale:.4g}" if um.embedding_scale is not None else "",
            f"logit soft-cap {um.logit_softcap:g}" if um.logit_softcap is not None else "",
            f"attention soft-cap {a.attn_softcap:g}" if a.attn_softcap is not None else "",
        ]
        console.print(f"also: {'; '.join(f for f in facts if f)}")
    table = Table("unit type", "per layer", "total", "params / unit", "params total", "share")
    counts: dict[str, list[int]] = {}
    for u in um.units:
        c = counts.setdefault(u.kind, [0, 0])
        c[0] += 1
        c[1] += u.params
    total_params = sum(v[1] for k, v in counts.items() if k != "layer")
    for kind in ("head_group", "ffn_block", "layer"):
        n, params = counts.get(kind, [0, 0])
        share = f"{params / total_params:.1%}" if kind != "layer" else ""
        table.add_row(kind, str(n // um.num_layers), str(n), f"{params // max(n, 1):,}", f"{params:,}", share)
    emb = um.vocab_size * um.hidden_size
    table.add_row(
        "embedding" + (" (= LM head)" if um.lm_head_tied else ""), "", "1", f"{emb:,}", f"{emb:,}", ""
    )
    console.print(table)
    for target, sizes in admissible.items():
        console.print(f"admissible block sizes ({target}): {', '.join(map(str, sizes))}")


@click.command("inspect")
@click.argument("model")
@click.option(
    "-b",
    "--block-size",
    default=1,
    show_default=True,
    type=IntIn(1, None),
    help="FFN channels per unit.",
)
@click.option("--target", type=click.Choice(["cpu", "trt"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the unit map as JSON.")
def inspect_cmd(model: str, block_size: int, target: str, as_json: bool) -> None:
    """Partition MODEL (a name, model directory or .onnx) into units and report them; for a bundle, its manifest."""
    from cscompile.cli.commands.bundle_cmds import bundle_path, inspect_bundle
    from cscompile.passes import admissible_block_sizes
    from cscompile.passes.pipeline import analyze

    bundle = bundle_path(model)
    if bundle is not None:
        inspect_bundle(bundle, as_json)
        return
    path = resolve_model_dir(model)
    onnx_path = path if path.suffix == ".onnx" else path / "model.onnx"
    _, um = analyze(onnx_path, block_size, target)
    admissible = {t: admissible_block_sizes(um, t) for t in ("cpu", "trt")}
    trt = None
    if target == "trt":  # the lowering a GPU build would do, checked here (no GPU needed)
        from cscompile.trt.artifact import readiness

        trt = readiness(Path(onnx_path), block_size)
    if as_json:
        out = {"unit_map": um.to_dict(), "admissible_block_sizes": admissible}
        if trt is not None:
            out["tensorrt"] = trt
        click.echo(json.dumps(out, sort_keys=True))
        return
    console = Console(width=110, highlight=False)
    render_unit_map(um, Path(onnx_path).name, admissible, console)
    if trt is not None:
        console.print(
            f"TensorRT lowering (checked here, built on the GPU): dense graph {trt['dense_nodes']} nodes of "
            f"{len(trt['dense_ops'])} stock op types; sparse graph {trt['sparse_plugin_nodes']} "
            f"cscompile::SparseFFN nodes at block {trt['block']} (TopK K ≤ {trt['topk_max']}); profiles "
            + ", ".join(f"{k}: {'/'.join(v)}" for k, v in trt["profiles"].items())
        )
