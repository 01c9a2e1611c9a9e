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


def test_native_int8_build_passes_the_gate_and_follows_the_source(gemma, tmp_path):
    """`build --native on` (issue 23): the native engine is kept by the gate, at least as close to the
    source as the dense engine of the same build, and takes the source's greedy choice along the
    recorded greedy path wherever the source is decided (top-2 margin >= 1 logit)."""
    import numpy as np

    from cscompile.compiler.build import build_bundle
    from cscompile.models.zoo import ZOO
    from cscompile.runtime import load, load_text_model

    res = build_bundle(gemma.directory, tmp_path / "g8.csb", precision="int8", native="on")
    assert res.engines == ("dense", "native"), res.warnings
    gate = res.build["gate"]["engines"]
    assert gate["native"]["mean_kl"] <= gate["dense"]["mean_kl"], gate

    def trace(tm, ids: list[int], cont: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
        st = tm.session.new_state(batch=1)
        return np.stack([tm.prefill(ids, st)] + [tm.decode_one_token(t, st) for t in cont[:-1]])

    src = load_text_model(gemma.directory, threads=2)
    ids = src.encode_prompt(ZOO["gemma3-270m"].probe, chat=False)
    want = list(gemma.manifest["export"]["greedy"]["ids"])
    ref = trace(src, ids, want)
    assert (ref.argmax(-1) == want).all()  # the recorded path is the source's greedy one
    with load(res.path, threads=2, engine="native") as bm:
        got = trace(bm.text_model, ids, want)
    top2 = np.sort(ref, -1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] >= 1.0
    assert decided.sum() >= len(want) // 2
    miss = np.flatnonzero(decided & (got.argmax(-1) != ref.argmax(-1)))
    assert miss.size == 0, miss
