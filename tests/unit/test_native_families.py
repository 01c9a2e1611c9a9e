"""The native step's family settings beyond Gemma 3 against a numpy decoder: Q/K/V biases (Qwen2),
explicit RoPE tables (a RoPE scaling's frequencies, YaRN's factor on cos/sin, partial rotary) and
the attention and logit soft-caps (Gemma 2); prefill in chunks, cached steps, batched steps and a
narrowed (derived) model; and the checks on each new setting (Python's message, the C step's code).
The families end to end (transformers' models, exports, builds, the gate): test_family_matrix.py.
"""

from __future__ import annotations

import ctypes
import dataclasses

import numpy as np
import pytest

from cscompile.errors import UserError
from cscompile.native import engine as native
from cscompile.quant.gguf import BlockGrid

L, H, NH, NKV, HD, INTER, VOCAB = 2, 64, 4, 2, 32, 96, 80
ROT = 8  # partial rotary: the first ROT / 2 channel pairs (j, j + HD / 2) rotate
BASE = {"n_layers": L, "hidden": H, "n_heads": NH, "n_kv": NKV, "head_dim": HD, "inter": INTER, "vocab": VOCAB,
        "eps": 1e-6, "rope_theta": 0.0, "activation": "silu", "qk_norm": False, "post_norms": False,
        "attention_scale": HD**-0.5, "layer_window": [5, 0], "qkv_bias": True, "rotary_dim": ROT,
        "rope_inv_freq": [[0.9, 0.3, 0.05, 0.002], [1.0, 0.1, 0.01, 0.001]], "rope_factor": [1.2, 1.0],
        "layer_rope_table": [1, 0], "attention_softcap": 0.8, "logit_softcap": 4.0}  # fmt: skip


def _h(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def _q8(rng: np.random.Generator, n: int, k: int, scale: float) -> BlockGrid:
    q = rng.integers(-128, 128, (n, k)).astype(np.int8)
    return BlockGrid("Q8_0", q, _h(rng.random((n, k // 32)) * scale / 64 + 1e-4), None)


def _weights(c: dict, seed: int = 0) -> tuple[native.NativeWeights, dict]:
    rng = np.random.default_rng(seed)
    grids = {
        "qkv": [_q8(rng, (NH + 2 * NKV) * HD, H, 1.0) for _ in range(L)],
        "o": [_q8(rng, H, NH * HD, 0.5) for _ in range(L)],
        "gu": [_q8(rng, 2 * INTER, H, 1.0) for _ in range(L)],
        "down": [_q8(rng, H, INTER, 1.0) for _ in range(L)],
    }
    head = _q8(rng, VOCAB, H, 0.3)
    norms = [(1 + 0.3 * rng.standard_normal(s)).astype(np.float32) for s in ((L, H), (L, H), (H,))]
    bias = rng.normal(0, 0.5, (L, (NH + 2 * NKV) * HD)).astype(np.float32) if c.get("qkv_bias") else None
    extra: dict[str, np.ndarray] = {}
    if c.get("qk_norm"):  # OLMo2's full width, else one weight per head
        qw, kw = (NH * HD, NKV * HD) if c.get("qk_norm_full") else (HD, HD)
        extra["q_norm"] = (1 + 0.3 * rng.standard_normal((L, qw))).astype(np.float32)
        extra["k_norm"] = (1 + 0.3 * rng.standard_normal((L, kw))).astype(np.float32)
    if c.get("post_norms"):
        for k in ("attn_out_norm", "ffn_out_norm"):
            extra[k] = (1 + 0.3 * rng.standard_normal((L, H))).astype(np.float32)
    w = native.NativeWeights(
        dict(c), *norms, *[[native.pack(g) for g in grids[k]] for k in ("qkv", "o", "gu", "down")],
        native.pack(head), qkv_bias=bias, **extra,
    )  # fmt: skip
    dense = {k: [g.dequantize() for g in v] for k, v in grids.items()}
    return w, {**dense, "head": head.dequantize(), "norms": norms, "bias": bias, **extra}


def _reference(d: dict, ids: np.ndarray, c: dict) -> np.ndarray:
    """The decoder the config describes, in numpy (fp64), written from the settings' definitions."""
    T = len(ids)
    pos = np.arange(T)

    def rms(x, w):  # type: ignore[no-untyped-def]
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c["eps"]) * w

    def rope(x, table):  # type: ignore[no-untyped-def]  # x [T, heads, HD]; pairs (j, j + HD/2)
        inv, f = np.asarray(c["rope_inv_freq"][table]), c["rope_factor"][table]
        cos, sin = np.ones((T, HD // 2)), np.zeros((T, HD // 2))
        cos[:, : len(inv)] = f * np.cos(pos[:, None] * inv)
        sin[:, : len(inv)] = f * np.sin(pos[:, None] * inv)
        a, b = x[..., : HD // 2], x[..., HD // 2 :]
        cs, sn = cos[:, None], sin[:, None]
        return np.concatenate([a * cs - b * sn, b * cs + a * sn], -1)

    def cap(x, c_):  # type: ignore[no-untyped-def]
        return x if not c_ else c_ * np.tanh(x / c_)

    an, fn, final = d["norms"]
    h = d["head"][ids].astype(np.float64)
    for layer in range(L):
        win = c["layer_window"][layer]
        allowed = (pos[None] <= pos[:, None]) & ((pos[None] > pos[:, None] - win) if win else True)
        pre = (lambda x, w: x) if c.get("no_pre_norms") else rms  # OLMo2: no norm before a branch
        qkv = pre(h, an[layer]) @ d["qkv"][layer].T
        if d["bias"] is not None:
            qkv = qkv + d["bias"][layer]
        t = c["layer_rope_table"][layer]
        q, k = qkv[:, : NH * HD], qkv[:, NH * HD : (NH + NKV) * HD]
        if c.get("qk_norm") and c.get("qk_norm_full"):  # one norm over the whole Q, the whole K
            q, k = rms(q, d["q_norm"][layer]), rms(k, d["k_norm"][layer])
        q = rope(q.reshape(T, NH, HD), t)
        k = rope(k.reshape(T, NKV, HD), t)
        v = qkv[:, (NH + NKV) * HD :].reshape(T, NKV, HD)
        out = np.zeros((T, NH, HD))
        for j in range(NH):
            s = cap(q[:, j] @ k[:, j // (NH // NKV)].T * c["attention_scale"], c.get("attention_softcap"))
            s = np.where(allowed, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[:, j] = (p / p.sum(-1, keepdims=True)) @ v[:, j // (NH // NKV)]
        post = (lambda x, w, li=layer: rms(x, d[w][li])) if c.get("post_norms") else (lambda x, w: x)
        h = h + post(out.reshape(T, -1) @ d["o"][layer].T, "attn_out_norm")
        gu = pre(h, fn[layer]) @ d["gu"][layer].T
        h = h + post(
            (gu[:, :INTER] / (1 + np.exp(-gu[:, :INTER])) * gu[:, INTER:]) @ d["down"][layer].T,
            "ffn_out_norm",
        )
    return cap(rms(h, final) @ d["head"].T, c.get("logit_softcap"))


def _close(got: np.ndarray, ref: np.ndarray, tol: float = 2e-3) -> bool:
    return bool(np.abs(got - ref).max() <= tol * np.abs(ref).max())


#: each setting left out of the config (the numpy decoder then computes without it too)
DROPS = {
    "bias": {"qkv_bias": False},
    "rope factor": {"rope_factor": [1.0, 1.0]},
    "partial rotary": {
        "rotary_dim": HD,
        "rope_inv_freq": [[0.9, 0.3, 0.05, 0.002] * 4, [1.0, 0.1, 0.01, 0.001] * 4],
    },
    "attention soft-cap": {"attention_softcap": None},
    "logit soft-cap": {"logit_softcap": None},
}


def _config(drop: dict) -> dict:
    return {k: v for k, v in {**BASE, **drop}.items() if v is not None}


def _chunked_run(w, ids: np.ndarray) -> np.ndarray:
    """The native decoder's logits for 30 ids: the first 28 prefilled in chunks of 7, then two
    cached steps."""
    dec = native.NativeDecoder(w, threads=2, max_ctx=64, capacity=16)
    got = np.concatenate([dec.forward(ids[i : i + 7], all_logits=True) for i in range(0, 28, 7)])
    return np.concatenate([got, dec.step(int(ids[28]))[None].copy(), dec.step(int(ids[29]))[None].copy()])


def test_decoder_matches_numpy_with_every_setting():
    """Prompt in chunks of 7 and cached steps past the window (5) equal the numpy decoder; each
    setting matters (the same weights under the config without it give other logits)."""
    w, dense = _weights(BASE)
    ids = np.random.default_rng(5).integers(0, VOCAB, 30)
    ref = _reference(dense, ids, BASE)
    got = _chunked_run(w, ids)
    assert _close(got, ref), np.abs(got - ref).max()
    for what, drop in DROPS.items():
        other = _reference({**dense, "bias": None} if what == "bias" else dense, ids, _config(drop))
        assert not _close(other, ref, 0.05), what  # the setting changes the numbers ...
        wd = dataclasses.replace(w, config=_config(drop), qkv_bias=None if what == "bias" else w.qkv_bias)
        dec = native.NativeDecoder(wd, threads=1, max_ctx=64)
        # ... and the step computes it (uncapped attention is sharper: int16 activations' error x10)
        assert _close(dec.forward(ids, all_logits=True), other, 1e-2), what


def test_batched_steps_and_a_narrowed_model_keep_the_settings():
    """forward_batch equals the solo steps bit for bit; a derived model that drops query heads
    slices the Q bias with the rows it keeps (equal to the numpy decoder on the narrowed weights)."""
    w, dense = _weights(BASE)
    sess = native.NativeSession(w, threads=2, context_length=32, adaptive=False)
    prompts = [np.arange(3, 9), np.arange(20, 31)]
    solo, batch = [], []
    for p in prompts:
        st = sess.new_state()
        sess.forward_last(p[None], st)
        solo.append(sess.forward_last(np.array([[7]]), st))
    states = [sess.new_state() for _ in prompts]
    for p, st in zip(prompts, states):
        sess.forward_last(p[None], st)
    batch = sess.forward_batch([7, 7], states)
    np.testing.assert_array_equal(batch, np.stack(solo))
    keep = [0, 3]  # query heads kept in layer 0 (KV heads 0 and 1)
    narrow = native.derive(w, [native.LayerPlan(heads=tuple(keep)), native.LayerPlan()])
    rows = np.concatenate([native.spans(keep, HD), NH * HD + np.arange(2 * NKV * HD)])
    assert narrow.qkv_bias is not None
    np.testing.assert_array_equal(narrow.qkv_bias[0, : len(rows)], w.qkv_bias[0, rows])  # type: ignore[index]
    np.testing.assert_array_equal(narrow.qkv_bias[1], w.qkv_bias[1])  # type: ignore[index]
    o_cols = native.spans(keep, HD)
    d0 = {**dense, "qkv": list(dense["qkv"]), "o": list(dense["o"])}
    d0["qkv"][0] = dense["qkv"][0].copy()
    d0["qkv"][0][native.spans([1, 2], HD)] = 0.0  # dropped heads: zero Q rows, zero O columns
    d0["o"][0] = dense["o"][0].copy()
    d0["o"][0][:, np.setdiff1d(np.arange(NH * HD), o_cols)] = 0.0
    # a dropped head with zero Q (and a bias) still attends: compare through O only
    ids = np.arange(10, 26)
    dec = native.NativeDecoder(narrow, threads=1, max_ctx=32)
    got = dec.forward(ids, all_logits=True)
    assert _close(got, _reference(d0, ids, BASE))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rotary_dim": 7}, "rotary_dim = 7"),
        ({"rotary_dim": 2 * HD}, "rotary_dim = 64"),
        ({"rope_inv_freq": [[0.5, -1.0, 0.1, 0.1], [1.0, 0.1, 0.01, 0.001]]}, "rope_inv_freq"),
        ({"rope_inv_freq": [[0.5, 0.1]] * 2}, "rope_inv_freq"),
        ({"rope_factor": [1.2]}, "rope_factor"),
        ({"rope_factor": [0.0, 1.0]}, "rope_factor"),
        ({"layer_rope_table": [0, 2]}, "layer_rope_table"),
        ({"layer_rope_theta": [1e4, 1e4]}, "RoPE tables"),
        ({"attention_softcap": -1.0}, "attention_softcap"),
        ({"logit_softcap": float("inf")}, "logit_softcap"),
        ({"qkv_bias": 1}, "qkv_bias = 1"),
        ({"no_pre_norms": True}, "no_pre_norms = True"),  # without post_norms
        ({"qk_norm_full": True}, "qk_norm_full = True"),  # without qk_norm
        (
            {
                "qk_norm": True,
                "qk_norm_full": True,
                "width": {"heads": [[0, 3], [0, 1, 2, 3]], "ffn": [INTER] * L},
            },
            "width heads",
        ),
    ],
)
def test_bad_settings_are_refused_in_one_line(change, match):
    c = {**BASE, **change}
    w, _ = _weights(BASE)
    with pytest.raises(UserError, match=match) as exc:
        native.validate(dataclasses.replace(w, config=c))
    assert "\n" not in str(exc.value)


def test_a_bias_of_another_shape_is_refused_and_the_c_step_checks_its_length():
    w, _ = _weights(BASE)
    assert w.qkv_bias is not None
    with pytest.raises(UserError, match="qkv_bias"):
        native.validate(dataclasses.replace(w, qkv_bias=w.qkv_bias[:, :-1]))
    with pytest.raises(UserError, match="qkv_bias"):
        native.validate(dataclasses.replace(w, qkv_bias=None))
    dec = native.NativeDecoder(w, threads=1, max_ctx=16)
    dec.model.qkv_bias_len = w.qkv_bias.size - 1  # a struct that bypassed the Python checks
    with pytest.raises(UserError, match="family feature"):
        dec.forward([1, 2])
    dec.model.qkv_bias_len = w.qkv_bias.size
    dec.model.attn_softcap = ctypes.c_float(float("nan")).value
    with pytest.raises(UserError, match="family feature"):
        dec.forward([1, 2])


OLMO2 = {**BASE, "no_pre_norms": True, "post_norms": True, "qk_norm": True, "qk_norm_full": True}


def test_olmo2_settings_match_numpy_and_each_matters():
    """OLMo2's settings (no norm before the branches, norms after them, QK-norm over the whole Q and
    K) with every other one: chunked prefill and cached steps equal the numpy decoder, batched
    steps equal solo ones bit for bit, and leaving out either OLMo2 setting (the step normalizing
    before each branch with the same weights, or the QK-norm per head) gives other logits that
    the numpy decoder without it predicts. A narrowed model is refused in C too."""
    w, dense = _weights(OLMO2)
    ids = np.random.default_rng(5).integers(0, VOCAB, 30)
    ref = _reference(dense, ids, OLMO2)
    got = _chunked_run(w, ids)
    assert _close(got, ref), np.abs(got - ref).max()
    c = {k: v for k, v in OLMO2.items() if k != "no_pre_norms"}
    other = _reference(dense, ids, c)
    assert not _close(other, ref, 0.05)
    dec = native.NativeDecoder(dataclasses.replace(w, config=c), threads=1, max_ctx=64)
    assert _close(dec.forward(ids, all_logits=True), other, 1e-2)
    # per head, with each head's slice of the weight: the same weights, normalized per head
    c = {k: v for k, v in OLMO2.items() if k != "qk_norm_full"}
    assert w.q_norm is not None and w.k_norm is not None
    wh = dataclasses.replace(w, config=c, q_norm=w.q_norm[:, :HD].copy(), k_norm=w.k_norm[:, :HD].copy())
    dec = native.NativeDecoder(wh, threads=1, max_ctx=64)
    assert not _close(dec.forward(ids, all_logits=True), ref, 0.05)
    sess = native.NativeSession(w, threads=2, context_length=32, adaptive=False)
    solo = []
    for p in (np.arange(3, 9), np.arange(20, 31)):
        st = sess.new_state()
        sess.forward_last(p[None], st)
        solo.append(sess.forward_last(np.array([[7]]), st))
    states = [sess.new_state() for _ in range(2)]
    for p, st in zip((np.arange(3, 9), np.arange(20, 31)), states):
        sess.forward_last(p[None], st)
    np.testing.assert_array_equal(sess.forward_batch([7, 7], states), np.stack(solo))
    with pytest.raises(UserError, match="width heads"):
        native.derive(w, [native.LayerPlan(heads=(0, 3)), native.LayerPlan()])


def test_the_c_step_checks_the_olmo2_fields():
    """A struct that bypassed the Python checks: a per-head-sized Q norm under qk_norm_full, a
    flag outside 0/1, or a narrowed layer under a full-width QK-norm is refused in C."""
    w, _ = _weights(OLMO2)
    assert w.q_norm is not None
    dec = native.NativeDecoder(w, threads=1, max_ctx=16)
    dec.model.q_norm_len = L * HD  # per head's size, full width declared
    with pytest.raises(UserError, match="family feature"):
        dec.forward([1, 2])
    dec.model.q_norm_len = w.q_norm.size
    dec.model.no_pre_norm = 2
    with pytest.raises(UserError, match="family feature"):
        dec.forward([1, 2])
    dec.model.no_pre_norm = 1
    dec.forward([1, 2])
    # a narrowed model (per-head QK-norm, which narrows) whose struct then claims the full width
    c = {k: v for k, v in OLMO2.items() if k != "qk_norm_full"}
    wh = dataclasses.replace(w, config=c, q_norm=w.q_norm[:, :HD].copy(), k_norm=w.k_norm[:, :HD].copy())  # type: ignore[index]
    narrow = native.derive(wh, [native.LayerPlan(heads=(0, 3)), native.LayerPlan()])
    dec = native.NativeDecoder(narrow, threads=1, max_ctx=16)
    dec.forward([1, 2])
    full_q, full_k = w.q_norm, w.k_norm
    dec.model.q_norm, dec.model.q_norm_len = full_q.ctypes.data, full_q.size
    dec.model.k_norm, dec.model.k_norm_len = full_k.ctypes.data, full_k.size  # type: ignore[union-attr]
    dec.model.qk_norm_full = 1
    with pytest.raises(UserError, match="family feature"):
        dec.forward([1, 2])
