"""Prompt compression on the real model: the calibrated scorer finds the evidence, and a fifth of
a 1k-token retrieval prompt still answers as the dense prompt does."""

from __future__ import annotations

import pytest

from cscompile.compiler.build import build_bundle
from cscompile.data.longctx import long_context_set
from cscompile.prompt import PromptBudget
from cscompile.runtime import GenerationConfig, load

pytestmark = pytest.mark.integration


def test_scorer_calibration_and_compressed_retrieval(smollm2, tmp_path):
    out = tmp_path / "p.csb"
    build_bundle(smollm2.directory, out, precision="int4", prompt_scorer=True)
    cfg = GenerationConfig(max_new_tokens=24)
    with load(out, threads=2) as bm:
        doc = bm.bundle.read_json("prompt/scorer.json")
        cal = doc["calibration"]
        assert cal["recall_at_3"] >= 0.75, cal  # measured 1.0 (heads L7.h7, L8.h0)
        assert all(layer < 10 for layer, _ in doc["spec"]["heads"])
        grid = doc["grid"]["orders"]["relevance"]
        assert grid["kl"]["1|dense"] == 0.0 and grid["kl"]["0.1|dense"] > grid["kl"]["0.5|dense"]
        right, dense_right = 0, 0
        for ex in long_context_set("retrieval", 4):
            dense = bm.generate(ex.prompt(), cfg, chat=True)
            res = bm.generate(ex.context, cfg, chat=True, question=ex.question,
                              prompt_budget=PromptBudget(ratio=0.2, order="relevance"))  # fmt: skip
            c = bm.last_compression
            assert c is not None and len(c.ids) <= 0.3 * dense.stats.prompt_tokens
            assert ex.evidence[0] in c.text
            right += bool(ex.correct(res.text))
            dense_right += bool(ex.correct(dense.text))
        assert dense_right == 4 and right >= 3  # measured 12/12 on the full eval set
