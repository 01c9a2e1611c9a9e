from __future__ import annotations

import numpy as np
import pytest

from cscompile.errors import UserError
from cscompile.metrics import onnx_scorer, perplexity, window_spans
from cscompile.models.reference import TorchReference


@pytest.mark.parametrize(
    "n,window,stride", [(100, 16, 16), (100, 16, 5), (17, 16, 16), (16, 16, 8), (3, 512, 512)]
)
def test_every_target_scored_at_most_once(n, window, stride):
    """Transformers' sliding-window scheme: overlapping windows score every token once; disjoint
    windows (stride == window) cannot score a window's first token, which has no context."""
    scored = []
    for b, e, first in window_spans(n, window, stride):
        assert e - b <= window and b < first <= e
        scored += list(range(first, e))
    unscored = {0, *range(window, n, window)} if stride == window else {0}
    assert scored == [i for i in range(n) if i not in unscored]


def test_uniform_scorer_has_vocab_perplexity():
    vocab = 37
    res = perplexity(lambda ids: np.zeros((1, ids.shape[1], vocab)), list(range(30)), window=8, stride=4)
    assert res.perplexity == pytest.approx(vocab, rel=1e-9)
    assert res.tokens_scored == 29


def test_bad_windows():
    with pytest.raises(UserError, match="stride"):
        window_spans(10, 8, 9)
    with pytest.raises(UserError, match="window"):
        window_spans(10, 1, 1)
    with pytest.raises(UserError, match="corpus"):
        window_spans(1, 8, 8)


def test_ort_perplexity_equals_pytorch(tiny_dir, tiny_model):
    ids = tiny_model.tokenizer.encode(
        "Perplexity is the exponential of the mean negative log likelihood. " * 8
    )
    ref = TorchReference.from_dir(tiny_dir("llama-2l") / "hf", threads=1)
    a = perplexity(onnx_scorer(tiny_model.session), ids, window=32, stride=16)
    b = perplexity(ref.logits, ids, window=32, stride=16)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)
    assert 1.0 < a.perplexity < 320 * 10
