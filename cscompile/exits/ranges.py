"""Layer-range engines: the dense engine cut into consecutive blocks of layers.

Early exit needs to stop *between* layers and resume later: block ``[a, b)`` takes the residual
stream entering layer ``a`` (``hidden_in``; block 0 takes ``input_ids`` instead) and returns the
residual leaving layer ``b − 1`` (``hidden_out``) plus the KV cache of its own layers. Chaining
the blocks reproduces the dense engine's residual stream exactly (tested), and a request that
exits after block k has paid for blocks 0..k only.

Rules:

1. The cut points are the unit map's ``residual_in`` / ``residual_out`` values, which survive
   quantization and attention fusion (their producers are the residual Adds).
2. Everything a block does not need is removed: other layers, the final norm and LM head, the
   other layers' cache inputs/outputs, and ``input_ids`` for blocks after the first.
3. ``attention_mask`` stays an input of every block: the fused attention derives positions and
   lengths from it, so each block is told the whole sequence's mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cscompile.errors import UserError

HIDDEN_IN, HIDDEN_OUT = "hidden_in", "hidden_out"


def cut_range(engine: Path, layers: list[dict[str, Any]], start: int, stop: int, out: Path) -> None:
    """Write the block of layers ``[start, stop)`` of ``engine`` to ``out`` (weights inline).

    ``layers`` are the unit map's layer entries (``residual_in`` / ``residual_out`` names).
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common

    from cscompile.passes.pipeline import save_model

    n = len(layers)
    if not 0 <= start < stop <= n:
        raise UserError("layer range", f"[{start}, {stop})", f"0 <= start < stop <= {n}")
    model = ir.load(str(engine))
    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs}
    values.update({v.name: v for v in graph.inputs})
    try:
        v_out = values[layers[stop - 1]["residual_out"]]
        v_in = values[layers[start]["residual_in"]] if start > 0 else None
    except KeyError as exc:
        raise UserError(
            f"engine {Path(engine).name}",
            f"has no value {exc} from the unit map",
            "the bundle's own dense engine",
        ) from None
    outputs = []
    if v_in is not None:
        new_in = ir.Value(name=HIDDEN_IN, type=v_in.type, shape=v_in.shape)
        v_in.replace_all_uses_with(new_in)
        graph.inputs.append(new_in)
    v_out.name = HIDDEN_OUT
    outputs.append(v_out)
    keep_cache = {f"present.{i}.{kv}" for i in range(start, stop) for kv in ("key", "value")}
    outputs += [o for o in graph.outputs if o.name in keep_cache]
    if len(outputs) != 1 + 2 * (stop - start):
        raise UserError(
            f"engine {Path(engine).name}",
            "does not name its cache outputs present.<layer>.key/value",
            "a cscompile engine",
        )
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    common.RemoveUnusedNodesPass()(model)
    used = {v.name for node in graph for v in node.inputs if v is not None} | {HIDDEN_IN}
    kept = [v for v in graph.inputs if v.name in used or v.name == "attention_mask"]
    graph.inputs.clear()
    graph.inputs.extend(kept)
    common.RemoveUnusedNodesPass()(model)
    model.metadata_props["cscompile.layers"] = f"{start}:{stop}"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
