"""The native decode step on the real model: the source GGUF grid read exactly, against the fp32 export."""

from __future__ import annotations

import numpy as np
import pytest

from cscompile.metrics import onnx_scorer, perplexity, reference_corpus
from cscompile.native import engine as native
from cscompile.runtime import load_text_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def weights(smollm2):
    return native.weights_from_model(smollm2.onnx)


def test_native_step_matches_the_fp32_export(smollm2, weights):
    dense = load_text_model(smollm2.directory, threads=2)
    ids = dense.tokenizer.encode(reference_corpus())[:600]
    dec = native.NativeDecoder(weights, threads=2, max_ctx=1024, capacity=64)
    got = dec.logits_all(ids[:96])
    ref = onnx_scorer(dense.session)(np.asarray([ids[:96]], np.int64))[0]
    # the grid is the export's weights exactly; the int16 activations are the only difference
    assert np.abs(got - ref).max() < 0.05, np.abs(got - ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.98
    # greedy generation: prefill in chunks, then steps, same ids as the fp32 model
    prompt = dense.tokenizer.encode(
        dense.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Write a short poem about the sea."}]
        )
    )
    from cscompile.runtime import GenerationConfig

    want = dense.generate(prompt, GenerationConfig(max_new_tokens=24, stop_at_eos=False)).token_ids
    assert dec.generate(prompt, 24) == want
    # perplexity on 512 held-out tokens equals the fp32 model's within 0.2%
    p_n = float(np.exp(-np.mean(_logprobs(dec.logits_all(ids[:512]), ids[:512]))))
    p_d = perplexity(onnx_scorer(dense.session), ids[:512], window=512).perplexity
    assert abs(p_n / p_d - 1) < 0.002, (p_n, p_d)


def _logprobs(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    from cscompile.metrics import log_softmax

    lp = log_softmax(logits[:-1].astype(np.float64))
    return lp[np.arange(len(ids) - 1), ids[1:]]


def test_bundle_runs_the_native_engine_by_default(smollm2, tmp_path):
    from cscompile.cli.main import main
    from cscompile.runtime import GenerationConfig, load

    out = tmp_path / "smol.csb"
    assert main(["build", "smollm2", "-o", str(out)]) == 0
    cfg = GenerationConfig(max_new_tokens=20, stop_at_eos=False)
    with load(out, threads=2) as bm, load(out, threads=2, engine="dense") as ort_engine:
        assert bm.engine.kind == "native" and isinstance(bm.session, native.NativeSession)
        assert [e.kind for e in bm.engines] == ["dense", "native"]
        fp32 = load_text_model(smollm2.directory, threads=2)
        prompt = "What is 17 times 23?"
        got = bm.generate(prompt, cfg, chat=True)
        assert got.token_ids == fp32.generate(prompt, cfg, chat=True).token_ids
        assert got.stats.new_tokens == 20
        # the ORT engine of the same bundle is still there (int8 activations: not compared token for token)
        assert (
            ort_engine.engine.kind == "dense"
            and len(ort_engine.generate(prompt, cfg, chat=True).token_ids) == 20
        )
    # --native off leaves it out; the runtime then runs the dense engine
    off = tmp_path / "smol-off.csb"
    assert main(["build", "smollm2", "-o", str(off), "--native", "off"]) == 0
    with load(off, threads=2) as bm:
        assert bm.engine.kind == "dense" and [e.kind for e in bm.engines] == ["dense"]
