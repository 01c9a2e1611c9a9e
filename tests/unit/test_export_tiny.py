"""Our exporter on every tiny model: structure of the graph and numbers against transformers."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from cscompile.models.tiny import TINY_MODELS


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_export_matches_pytorch(tiny_dir, name):
    d = tiny_dir(name)
    report = json.loads((d / "export.json").read_text())
    assert report["max_abs_logit_diff"] < 1e-4, report
    model = onnx.load(str(d / "model.onnx"))
    ops = Counter(n.op_type for n in model.graph.node)
    cfg = report["config"]
    # projections per layer: q, k, v, o, gate, up, down (Llama) or qkv, o, fc, proj (GPT-2);
    # a tied LM head is a Gemm on the embedding, an untied one stays a MatMul.
    per_layer = 4 if cfg["family"] == "gpt2" else 7
    tied = cfg["tie_word_embeddings"]
    assert ops["Gemm"] == (1 if tied else 0)
    assert ops["MatMul"] >= per_layer * cfg["num_layers"] + (0 if tied else 1)
    names_in = [i.name for i in model.graph.input]
    assert names_in[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert f"past_key_values.{cfg['num_layers'] - 1}.value" in names_in


@pytest.mark.parametrize("name,tied", [("llama-2l", True), ("llama-untied-2l", False)])
def test_tied_head_shares_the_embedding(tiny_dir, name, tied):
    d = tiny_dir(name)
    model = onnx.load(str(d / "model.onnx"))
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and "input_ids" in n.input)
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert [g.input[1] for g in gemms] == ([gather.input[0]] if tied else [])
    assert json.loads((d / "export.json").read_text())["lm_head_retied"] == tied
    sizes = sorted((np.prod(t.dims) for t in model.graph.initializer), reverse=True)
    vocab_x_hidden = 320 * 48
    assert sum(1 for s in sizes if s == vocab_x_hidden) == (1 if tied else 2)
