"""The native decode step runs Gemma 3: GeGLU, QK-norm, post-norms, the embedding and attention
scales, sliding-window layers with their own RoPE base. The C step against a numpy Gemma (each
feature must matter), and a tiny random Gemma 3 built with ``--native on`` whose native engine
passes the build's gate and matches the dense engine and the source past the window.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cscompile.errors import UserError
from cscompile.native import engine as native
from cscompile.quant.gguf import BlockGrid


def _h(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def _q4(rng: np.random.Generator, n: int, k: int, scale: float = 0.05) -> BlockGrid:
    nb = k // 32
    d = _h(rng.random((n, nb)) * scale + 1e-3)
    return BlockGrid(
        "Q4_1", rng.integers(0, 16, (n, k)).astype(np.uint8), d, _h(-7.5 * d + rng.normal(0, scale, (n, nb)))
    )


def _q8(rng: np.random.Generator, n: int, k: int, scale: float) -> BlockGrid:
    return BlockGrid(
        "Q8_0",
        rng.integers(-128, 128, (n, k)).astype(np.int8),
        _h(rng.random((n, k // 32)) * scale / 8 + 1e-4),
        None,
    )


# local, global, local (+ global): window 5, RoPE bases 10k local / 1M global, scale != head_dim^-0.5
GEMMA = {"n_layers": 4, "hidden": 64, "n_heads": 4, "n_kv": 2, "head_dim": 16, "inter": 96, "vocab": 80,
         "eps": 1e-6, "rope_theta": 1000000.0, "activation": "gelu_tanh", "qk_norm": True, "post_norms": True,
         "embedding_scale": 8.0, "attention_scale": 24**-0.5, "layer_window": [5, 0, 5, 0],
         "layer_rope_theta": [10000.0, 1000000.0, 10000.0, 1000000.0]}  # fmt: skip
#: Gemma 3 270M's head shape (256 channels: the widest the vector attention path holds)
GEMMA256 = {**GEMMA, "n_heads": 2, "n_kv": 1, "head_dim": 256, "attention_scale": 256**-0.5}


def _gemma_weights(c: dict, seed: int = 0) -> tuple[native.NativeWeights, dict]:
    rng = np.random.default_rng(seed)
    L, H, inter, hd, nh, nkv = c["n_layers"], c["hidden"], c["inter"], c["head_dim"], c["n_heads"], c["n_kv"]
    qkv = [_q4(rng, (nh + 2 * nkv) * hd, H) for _ in range(L)]
    o = [_q4(rng, H, nh * hd, 0.02) for _ in range(L)]
    gu = [_q4(rng, 2 * inter, H) for _ in range(L)]
    down = [_q4(rng, H, inter) for _ in range(L)]
    head = _q8(rng, c["vocab"], H, 0.1)

    def norm(*shape: int) -> np.ndarray:
        return (1 + 0.5 * rng.standard_normal(shape)).astype(np.float32)  # Gemma's 1 + w, randomised

    norms = {"attn_norm": norm(L, H), "ffn_norm": norm(L, H), "final_norm": norm(H), "q_norm": norm(L, hd),
             "k_norm": norm(L, hd), "attn_out_norm": norm(L, H), "ffn_out_norm": norm(L, H)}  # fmt: skip
    w = native.NativeWeights(
        dict(c), norms["attn_norm"], norms["ffn_norm"], norms["final_norm"],
        *[[native.pack(g) for g in gs] for gs in (qkv, o, gu, down)], native.pack(head),
        q_norm=norms["q_norm"], k_norm=norms["k_norm"], attn_out_norm=norms["attn_out_norm"],
        ffn_out_norm=norms["ffn_out_norm"],
    )  # fmt: skip
    dense = {"qkv": [g.dequantize() for g in qkv], "o": [g.dequantize() for g in o],
             "gu": [g.dequantize() for g in gu], "down": [g.dequantize() for g in down],
             "head": head.dequantize(), **norms}  # fmt: skip
    return w, dense


def _gemma_reference(d: dict, ids: np.ndarray, c: dict) -> np.ndarray:
    """A numpy Gemma 3 (fp64), written from transformers' Gemma3 modules (norm weights: 1 + w stored)."""
    hd, nh, nkv, inter, L = c["head_dim"], c["n_heads"], c["n_kv"], c["inter"], c["n_layers"]
    T = len(ids)

    def rms(x, w):  # type: ignore[no-untyped-def]
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c["eps"]) * w

    def rope(x, theta):  # type: ignore[no-untyped-def]  # x [T, heads, hd]
        inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
        ang = np.arange(T)[:, None] * inv[None]
        cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
        half = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos[:, None] + half * sin[:, None]

    def act(x):  # type: ignore[no-untyped-def]
        if c["activation"] == "silu":
            return x / (1 + np.exp(-x))
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    def post(x, w):  # type: ignore[no-untyped-def]
        return x if w is None else rms(x, w[layer])

    h = d["head"][ids].astype(np.float64) * np.float32(c["embedding_scale"])
    pos = np.arange(T)
    for layer in range(L):
        win = c["layer_window"][layer]
        allowed = (pos[None] <= pos[:, None]) & ((pos[None] > pos[:, None] - win) if win else True)
        mask = np.where(allowed, 0.0, -np.inf)
        theta = c["layer_rope_theta"][layer]
        x = rms(h, d["attn_norm"][layer])
        qkv = x @ d["qkv"][layer].T
        q = rope(rms(qkv[:, : nh * hd].reshape(T, nh, hd), d["q_norm"][layer]), theta)
        k = rope(rms(qkv[:, nh * hd : (nh + nkv) * hd].reshape(T, nkv, hd), d["k_norm"][layer]), theta)
        v = qkv[:, (nh + nkv) * hd :].reshape(T, nkv, hd)
        out = np.zeros((T, nh, hd))
        for j in range(nh):
            s = q[:, j] @ k[:, j // (nh // nkv)].T * c["attention_scale"] + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            out[:, j] = (p / p.sum(-1, keepdims=True)) @ v[:, j // (nh // nkv)]
        h = h + post(out.reshape(T, -1) @ d["o"][layer].T, d["attn_out_norm"])
        gu = rms(h, d["ffn_norm"][layer]) @ d["gu"][layer].T
        h = h + post((act(gu[:, :inter]) * gu[:, inter:]) @ d["down"][layer].T, d["ffn_out_norm"])
    return rms(h, d["final_norm"]) @ d["head"].T


def _close(got: np.ndarray, ref: np.ndarray) -> bool:
    # int16 activations: ~1e-5 relative per product, a few hundred of them in a row
    return bool(np.abs(got - ref).max() <= 2e-3 * np.abs(ref).max())


@pytest.mark.parametrize("c", [GEMMA, GEMMA256], ids=["hd16", "hd256"])
def test_decoder_matches_numpy_gemma_past_the_window(c):
    w, dense = _gemma_weights(c)
    ids = np.random.default_rng(5).integers(0, c["vocab"], 30)  # 6 windows of 5
    ref = _gemma_reference(dense, ids, c)
    for threads in (1, 2):
        dec = native.NativeDecoder(w, threads=threads, max_ctx=64, capacity=16)
        got = dec.logits_all(ids)
        assert _close(got, ref), np.abs(got - ref).max(-1)
        assert (got.argmax(-1) == ref.argmax(-1)).all()
        dec.reset()  # prefill + cached steps = teacher forcing (the cache grows from 16 on the way)
        rows = [dec.prefill(ids[:8])] + [dec.step(int(t)).copy() for t in ids[8:29]]
        np.testing.assert_allclose(np.stack(rows), got[7:29], rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize(
    "drop",
    [
        "activation",
        "qk_norm",
        "post_norms",
        "embedding_scale",
        "attention_scale",
        "layer_window",
        "layer_rope_theta",
    ],
)
def test_each_gemma_feature_matters(drop):
    """The numpy Gemma with one feature left out (Llama's instead) is far from the C step's logits."""
    w, dense = _gemma_weights(GEMMA, seed=1)
    ids = np.random.default_rng(6).integers(0, GEMMA["vocab"], 24)
    got = native.NativeDecoder(w, threads=2, max_ctx=32).logits_all(ids)
    assert _close(got, _gemma_reference(dense, ids, GEMMA))
    c, d = dict(GEMMA), dict(dense)
    L, hd = c["n_layers"], c["head_dim"]
    if drop == "activation":
        c["activation"] = "silu"
    elif drop == "qk_norm":
        d["q_norm"], d["k_norm"] = np.ones((L, hd)), np.ones((L, hd))
    elif drop == "post_norms":
        d["attn_out_norm"] = d["ffn_out_norm"] = None
    elif drop == "embedding_scale":
        c["embedding_scale"] = 1.0
    elif drop == "attention_scale":
        c["attention_scale"] = hd**-0.5
    elif drop == "layer_window":
        c["layer_window"] = [0] * L
    else:
        c["layer_rope_theta"] = [c["rope_theta"]] * L
    ref = _gemma_reference(d, ids, c)
    assert not _close(got, ref), f"dropping {drop} changed nothing the test sees"


def test_sensed_head_runs_the_same_gemma_layers():
    """cs_dec_forward_sensed shares the layer loop: its exact candidate logits are the full step's."""
    w, _ = _gemma_weights(GEMMA, seed=3)
    ids = np.random.default_rng(8).integers(0, GEMMA["vocab"], 16)
    full = native.NativeDecoder(w, threads=2, max_ctx=32)
    sensed = native.NativeDecoder(w, threads=2, max_ctx=32)
    from cscompile.native.vocab import build_preview, preview_errors

    preview = build_preview(w.head)
    head = native.SensedHead(preview, GEMMA["vocab"], 0.0, preview_errors(w.head, preview))  # all candidates
    for t in ids:  # past the window of 5
        want = full.step(int(t)).copy()
        got = sensed.step_greedy(int(t), head)
        assert got.token == int(np.argmax(want)) and not got.fell_back
        np.testing.assert_array_equal(sensed._logits[: GEMMA["vocab"]], want)


def test_scalar_and_avx2_builds_run_gemma(tmp_path, monkeypatch):
    """The other attention paths (scalar, AVX2: no 256-channel limit of their own) give the same numbers."""
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler")
    for march in ("x86-64", "haswell"):
        lib_path = tmp_path / f"qdec-{march}.so"
        subprocess.run([cc, "-O2", f"-march={march}", "-fopenmp", "-std=c11", "-shared", "-fPIC",
                        str(native._SOURCE), "-o", str(lib_path), "-lm"], check=True)  # fmt: skip
        lib = __import__("ctypes").CDLL(str(lib_path))
        for name, (restype, argtypes) in native.SIGNATURES.items():
            getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
        monkeypatch.setattr(native, "_lib", lib)
        for c in (GEMMA, GEMMA256):
            w, dense = _gemma_weights(c, seed=2)
            ids = np.random.default_rng(7).integers(0, c["vocab"], 20)
            got = native.NativeDecoder(w, threads=2, max_ctx=32).logits_all(ids)
            assert _close(got, _gemma_reference(dense, ids, c)), (march, c["head_dim"])


def test_gemma_settings_are_checked_and_llama_configs_load_as_before():
    w, _ = _gemma_weights(GEMMA)
    native.validate(w)
    L = GEMMA["n_layers"]
    bad = {
        "logit_soft_cap": 30.0,  # a setting the step does not know: refused by name
        "logit_softcap": -30.0,
        "activation": "relu",
        "qk_norm": 1,
        "embedding_scale": -8.0,
        "attention_scale": float("nan"),
        "layer_window": [5, 0, 5],  # one per layer
        "layer_rope_theta": [10000.0] * (L - 1) + [0.0],
    }
    for key, value in bad.items():
        with pytest.raises(UserError, match=key):
            native.validate(dataclasses.replace(w, config={**w.config, key: value}))
    with pytest.raises(UserError, match="layer_window"):
        native.validate(dataclasses.replace(w, config={**w.config, "layer_window": [5, 0, 5, 2**31]}))
    with pytest.raises(UserError, match="k_norm.*missing"):
        native.validate(dataclasses.replace(w, k_norm=None))
    with pytest.raises(UserError, match="attn_out_norm.*present"):
        native.validate(dataclasses.replace(w, config={**w.config, "post_norms": False}))
    # the C step checks the family block itself (a struct that bypassed Python runs nothing)
    for field, value in (("layer_rope", 5), ("layer_window", -1)):
        dec = native.NativeDecoder(w, threads=1, max_ctx=16)
        getattr(dec._structs[0], field)[1] = value
        with pytest.raises(UserError, match="family feature"):
            dec.forward([1, 2])
    dec = native.NativeDecoder(w, threads=1, max_ctx=16)
    dec.model.act = 2
    with pytest.raises(UserError, match="family feature"):
        dec.forward([1])
    # a config without any of the settings is Llama's: the C struct's family block stays zero
    llama = {k: v for k, v in GEMMA.items() if k in native._CONFIG_INTS + ("eps", "rope_theta")}
    plain = dataclasses.replace(
        w, config=llama, q_norm=None, k_norm=None, attn_out_norm=None, ffn_out_norm=None
    )
    m = native._Struct(plain, 1).model
    assert (m.act, m.n_rope, m.emb_scale, m.attn_scale) == (0, 1, 0.0, 0.0)
    assert not (m.q_norm or m.k_norm or m.attn_out_norm or m.ffn_out_norm or m.layer_window)


# -- a tiny random Gemma 3 through `cscompile build --native on` -----------------------------------
WINDOW = 8
PROMPT = [0, 17, 42, 99, 5, 61, 23, 7, 88, 13, 54, 31]  # longer than the window
STEPS = 16  # cached decode steps after it: 12 + 16 positions, 3.5 windows
# KL(source ‖ engine) averaged over the 17 positions; measured (seed 0): native int8 ~1e-4, int4
# ~0.03 nats, the dense engine of the same build int8 ~3e-4, int4 ~0.06
MEAN_KL = {"int8": 0.002, "int4": 0.08}


@pytest.fixture(scope="module")
def gemma_bundles(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from cscompile.compiler.build import build_bundle
    from cscompile.models.tiny import build_tiny_gemma3

    root = tmp_path_factory.mktemp("gemma3-native")
    model = build_tiny_gemma3(root / "model", softcap=None, sliding_window=WINDOW)
    bundles = {p: build_bundle(model, root / f"{p}.csb", precision=p, native="on") for p in ("int8", "int4")}
    return model, bundles


def _trace(tm, ids: list[int]) -> np.ndarray:
    state = tm.session.new_state(batch=1)
    out = [tm.prefill(ids[: len(PROMPT)], state)]
    for t in ids[len(PROMPT) : len(PROMPT) + STEPS]:
        out.append(tm.decode_one_token(t, state))
    return np.stack(out).astype(np.float64)


def _kl(ref: np.ndarray, got: np.ndarray) -> float:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_native_gemma_passes_the_gate_and_matches_source_and_dense(gemma_bundles, precision):
    from cscompile.runtime import load, load_text_model

    model, bundles = gemma_bundles
    res = bundles[precision]
    assert res.engines == ("dense", "native"), res.warnings  # the gate kept it (a failed one is dropped)
    gate = res.build["gate"]["engines"]
    assert gate["native"]["mean_kl"] <= 1.5 * gate["dense"]["mean_kl"] + 1e-3, gate
    cfg = next(iter(_native_configs(res.path)))
    assert cfg["layer_window"] == [WINDOW, 0, WINDOW] and cfg["activation"] == "gelu_tanh"
    assert cfg["layer_rope_theta"] == [10000.0, 1000000.0, 10000.0] and cfg[
        "attention_scale"
    ] == pytest.approx(24**-0.5)

    src = load_text_model(model, threads=1)  # the source ONNX's greedy continuation
    st = src.session.new_state(batch=1)
    ids, ref = list(PROMPT), [src.prefill(PROMPT, st)]
    for _ in range(STEPS):
        ids.append(int(np.argmax(ref[-1])))
        ref.append(src.decode_one_token(ids[-1], st))
    want = np.stack(ref).astype(np.float64)
    traces = {}
    for engine in ("native", "dense"):
        with load(res.path, threads=1, engine=engine) as bm:
            assert isinstance(bm.text_model.session, native.NativeSession) == (engine == "native")
            traces[engine] = _trace(bm.text_model, ids)
    kl_native, kl_dense = _kl(want, traces["native"]), _kl(want, traces["dense"])
    assert kl_native <= MEAN_KL[precision], (kl_native, kl_dense)
    assert kl_native <= 1.5 * kl_dense + 1e-3, (kl_native, kl_dense)
    agree = traces["native"].argmax(-1) == want.argmax(-1)
    assert agree.mean() >= 0.9, agree


def _native_configs(path):  # type: ignore[no-untyped-def]
    from cscompile.bundle import open_bundle

    with open_bundle(path) as b:
        yield b.read_json(native.ENGINE_JSON)["config"]


def test_gemma_with_a_soft_cap_runs_natively(gemma_bundles, tmp_path):
    """A final logit soft-cap (Gemma 2's, here on a Gemma 3) is computed: `--native on` builds and
    the gate, which compares the native engine with the source, keeps it (caps that bite on a tiny
    model: tests/unit/test_family_matrix.py, Gemma 2)."""
    pytest.importorskip("transformers")
    from cscompile.compiler.build import build_bundle
    from cscompile.models.tiny import build_tiny_gemma3

    capped = build_tiny_gemma3(tmp_path / "capped", sliding_window=WINDOW)
    res = build_bundle(capped, tmp_path / "c.csb", precision="int8", native="on")
    assert "native" in res.engines, res.warnings


def test_batched_gemma_steps_equal_solo_steps_bit_for_bit():
    """cs_dec_forward_batch runs the same family features: three sequences at different positions
    (past the window of 5; caches of 16 growing) stepped together equal each stepped alone."""
    w, dense = _gemma_weights(GEMMA, seed=4)
    sess = native.NativeSession(w, threads=2, context_length=64)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, GEMMA["vocab"], n) for n in (3, 11, 20)]

    def start(p: np.ndarray) -> tuple[native.NativeState, list[np.ndarray]]:
        dec = native.NativeDecoder(w, sess.threads, sess.context_length, capacity=16, rope=sess.rope())
        st = native.NativeState(dec)
        return st, [sess.forward_last(p[None], st)]

    alone, together = [start(p) for p in prompts], [start(p) for p in prompts]
    for _ in range(12):
        for st, rows in alone:
            rows.append(sess.forward_last(np.array([[int(np.argmax(rows[-1]))]]), st))
        toks = [int(np.argmax(rows[-1])) for _, rows in together]
        out = sess.forward_batch(toks, [st for st, _ in together])
        for b, (_, rows) in enumerate(together):
            rows.append(out[b].copy())
    for (_, a), (_, t) in zip(alone, together):
        np.testing.assert_array_equal(np.stack(t), np.stack(a))
    # and the solo steps are the numpy Gemma's (the batch is not merely self-consistent)
    _, rows = alone[2]
    ids = np.concatenate([prompts[2], [int(np.argmax(r)) for r in rows[:-1]]])
    ref = _gemma_reference(dense, ids, GEMMA)[len(prompts[2]) - 1 :]
    assert _close(np.stack(rows), ref)


def test_a_rope_scale_the_graph_shows_goes_into_its_layer_tables(gemma_bundles):
    """A factor on RoPE's cos/sin (YaRN's attention factor) that discovery reads off the graph goes
    into the tables of the layers it scales; a rotary width the graph does not show is refused."""
    import dataclasses

    from cscompile.native.engine import family_features
    from cscompile.passes.pipeline import analyze

    model, _ = gemma_bundles
    _, um = analyze(model / "model.onnx")
    assert family_features(um, model)["activation"] == "gelu_tanh"  # as analyzed: runs
    layer = um.layers[1]
    um.layers[1] = dataclasses.replace(layer, attention=dataclasses.replace(layer.attention, rope_scale=1.2))
    f = family_features(um, model)
    t = f["layer_rope_table"]
    assert [f["rope_factor"][i] for i in t] == [1.0, 1.2, 1.0]
    cos, sin = native.model_rope_tables({**GEMMA, **f, "n_layers": 3}, 40)
    want = native.rope_tables(layer.attention.rope_base, layer.attention.head_dim, 40)
    np.testing.assert_allclose(cos[t[1]], 1.2 * want[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sin[t[1]], 1.2 * want[1], rtol=1e-6, atol=1e-7)
    um.layers[1] = dataclasses.replace(layer, attention=dataclasses.replace(layer.attention, rotary_dim=None))
    with pytest.raises(UserError, match=r"rotary widths \['16', 'None'\]"):
        family_features(um, model)
