"""Depth reduction: dropping FFNs or whole layers equals the PyTorch model with those parts removed,
through prefill and cached decode steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import save

from cscompile.decode.session import DecoderSession
from cscompile.errors import UserError
from cscompile.models.reference import TorchReference
from cscompile.passes.depth import META, DropLayersPass
from cscompile.passes.pipeline import analyze

IDS = np.array([[3, 17, 42, 99, 250, 7, 8, 100, 31, 5, 6, 77]], np.int64)


class _ZeroMLP(torch.nn.Module):
    def forward(self, x):  # type: ignore[no-untyped-def]
        return torch.zeros_like(x)


def _torch_without(hf_dir, layers, ffn):
    ref = TorchReference.from_dir(hf_dir, threads=1)
    model = ref.model
    for i in ffn:
        model.model.layers[i].mlp = _ZeroMLP()
    kept = [m for i, m in enumerate(model.model.layers) if i not in layers]
    for j, m in enumerate(kept):
        m.self_attn.layer_idx = j
    model.model.layers = torch.nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    if hasattr(model.config, "layer_types") and model.config.layer_types:
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in layers]
    return ref


@pytest.mark.parametrize(
    "layers,ffn",
    [((), (0,)), ((1,), ()), ((0,), (1,)), ((2,), (0, 3)), ((1, 2), ()), ((0, 1, 2), (3,)), ((2, 3), (1,))],
)
def test_dropping_equals_pytorch_without_those_parts(tiny_dir, tmp_path, layers, ffn):
    d = tiny_dir("llama-4l")
    model, um = analyze(d / "model.onnx")
    p = DropLayersPass(layers=layers, ffn=ffn)
    assert p(model).modified
    assert json.loads(model.metadata_props[META]) == [i for i in range(4) if i not in layers]
    sess = DecoderSession(save(model, tmp_path / "dropped.onnx"), threads=1)
    assert sess.spec.num_layers == 4 - len(layers)
    ref = _torch_without(d / "hf", set(layers), set(ffn))
    want = ref.logits(IDS)
    st = sess.new_state()
    got = np.concatenate(
        [sess.forward(IDS[:, :7], st)] + [sess.forward(IDS[:, t : t + 1], st) for t in range(7, 12)], 1
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    full, _ = analyze(d / "model.onnx")
    base = DecoderSession(save(full, tmp_path / "full.onnx"), threads=1).forward(
        IDS, DecoderSession(tmp_path / "full.onnx", threads=1).new_state()
    )
    assert np.abs(base - want).max() > 1e-3  # the drop changed the function (the test can fail)


def test_bad_drops_are_refused(tiny_dir):
    d = tiny_dir("llama-4l")
    model, _ = analyze(d / "model.onnx")
    with pytest.raises(UserError, match="indices in 0..3"):
        DropLayersPass(layers=[4])(model)
    model, _ = analyze(d / "model.onnx")
    with pytest.raises(UserError, match="at least one layer kept"):
        DropLayersPass(layers=[0, 1, 2, 3])(model)
