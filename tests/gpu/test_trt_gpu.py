"""TensorRT engines on a real GPU: build, refit, run, switch motifs. Skipped without a GPU.

Run on an NVIDIA machine with ``pip install -e ".[dev,trt]"``: ``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import numpy as np
import pytest

from cscompile.trt.engine import gpu_problem

_WHY = gpu_problem()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_WHY is not None, reason=f"needs a CUDA GPU with TensorRT: {_WHY}"),
]


@pytest.fixture(scope="module")
def trt_bundle(tiny_dir, tmp_path_factory):
    from cscompile.compiler.build import build_bundle

    out = tmp_path_factory.mktemp("trt") / "tiny-trt.csb"
    return build_bundle(
        tiny_dir("llama-2l"),
        out,
        precision="fp32",
        target="trt",
        motifs=True,
        motif_m=16,
        trt_precision="fp32",
    )


def test_build_records_the_gpu_and_the_comparisons(trt_bundle):
    from cscompile.bundle import open_bundle

    with open_bundle(trt_bundle.path) as b:
        rec = b.read_json("trt/trt.json")
    assert rec["target"]["tensorrt"] and rec["target"]["compute_capability"]
    assert rec["comparisons"] and all(c["passed"] for c in rec["comparisons"])
    assert {e["name"] for e in trt_bundle.manifest["engines"]} >= {"trt-dense", "trt-sparse"}


def test_dense_engine_generates_what_ort_generates(tiny_dir, trt_bundle):
    from cscompile.runtime import DecoderSession, load

    ids = np.array([[5, 17, 33, 2, 99, 100, 7]])
    ref = DecoderSession(tiny_dir("llama-2l") / "model.onnx", threads=1)
    with load(trt_bundle.path) as bm:
        eng = bm.session
        st, sr = eng.new_state(), ref.new_state()
        a, b = eng.forward(ids, st), ref.forward(ids, sr)
        np.testing.assert_allclose(a, b, atol=1e-3)
        for _ in range(6):  # decode steps through the device cache (ping-pong buffers)
            nxt = np.array([[int(b[0, -1].argmax())]])
            a, b = eng.forward(nxt, st), ref.forward(nxt, sr)
            np.testing.assert_allclose(a, b, atol=1e-3)


def test_switching_runs_sparse_motifs_on_the_gpu(trt_bundle):
    from cscompile.runtime import GenerationConfig, load

    with load(trt_bundle.path, engine="motifs") as bm:
        result = bm.generate("Hello", GenerationConfig(max_new_tokens=12))
        stats = bm.session.last_state.stats.summary()
    assert len(result.token_ids) > 0
    assert stats["decode_steps"] > 0 and stats["executed_fraction"] <= 1.0
