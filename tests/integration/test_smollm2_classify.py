"""Early-exit classification on the real model: a small training set gives a bundle whose 2D
exits answer held-out reviews as the full model does, at a fraction of its layer·tokens, and a
sentence in another language is flagged and answered by the full model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cscompile.compiler.build import build_bundle
from cscompile.evaluation.sentiment import sentiment_set
from cscompile.runtime import load

pytestmark = pytest.mark.integration


def test_classify_bundle_exits_early_at_full_model_accuracy(smollm2, tmp_path):
    rows = sentiment_set(250, 2, "train")
    (tmp_path / "rows.jsonl").write_text(
        "".join(json.dumps({"text": r.text, "label": r.label}) + "\n" for r in rows)
    )
    out = tmp_path / "c.csb"
    build_bundle(smollm2.directory, out, precision="int4", task="classify", labels="negative,positive",
                 train=tmp_path / "rows.jsonl")  # fmt: skip
    test = sentiment_set(40, 2, "test")
    with load(out, threads=2) as bm:
        clf = bm.classifier
        assert clf.cuts == list(range(0, 31, 3))
        full = [bm.classify(r.text, "full") for r in test]
        fast = [bm.classify(r.text, "2d") for r in test]
        acc_full = np.mean([c.label == r.label for c, r in zip(full, test)])
        acc_2d = np.mean([c.label == r.label for c, r in zip(fast, test)])
        assert acc_full >= 0.85 and acc_2d >= acc_full - 0.05, (acc_full, acc_2d)
        cost = sum(c.layer_tokens for c in fast) / sum(c.layer_tokens for c in full)
        assert cost < 0.5, cost
        other = bm.classify("Das Essen war köstlich. Der Kellner war sehr freundlich und schnell.")
        assert not other.in_distribution and other.exit_layer == 30
