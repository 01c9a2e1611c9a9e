"""Integration tier on the real SmolLM2-135M-Instruct (fetched and exported on first use)."""

from __future__ import annotations

import numpy as np
import pytest

from cscompile.metrics import onnx_scorer, perplexity, reference_corpus
from cscompile.runtime import GenerationConfig, load_text_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def text_model(smollm2):
    return load_text_model(smollm2.directory, threads=2)


@pytest.fixture(scope="module")
def reference(smollm2):
    from cscompile.models.reference import TorchReference

    return TorchReference.from_dir(smollm2.hf_dir, threads=2)


def test_export_manifest(smollm2):
    m = smollm2.manifest
    assert m["source"]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert m["export"]["max_abs_logit_diff"] < 1e-3
    assert m["export"]["lm_head_retied"] is True
    cfg = m["export"]["config"]
    assert (
        cfg["num_layers"],
        cfg["hidden_size"],
        cfg["num_heads"],
        cfg["num_kv_heads"],
        cfg["intermediate_size"],
    ) == (30, 576, 9, 3, 1536)


def test_spec_of_the_export(text_model):
    spec = text_model.session.spec
    assert spec.num_layers == 30 and spec.num_kv_heads == 3 and spec.head_dim == 64
    assert text_model.context_length == 8192


@pytest.mark.parametrize(
    "prompt",
    ["Write a short poem about the sea.", "What is the capital of France? Explain briefly."],
)
def test_greedy_parity_with_pytorch_64_tokens(text_model, reference, prompt):
    ids = text_model.encode_prompt(prompt, chat=True)
    got = text_model.generate(ids, GenerationConfig(max_new_tokens=64, stop_at_eos=False)).token_ids
    want, _ = reference.generate_ids(ids, 64)
    assert got == want


def test_chat_template_equals_transformers(text_model, smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2.tokenizer_dir))
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text_model.tokenizer.apply_chat_template(msgs) == want
    assert text_model.tokenizer.encode(want) == tok(want, add_special_tokens=False)["input_ids"]


def test_perplexity_ort_equals_pytorch(text_model, reference):
    ids = text_model.tokenizer.encode(reference_corpus())[:1024]
    a = perplexity(onnx_scorer(text_model.session), ids, window=512, stride=512)
    b = perplexity(reference.logits, ids, window=512, stride=512)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-4)
    assert 5 < a.perplexity < 30


def test_second_fetch_reuses_the_cache(smollm2):
    from cscompile.models.zoo import fetch

    msgs = []
    again = fetch("smollm2", progress=msgs.append)
    assert again.manifest == smollm2.manifest
    assert any("cached" in m for m in msgs)


def test_logits_do_not_depend_on_thread_count(smollm2, text_model):
    one = load_text_model(smollm2.directory, threads=1)
    ids = np.array([text_model.tokenizer.encode("Threads must not change the answer.")])
    a = one.session.forward(ids, one.session.new_state())
    b = text_model.session.forward(ids, text_model.session.new_state())
    np.testing.assert_allclose(a, b, atol=2e-3, rtol=1e-3)
