"""The product's precision path on the real model: `cscompile quantize smollm2` keeps quality."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cscompile.metrics import onnx_scorer, perplexity, reference_corpus
from cscompile.runtime import GenerationConfig, load_text_model

pytestmark = pytest.mark.integration

PROMPTS = ("Write a short poem about the sea.", "What is 17 times 23?", "What is the capital of France?")
# logits: a top-2 gap below this is a near-tie that int8 activation rounding may flip. Measured
# (AVX2, 3 prompts x 24 tokens): the two flips sit at gaps 0.01 and 0.08; quantization moves a
# gap below 1 by at most 0.4; 52 of the 72 positions have a gap >= 0.5
MARGIN = 0.5


def test_exact_int4_keeps_perplexity(smollm2, tmp_path):
    from cscompile.cli.main import main

    out = tmp_path / "smol-int4"
    assert main(["quantize", str(smollm2.directory), "-o", str(out)]) == 0
    report = json.loads((out / "quantize.json").read_text())
    assert report["projections"] == {"int4-grid": 210, "int8-grid": 1}
    assert report["attention"].startswith("GroupQueryAttention")
    q = load_text_model(out, threads=2)
    dense = load_text_model(smollm2.directory, threads=2)
    ids = dense.tokenizer.encode(reference_corpus())[:2048]
    p_q = perplexity(onnx_scorer(q.session), ids).perplexity
    p_d = perplexity(onnx_scorer(dense.session), ids).perplexity
    assert abs(p_q / p_d - 1) < 0.015, (p_q, p_d)  # measured +0.42% on 8,176 tokens
    # Greedy agreement away from near-ties. Exact greedy equality is ISA-dependent (int8
    # activations round differently under AVX2 and AVX-512 VNNI: "Write a short poem about the
    # sea." starts with 788 instead of 504 on an AVX2-only machine), so the dense model's greedy
    # continuation is teacher-forced through both engines and the quantized engine's argmax must
    # agree wherever the dense model's top-2 logit margin is at least MARGIN.
    cfg = GenerationConfig(max_new_tokens=24, stop_at_eos=False)
    compared = total = 0
    for prompt in PROMPTS:
        head = dense.encode_prompt(prompt, chat=True)
        cont = dense.generate(prompt, cfg, chat=True).token_ids
        seq = np.asarray([head + cont], np.int64)
        # logits predicting each continuation token: [n, V]
        want = dense.session.forward(seq, dense.session.new_state())[0, len(head) - 1 : -1]
        got = q.session.forward(seq, q.session.new_state())[0, len(head) - 1 : -1]
        top2 = np.sort(want, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] >= MARGIN
        # the teacher-forced dense logits are the ones greedy decoding chose from
        assert (want.argmax(-1)[clear] == np.asarray(cont)[clear]).all(), prompt
        differ = np.flatnonzero(clear & (got.argmax(-1) != want.argmax(-1)))
        assert differ.size == 0, [
            (prompt, int(i), int(want[i].argmax()), int(got[i].argmax()), float(top2[i, 1] - top2[i, 0]))
            for i in differ
        ]
        compared, total = compared + int(clear.sum()), total + len(cont)
    assert compared >= 0.6 * total, (compared, total)  # most positions are compared (measured 72%)
