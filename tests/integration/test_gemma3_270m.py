"""Gemma 3 270M from the registry: fetched, exported, and equal to transformers (slow)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gemma():
    from cscompile.models.zoo import fetch

    return fetch("gemma3-270m")


def test_fetched_entry_agrees_with_transformers(gemma):
    from cscompile.models.zoo import GREEDY_CHECK_TOKENS, ZOO

    m = gemma.manifest
    assert m["source"]["sha256"] == ZOO["gemma3-270m"].gguf_sha256
    assert m["export"]["config"]["family"] == "gemma3"
    assert m["export"]["max_abs_logit_diff"] < 1e-3
    assert m["export"]["greedy"]["agree"] == GREEDY_CHECK_TOKENS


def test_runtime_raw_prompt_starts_with_bos_and_matches_the_recorded_greedy(gemma):
    from cscompile.models.zoo import ZOO
    from cscompile.runtime import GenerationConfig, load_text_model

    tm = load_text_model(gemma.directory, threads=2)
    ids = tm.encode_prompt(ZOO["gemma3-270m"].probe, chat=False)
    assert ids[0] == tm.tokenizer.bos_token_id == 2
    want = gemma.manifest["export"]["greedy"]["ids"][:16]
    res = tm.generate(ids, GenerationConfig(max_new_tokens=16, stop_at_eos=False))
    assert res.token_ids == want
