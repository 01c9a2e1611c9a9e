"""Calibration traces: the cached decode path records what a full forward pass computes."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from cscompile.data.prompts import load_prompts
from cscompile.errors import UserError
from cscompile.passes import InstrumentPass
from cscompile.passes.pipeline import analyze
from cscompile.recovery.calibrate import InstrumentedSession, TraceSet, collect_traces
from cscompile.recovery.supports import ffn_block_activity


@pytest.fixture(scope="module")
def traces(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("traces") / "t"
    return collect_traces(
        tiny_dir("llama-2l"), load_prompts(families=["math"])[:2], out, max_new_tokens=6, threads=1
    )


def test_trace_layout(traces):
    m = traces.manifest
    assert m["layers"] == 2 and m["intermediate_size"] == 96 and len(m["shards"]) == 2
    shard = next(traces.shards())
    n = shard["tokens"].shape[0]
    assert shard["phase"].tolist().count(1) == 6 and shard["phase"][0] == 0
    assert shard["feature_L0"].shape == (n, 48) and shard["feature_L0"].dtype == np.float16
    assert shard["act_L1"].shape == (n, 96) and shard["heads_L1"].shape == (n, 2)
    assert traces.layer("act", 0).shape[0] == m["tokens"]
    assert str(shard["family"][0]) == "math"


def test_decode_path_equals_one_full_forward(traces, tiny_dir, tmp_path):
    """Activations traced through the KV cache equal a single uncached pass over the same tokens."""
    model, _ = analyze(tiny_dir("llama-2l") / "model.onnx")
    InstrumentPass(block_size=1)(model)
    path = tmp_path / "inst.onnx"
    ir.save(model, str(path))
    sess = InstrumentedSession(path, threads=1)
    shard = next(traces.shards())
    _, full = sess.step(shard["tokens"][None].astype(np.int64), sess.new_state())
    for layer in range(2):
        np.testing.assert_allclose(
            shard[f"act_L{layer}"], full[f"cs.L{layer}.ffn.act"][0], rtol=1e-2, atol=2e-3
        )
        np.testing.assert_allclose(
            shard[f"feature_L{layer}"], full[f"cs.L{layer}.feature"][0], rtol=1e-2, atol=2e-3
        )
        np.testing.assert_allclose(
            shard[f"heads_L{layer}"], full[f"cs.L{layer}.attn.group_activity"][0], rtol=1e-3, atol=1e-4
        )
        # block activities at b = 1 and b = 8 derived offline from the trace match the graph's own
        w = traces.down_weight(layer)
        act = full[f"cs.L{layer}.ffn.act"][0]
        np.testing.assert_allclose(
            ffn_block_activity(act, w, 1), full[f"cs.L{layer}.ffn.block_activity"][0], rtol=1e-4, atol=1e-5
        )
        assert ffn_block_activity(act, w, 8).shape == (act.shape[0], 12)


def test_bad_inputs(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="none given"):
        collect_traces(tiny_dir("llama-2l"), [], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="no readable manifest"):
        TraceSet.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"trace_version": 99}))
    with pytest.raises(UserError, match="version 99"):
        TraceSet.open(tmp_path)


def test_calibrate_command(tiny_dir, tmp_path, capsys):
    from cscompile.cli.main import main

    out = tmp_path / "traces"
    assert (
        main(
            [
                "calibrate",
                str(tiny_dir("llama-2l")),
                "-o",
                str(out),
                "--family",
                "code",
                "-n",
                "2",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    t = TraceSet.open(out)
    assert len(t.manifest["prompts"]) == 10 and all(p["family"] == "code" for p in t.manifest["prompts"])
    assert (
        main(["calibrate", str(tiny_dir("llama-2l")), "-o", str(tmp_path / "y"), "--family", "poetry"]) == 2
    )
    assert "prompt families" in capsys.readouterr().err and not (tmp_path / "y").exists()
