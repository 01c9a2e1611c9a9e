"""Helpers shared by tests (importable: tests/ is on sys.path through conftest.py)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import onnx_ir as ir


def scramble_names(src: Path, dst: Path, seed: int = 0) -> Path:
    """Copy an ONNX model with every node, intermediate value and initializer renamed at random.

    Graph inputs and outputs keep their names (they are the model's interface).
    """
    rng = random.Random(seed)
    model = ir.load(str(src))
    io = {v.name for v in model.graph.inputs} | {v.name for v in model.graph.outputs}
    used: set[str] = set()

    def fresh() -> str:
        while True:
            name = "x" + "".join(rng.choice("abcdefghijklmnop0123456789") for _ in range(10))
            if name not in used:
                used.add(name)
                return name

    for value in list(model.graph.initializers.values()):
        value.name = fresh()
    for node in model.graph:
        node.name = fresh()
        for out in node.outputs:
            if out.name not in io:
                out.name = fresh()
    ir.save(model, str(dst))
    return dst


def run_logits(path: Path, ids: np.ndarray, threads: int = 1) -> np.ndarray:
    from cscompile.runtime import DecoderSession

    sess = DecoderSession(path, threads=threads)
    return sess.forward(ids, sess.new_state(batch=ids.shape[0]))


def save(model: ir.Model, path: Path) -> Path:
    ir.save(model, str(path))
    return path


def unit_map_signature(um) -> dict:
    """Everything about a unit map except names: what must agree across exporters and renamings."""
    layers = []
    for layer in um.layers:
        a, m = layer.attention, layer.mlp
        layers.append(
            (
                a.num_heads, a.num_kv_heads, a.head_dim, a.rope, a.fused_qkv,
                a.q.out_features, a.k.out_features, a.v.out_features, a.o.in_features,
                m.kind, m.activation, m.intermediate_size, m.gate is not None,
                layer.input_norm.kind, layer.post_attention_norm.kind,
                a.past_key is not None, a.present_key is not None,
            )
        )  # fmt: skip
    return {
        "architecture": um.architecture,
        "vocab": um.vocab_size,
        "hidden": um.hidden_size,
        "tied": um.lm_head_tied,
        "layers": layers,
        "units": [(u.kind, u.layer, u.index, u.params) for u in um.units],
        "block_size": um.block_size,
    }


#: a pinned ORT latency table for Pareto builds (``coef_ms``): which points ship must not depend on
#: how busy the machine is (a 4-layer model's measured per-layer savings are within a loaded CI
#: machine's noise)
PINNED_ORT_COEF = {
    "base": 1.0,
    "attn-exact": 0.2,
    "attn-rtn": 0.15,
    "ffn-exact": 0.3,
    "ffn-rtn": 0.2,
    "head-int4-rtn": 0.0,
}
