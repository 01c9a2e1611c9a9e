"""The native decode step (native/engine.py, csrc/qdecode.c) against dense numpy references."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from cscompile.errors import UserError
from cscompile.native import engine as native
from cscompile.quant.gguf import BlockGrid


def _h(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def _grid(rng: np.random.Generator, kind: str, n: int, k: int, scale: float = 0.02) -> BlockGrid:
    nb = k // 32
    if kind == "Q4_1":
        d = _h(rng.random((n, nb)) * scale + 1e-3)
        return BlockGrid(
            kind,
            rng.integers(0, 16, (n, k)).astype(np.uint8),
            d,
            _h(-7.5 * d + rng.normal(0, scale, (n, nb))),
        )
    return BlockGrid(
        kind,
        rng.integers(-128, 128, (n, k)).astype(np.int8),
        _h(rng.random((n, nb)) * scale / 8 + 1e-4),
        None,
    )


@pytest.mark.parametrize(
    "kind,n,k", [("Q4_1", 40, 96), ("Q4_1", 64, 576), ("Q8_0", 33, 64), ("Q8_0", 256, 160)]
)
def test_gemv_matches_dequantized_weights(kind, n, k):
    rng = np.random.default_rng(n + k)
    g = _grid(rng, kind, n, k)
    x = rng.standard_normal(k).astype(np.float32) * 3
    ref = g.dequantize().astype(np.float64) @ x
    for threads in (1, 2):
        y = native.gemv(native.pack(g), x, threads)
        assert y.shape == (n,)
        # int16 activations per block of 32: relative error ~1e-5 of the largest output
        np.testing.assert_allclose(y, ref, rtol=0, atol=2e-4 * np.abs(ref).max())


def test_gemv_reads_the_offsets_and_every_code_position():
    """A single code or offset changed anywhere must move exactly its output row."""
    rng = np.random.default_rng(1)
    g = _grid(rng, "Q4_1", 32, 64)
    x = rng.standard_normal(64).astype(np.float32)
    base = native.gemv(native.pack(g), x)
    for r, c in [(0, 0), (5, 17), (17, 33), (31, 63)]:
        q = g.q.copy()
        q[r, c] = (q[r, c] + 7) % 16
        y = native.gemv(native.pack(BlockGrid("Q4_1", q, g.scale, g.offset)), x)
        moved = np.flatnonzero(np.abs(y - base) > 1e-6)
        assert moved.tolist() == [r]
        assert y[r] - base[r] == pytest.approx(
            float(g.scale[r, c // 32]) * (int(q[r, c]) - int(g.q[r, c])) * x[c], rel=1e-3
        )
    off = g.offset.copy()
    off[9, 1] = _h(off[9, 1] + 0.5)
    y = native.gemv(native.pack(BlockGrid("Q4_1", g.q, g.scale, off)), x)
    delta = float(off[9, 1] - g.offset[9, 1])
    assert np.flatnonzero(np.abs(y - base) > 1e-6).tolist() == [9]
    assert y[9] - base[9] == pytest.approx(delta * x[32:64].sum(), rel=1e-3, abs=1e-4)


def test_scales_that_are_not_fp16_are_kept_in_fp32():
    """A grid whose scales are not fp16 values (a K-quant's d·sc) is packed with fp32 scales, exactly."""
    g = _grid(np.random.default_rng(0), "Q4_1", 16, 32)
    exact = BlockGrid("Q4_1", g.q, g.scale + np.float32(1e-7), g.offset)
    assert native.pack(g).fmt == 0
    p = native.pack(exact)
    assert p.fmt == 1 and p.d.dtype == p.m.dtype == np.float32  # type: ignore[union-attr]
    np.testing.assert_array_equal(native.unpack(p).scale, exact.scale)


def _build(tmp_path, march: str) -> ctypes.CDLL:  # type: ignore[no-untyped-def]
    cc = shutil.which("cc") or shutil.which("gcc")
    lib_path = tmp_path / f"qdec-{march}.so"
    subprocess.run([cc, "-O2", f"-march={march}", "-fopenmp", "-std=c11", "-shared", "-fPIC",
                    str(native._SOURCE), "-o", str(lib_path), "-lm"], check=True)  # fmt: skip
    lib = ctypes.CDLL(str(lib_path))
    for name, (restype, argtypes) in native.SIGNATURES.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    return lib


needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler"
)


@needs_cc
@pytest.mark.parametrize("march,level", [("x86-64", "scalar"), ("haswell", "avx2")])
def test_other_builds_compute_the_same(tmp_path, monkeypatch, march, level):
    """The scalar path (CPUs without AVX2) and the AVX2 path give the vector build's numbers,
    kernel and whole decoder (the installed build here is AVX-512)."""
    lib = _build(tmp_path, march)
    assert native.SIMD_LEVELS[lib.cs_dec_simd()] == level
    rng = np.random.default_rng(3)
    for kind in ("Q4_1", "Q8_0"):
        g = _grid(rng, kind, 48, 96)
        p = native.pack(g)
        x = rng.standard_normal(96).astype(np.float32)
        y = np.zeros(p.n_padded, np.float32)
        work = np.zeros(256, np.float32)
        s = p.struct()
        rc = lib.cs_dec_gemv(ctypes.addressof(s), x.ctypes.data, x.size, y.ctypes.data, y.size, 1,
                             work.ctypes.data, work.size)  # fmt: skip
        assert rc == 0
        np.testing.assert_allclose(y[:48], native.gemv(p, x), rtol=1e-5, atol=1e-5)
    w, dense = _tiny(seed=11)
    ids = np.random.default_rng(12).integers(0, CFG["vocab"], 40)
    ref = _reference_logits(dense, ids)
    monkeypatch.setattr(native, "_lib", lib)
    assert native.simd_level() == level
    assert (native.unavailable() is None) == (level != "scalar")
    got = native.NativeDecoder(w, threads=2, max_ctx=64).logits_all(ids)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3 * np.abs(ref).max())


# -- a whole decoder against a numpy Llama ---------------------------------------------------
CFG = {"n_layers": 2, "hidden": 64, "n_heads": 4, "n_kv": 2, "head_dim": 16, "inter": 96, "vocab": 80,
       "eps": 1e-5, "rope_theta": 10000.0}  # fmt: skip


#: heads of 32 (one grid block): what dropping single heads needs (the O projection's blocks)
CFG32 = {**CFG, "head_dim": 32}


def _tiny(seed: int = 0, tied: bool = True, c=CFG):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    H, inter, hd = c["hidden"], c["inter"], c["head_dim"]
    q4 = lambda n, k: _grid(rng, "Q4_1", n, k, 0.05)  # noqa: E731
    qkv = [q4((c["n_heads"] + 2 * c["n_kv"]) * hd, H) for _ in range(c["n_layers"])]
    o = [q4(H, c["n_heads"] * hd) for _ in range(c["n_layers"])]
    gu = [q4(2 * inter, H) for _ in range(c["n_layers"])]
    down = [q4(H, inter) for _ in range(c["n_layers"])]
    head = _grid(rng, "Q8_0", c["vocab"], H, 0.4)
    emb = None if tied else _grid(rng, "Q8_0", c["vocab"], H, 0.4)
    norms = [(1 + 0.1 * rng.standard_normal((c["n_layers"], H))).astype(np.float32) for _ in range(2)]
    fin = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    w = native.NativeWeights(dict(c), norms[0], norms[1], fin, *[[native.pack(g) for g in gs] for gs in (qkv, o, gu, down)],
                             native.pack(head), None if emb is None else native.pack(emb))  # fmt: skip
    dense = {"qkv": [g.dequantize() for g in qkv], "o": [g.dequantize() for g in o],
             "gu": [g.dequantize() for g in gu], "down": [g.dequantize() for g in down],
             "head": head.dequantize(), "emb": (emb or head).dequantize(), "norms": norms, "final": fin}  # fmt: skip
    return w, dense


def _reference_logits(d, ids, c=CFG):  # type: ignore[no-untyped-def]
    """A plain numpy Llama (fp64): RMSNorm, rotate-half RoPE, GQA, SwiGLU, tied head."""
    hd, nh, nkv, inter = c["head_dim"], c["n_heads"], c["n_kv"], c["inter"]
    T = len(ids)
    inv = 1.0 / c["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)

    def rms(x, w):  # type: ignore[no-untyped-def]
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c["eps"]) * w

    def rope(x):  # [T, heads, hd]
        half = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos[:, None] + half * sin[:, None]

    h = d["emb"][ids].astype(np.float64)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for layer in range(c["n_layers"]):
        x = rms(h, d["norms"][0][layer])
        qkv = x @ d["qkv"][layer].T
        q = rope(qkv[:, : nh * hd].reshape(T, nh, hd))
        k = rope(qkv[:, nh * hd : (nh + nkv) * hd].reshape(T, nkv, hd))
        v = qkv[:, (nh + nkv) * hd :].reshape(T, nkv, hd)
        out = np.zeros((T, nh, hd))
        for j in range(nh):
            s = q[:, j] @ k[:, j // (nh // nkv)].T / np.sqrt(hd) + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            out[:, j] = (p / p.sum(-1, keepdims=True)) @ v[:, j // (nh // nkv)]
        h = h + out.reshape(T, -1) @ d["o"][layer].T
        x = rms(h, d["norms"][1][layer])
        gu = x @ d["gu"][layer].T
        h = h + (gu[:, :inter] / (1 + np.exp(-gu[:, :inter])) * gu[:, inter:]) @ d["down"][layer].T
    return rms(h, d["final"]) @ d["head"].T


@pytest.mark.parametrize("tied", [True, False])
def test_decoder_matches_numpy_llama(tied):
    w, dense = _tiny(seed=int(tied), tied=tied)
    ids = np.random.default_rng(5).integers(0, CFG["vocab"], 23)
    ref = _reference_logits(dense, ids)
    for threads in (1, 2):
        dec = native.NativeDecoder(w, threads=threads, max_ctx=32)
        got = dec.logits_all(ids)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3 * np.abs(ref).max())
        assert (got.argmax(-1) == ref.argmax(-1)).all()
        # generation continues the same cache: prefill + steps = teacher forcing
        dec.reset()
        last = dec.prefill(ids[:10])
        np.testing.assert_allclose(last, got[9], atol=1e-6)
        # a step attends alone (attend), a chunk in tiles with an online softmax: float rounding
        # apart, which the int16 activations turn into ~1e-4 of the logits' scale
        np.testing.assert_allclose(dec.step(int(ids[10])), got[10], atol=5e-4 * np.abs(got).max())


def test_cache_growth_and_chunks_keep_the_numbers():
    """Prefill in chunks of 64, a cache that doubles from 16 positions, step-by-step decode: one result."""
    w, dense = _tiny(seed=3)
    ids = np.random.default_rng(9).integers(0, CFG["vocab"], 160)
    ref = _reference_logits(dense, ids)
    dec = native.NativeDecoder(w, threads=2, max_ctx=256, capacity=16)
    assert dec.capacity == 16
    first = dec.prefill(ids[:140])  # grows to 256 (chunks of 64 + 64 + 12)
    assert dec.capacity == 256
    rows = [first] + [dec.step(int(t)).copy() for t in ids[140:159]]
    np.testing.assert_allclose(np.stack(rows), ref[139:159], rtol=0, atol=2e-3 * np.abs(ref).max())
    dec = native.NativeDecoder(w, threads=2, max_ctx=256, capacity=16)
    dec.prefill(ids[:20])
    assert dec.capacity == 32
    rows = [dec.step(int(t)).copy() for t in ids[20:39]]  # grows to 64 at position 32
    assert dec.capacity == 64
    np.testing.assert_allclose(np.stack(rows), ref[20:39], rtol=0, atol=2e-3 * np.abs(ref).max())


#: heads of 12 (not a multiple of a vector): the tiled attention's plain path in every build
CFG12 = {**CFG, "n_heads": 8, "head_dim": 12}
#: heads of 80: AVX-512's 4-query tiles over 64 value columns, then 16
CFG80 = {**CFG, "head_dim": 80}


@pytest.mark.parametrize("march", [None, "x86-64", "haswell"])
def test_long_prefill_in_tiles_matches_decode_and_numpy(tmp_path, march):
    """A prompt of 210 tokens (chunks of 64, K/V tiles of 64 or 128 keys, partial last ones):
    prefill's tiled attention equals numpy and the token-by-token decode (which attends per
    head), for whole models, pruned heads reading a custom KV mapping, and heads of 12 and 80."""
    if march is not None and shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("needs a C compiler")
    lib = native.library() if march is None else _build(tmp_path, march)
    ids = np.random.default_rng(31).integers(0, CFG["vocab"], 210)
    plans = (native.LayerPlan(heads=(0, 3)), native.LayerPlan(heads=(1, 2, 3), ffn_blocks=(0, 1)))
    w32, dense32 = _tiny(seed=32, c=CFG32)
    narrowed = native.derive(w32, list(plans))
    assert narrowed.config["width"]["heads"][1] == [1, 2, 3]  # kept heads 0..2 read KV 0, 1, 1
    w12, dense12 = _tiny(seed=33, c=CFG12)
    w80, dense80 = _tiny(seed=34, c=CFG80)
    for w, dense, c in (
        (w12, dense12, CFG12),
        (w80, dense80, CFG80),
        (narrowed, _narrowed_reference(dense32, plans), CFG32),
    ):
        ref = _reference_logits(dense, ids, c)
        dec = native.NativeDecoder(w, threads=2, max_ctx=256, capacity=16, lib=lib)
        got = dec.logits_all(ids).copy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3 * np.abs(ref).max())
        dec.reset()
        steps = np.stack([dec.step(int(t)).copy() for t in ids])
        np.testing.assert_allclose(got, steps, rtol=0, atol=5e-4 * np.abs(ref).max())
        dec.reset()  # a prompt that starts mid-cache: its chunks see the keys written before
        dec.prefill(ids[:70])
        np.testing.assert_allclose(dec.forward(ids[70:], all_logits=True), got[70:], rtol=0,
                                   atol=5e-4 * np.abs(ref).max())  # fmt: skip


def test_multi_token_kernel_equals_the_single_token_one():
    rng = np.random.default_rng(4)
    for kind, t in (("Q4_1", 1), ("Q4_1", 7), ("Q8_0", 5), ("Q4_1", 16)):
        g = _grid(rng, kind, 48, 128)
        p = native.pack(g)
        x = rng.standard_normal((t, 128)).astype(np.float32)
        y = native.gemm(p, x, threads=2)
        assert y.shape == (t, 48)
        np.testing.assert_allclose(y, np.stack([native.gemv(p, r) for r in x]), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("march", [None, "x86-64", "haswell"])
def test_multi_token_kernel_on_bit_planes_equals_the_q8_kernel(tmp_path, march):
    """A Q8_0 head stored as bit planes (the sensed head's layout) through the prefill kernel: the
    Q8_0 matrix's numbers bit for bit, for every token count (blocks of 8, the 4/2/1 rest on AVX2),
    in the AVX-512, AVX2 and scalar builds, and equal to numpy's x @ W^T within int16 rounding."""
    if march is not None and shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("needs a C compiler")
    lib = native.library() if march is None else _build(tmp_path, march)
    rng = np.random.default_rng(41)
    g = _grid(rng, "Q8_0", 70, 160)
    q8 = native.pack(g)
    planes = native.to_planes(q8)
    dense = g.dequantize().astype(np.float64)

    def run(p: native.PackedMatrix, x: np.ndarray) -> np.ndarray:
        y = np.zeros((x.shape[0], p.n_padded), np.float32)
        work = np.zeros(x.shape[0] * (p.k + 32) // 2 + 64 + 2 * x.shape[0] * (p.k // 32 + 1), np.float32)
        s = p.struct()
        rc = lib.cs_dec_gemm(ctypes.addressof(s), x.ctypes.data, x.size, x.shape[0], y.ctypes.data, y.size, 2,
                             work.ctypes.data, work.size)  # fmt: skip
        assert rc == 0
        return y[:, : p.n]

    for t in (1, 3, 8, 13, 21):
        x = rng.standard_normal((t, 160)).astype(np.float32)
        got = run(planes, x)
        np.testing.assert_array_equal(got, run(q8, x))
        ref = x.astype(np.float64) @ dense.T
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_weights_with_wrong_shapes_are_refused():
    w, _ = _tiny()
    native.validate(w)
    bad = native.PackedMatrix(w.o[1].codes[:-256], w.o[1].d, w.o[1].m, w.o[1].n, w.o[1].k, 4)
    w.o[1] = bad
    with pytest.raises(UserError, match="layer 1 o"):
        native.NativeDecoder(w)
    w2, _ = _tiny()
    w2.config["n_kv"] = 3
    with pytest.raises(UserError, match="heads a multiple of KV heads"):
        native.validate(w2)
    w3, _ = _tiny()
    w3.head = native.PackedMatrix(w3.head.codes, w3.head.d, w3.o[0].m, w3.head.n, w3.head.k, 8)
    with pytest.raises(UserError, match="has offsets"):
        native.validate(w3)


def test_decoder_refuses_bad_tokens_and_overflow():
    w, _ = _tiny()
    dec = native.NativeDecoder(w, threads=1, max_ctx=4)
    with pytest.raises(UserError, match="token id 80"):
        dec.step(80)
    with pytest.raises(UserError, match="at most 4"):
        dec.prefill([1, 2, 3, 4, 5])
    dec.prefill([1, 2, 3, 4])
    with pytest.raises(UserError, match="5 tokens of context"):
        dec.step(1)
    assert dec.generate([1, 2], 2) and dec.pos == 3  # generate starts over from position 0


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_rtn_grid_is_within_half_a_step(kind):
    w = np.random.default_rng(2).standard_normal((24, 128)).astype(np.float32) * 0.05
    w[3, :32] = 0.0  # an all-zero block
    g = native.rtn_grid(w, kind)
    err = np.abs(g.dequantize() - w).reshape(24, 4, 32)
    step = g.scale[..., None]
    assert (err <= step / 2 + 1e-3 * step + 1e-7).all()
    assert np.abs(g.dequantize()[3, :32]).max() < 1e-6
    native.pack(g)  # fp16 scales by construction


def test_models_without_a_source_grid_are_rounded(tiny_dir):
    """No GGUF: RTN Q8_0 (int8) stays close to the fp32 ONNX model; Q4_1 (int4) is looser.

    (The kernel itself equals a numpy Llama on the same rounded weights to 6e-4, measured; the
    gap to fp32 here is the rounding of a random tiny model.)
    """
    from cscompile.runtime import load_text_model

    d = tiny_dir("llama-q-2l")  # hidden 64: the blocks of 32 fit
    dense = load_text_model(d, threads=1)
    ids = np.random.default_rng(0).integers(0, 200, 40)
    ref = dense.session.forward(ids[None].astype(np.int64), dense.session.new_state())[0]
    for bits, tol in ((8, 0.06), (4, 0.5)):  # measured 3.5% / (random tiny weights are sensitive)
        w = native.weights_from_model(d / "model.onnx", bits=bits)
        assert w.config["weights"].startswith("RTN")
        got = native.NativeDecoder(w, threads=1, max_ctx=64).logits_all(ids)
        assert np.abs(got - ref).max() < tol * np.abs(ref).max(), (bits, np.abs(got - ref).max())
    with pytest.raises(UserError, match="4 or 8"):
        native.weights_from_model(d / "model.onnx", bits=3)
    w4 = native.weights_from_model(
        d / "model.onnx", bits=8, head_bits=4
    )  # a 4-bit head (tied: embedding too)
    assert w4.head.bits == 4 and w4.emb is None and w4.qkv[0].bits == 8
    got = native.NativeDecoder(w4, threads=1, max_ctx=64).logits_all(ids)
    assert np.abs(got - ref).max() < 0.5 * np.abs(ref).max()
    with pytest.raises(UserError, match="4 or 8"):
        native.weights_from_model(d / "model.onnx", head_bits=2)


# -- the bundle's native engine files ---------------------------------------------------------
def _write(tmp_path, files):  # type: ignore[no-untyped-def]
    for rel, data in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    import json

    return json.loads((tmp_path / native.ENGINE_JSON).read_text())


@pytest.mark.parametrize("tied", [True, False])
def test_engine_files_round_trip(tmp_path, tied):
    w, dense = _tiny(seed=7, tied=tied)
    meta = _write(tmp_path, native.engine_files(w))
    back = native.load_weights(tmp_path, meta, "test")
    assert (back.emb is None) == tied and back.config == w.config
    ids = np.arange(12) * 5 % CFG["vocab"]
    np.testing.assert_array_equal(
        native.NativeDecoder(back, threads=1, max_ctx=16).logits_all(ids),
        native.NativeDecoder(w, threads=1, max_ctx=16).logits_all(ids),
    )
    assert not back.head.codes.flags.writeable  # mapped read-only from weights.bin


def test_tampered_engine_files_are_refused(tmp_path):
    import copy

    from cscompile.bundle import BundleError

    w, _ = _tiny(seed=8)
    meta = _write(tmp_path, native.engine_files(w))
    cases = {
        "rows": lambda m: m["matrices"]["L001.down"].update(n=m["matrices"]["L001.down"]["n"] * 2),
        "offset": lambda m: m["arrays"]["head.codes"].update(offset=10**9),
        "missing": lambda m: m["arrays"].pop("L000.o.m"),
        "config": lambda m: m["config"].update(hidden=48),
        "version": lambda m: m.update(format_version=99),
        "object": lambda m: m["arrays"]["attn_norm"].update(dtype="|O"),
    }
    for name, change in cases.items():
        bad = copy.deepcopy(meta)
        change(bad)
        with pytest.raises(BundleError) as info:
            native.load_weights(tmp_path, bad, "test")
        assert "native/engine.json" in str(info.value), name


# -- width, depth and precision (derive) --------------------------------------------------------
@pytest.mark.parametrize("kind,n,k", [("Q4_1", 40, 96), ("Q8_0", 33, 64)])
def test_unpack_inverts_pack(kind, n, k):
    g = _grid(np.random.default_rng(n), kind, n, k)
    back = native.unpack(native.pack(g))
    assert back.kind == kind and back.q.dtype == g.q.dtype
    np.testing.assert_array_equal(back.q, g.q)
    np.testing.assert_array_equal(back.scale, g.scale)
    if kind == "Q4_1":
        np.testing.assert_array_equal(back.offset, g.offset)
    assert native.regrid(back, 4 if kind == "Q4_1" else 8) is back  # same precision: untouched


def _narrowed_reference(dense, plans, head_bits=None):  # type: ignore[no-untyped-def]
    """The dense weights with dropped heads' O columns and dropped FFN blocks' down columns zeroed
    (what removing them computes), re-rounded where a plan asks for other bits."""
    c, hd = CFG32, CFG32["head_dim"]
    d = {k: (list(v) if isinstance(v, list) else v) for k, v in dense.items()}
    for i, p in enumerate(plans):
        for name, bits in (
            ("qkv", p.attn_bits),
            ("o", p.attn_bits),
            ("gu", p.ffn_bits),
            ("down", p.ffn_bits),
        ):
            if bits is not None:
                d[name][i] = native.rtn_grid(
                    d[name][i].astype(np.float32), "Q4_1" if bits == 4 else "Q8_0"
                ).dequantize()
        o, down = d["o"][i].copy(), d["down"][i].copy()
        if p.heads is not None:
            for h in set(range(c["n_heads"])) - set(p.heads):
                o[:, h * hd : (h + 1) * hd] = 0
        if p.ffn_blocks is not None:
            for b in set(range(c["inter"] // 32)) - set(p.ffn_blocks):
                down[:, b * 32 : (b + 1) * 32] = 0
        d["o"][i], d["down"][i] = o, down
    if head_bits == 4:
        d["head"] = native.rtn_grid(dense["head"].astype(np.float32), "Q4_1").dequantize()
    return d


@pytest.mark.parametrize(
    "plans,head_bits",
    [
        (
            (
                native.LayerPlan(heads=(0, 3), ffn_blocks=(2,)),
                native.LayerPlan(heads=(1, 2, 3), ffn_blocks=(0, 1)),
            ),
            None,
        ),
        (
            (native.LayerPlan(heads=()), native.LayerPlan(ffn_blocks=(), attn_bits=8)),
            4,
        ),  # attention / FFN dropped
        ((native.LayerPlan(ffn_bits=8), native.LayerPlan(heads=(2,), ffn_blocks=(1,), ffn_bits=8)), None),
    ],
)
def test_derived_width_depth_and_precision_match_numpy(plans, head_bits):
    w, dense = _tiny(seed=11, c=CFG32)
    d = native.derive(w, list(plans), head_bits=head_bits)
    ids = np.arange(19) * 7 % CFG["vocab"]
    ref = _reference_logits(_narrowed_reference(dense, plans, head_bits), ids, CFG32)
    for threads in (1, 2):
        got = native.NativeDecoder(d, threads=threads, max_ctx=32).logits_all(ids)
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3 * np.abs(ref).max())
    # and it is not the whole model
    whole = _reference_logits(dense, ids, CFG32)
    assert np.abs(whole - ref).max() > 0.05 * np.abs(ref).max()


def test_derive_shares_what_it_keeps_and_refuses_bad_plans():
    w, _ = _tiny(seed=12, c=CFG32)
    same = native.derive(w, [native.LayerPlan()] * 2)
    assert "width" not in same.config and same.qkv[0] is w.qkv[0] and same.down[1] is w.down[1]
    part = native.derive(w, [native.LayerPlan(heads=(0,)), native.LayerPlan()])
    assert part.config["width"] == {"heads": [[0], [0, 1, 2, 3]], "ffn": [96, 96]}
    assert part.o[0].k == 32 and part.gu[0] is w.gu[0]
    for plans, match in (
        ([native.LayerPlan()], "2 \\(one per layer\\)"),
        ([native.LayerPlan(heads=(4,)), native.LayerPlan()], "distinct heads"),
        ([native.LayerPlan(ffn_blocks=(0, 0)), native.LayerPlan()], "distinct blocks"),
        ([native.LayerPlan(attn_bits=3), native.LayerPlan()], "4 or 8"),
        ([native.LayerPlan(heads=(), ffn_blocks=())] * 2, "every layer dropped"),
    ):
        with pytest.raises(UserError, match=match):
            native.derive(w, plans)
    with pytest.raises(UserError, match="already narrowed"):
        native.derive(part, [native.LayerPlan()] * 2)


def test_narrowed_engine_files_round_trip_and_bad_width_is_refused(tmp_path):
    import copy

    from cscompile.bundle import BundleError

    w, _ = _tiny(seed=13, c=CFG32)
    d = native.derive(w, [native.LayerPlan(heads=(1, 2), ffn_blocks=()), native.LayerPlan(heads=())])
    meta = _write(tmp_path, native.engine_files(d))
    assert "L000.gu" not in meta["matrices"] and "L001.qkv" not in meta["matrices"]
    back = native.load_weights(tmp_path, meta, "test")
    ids = np.arange(9)
    np.testing.assert_array_equal(
        native.NativeDecoder(back, threads=1, max_ctx=16).logits_all(ids),
        native.NativeDecoder(d, threads=1, max_ctx=16).logits_all(ids),
    )
    for change in (
        lambda m: m["config"]["width"]["heads"][0].append(7),  # a head that does not exist
        lambda m: m["config"]["width"]["ffn"].__setitem__(1, 50),  # not a multiple of 32
        lambda m: m["config"]["width"]["heads"].__setitem__(1, [0]),  # a matrix the width lacks
        lambda m: m["config"]["width"].pop("ffn"),
    ):
        bad = copy.deepcopy(meta)
        change(bad)
        with pytest.raises(BundleError, match="native/engine.json"):
            native.load_weights(tmp_path, bad, "test")


# -- GPTQ rounding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_gptq_is_rtn_without_correlations_and_beats_it_with_them(kind):
    from cscompile.passes.gptq import gptq_grid, hessian

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((48, 128)) * 0.05).astype(np.float32)
    rtn = native.rtn_grid(w, kind)
    same = gptq_grid(w, np.eye(128), kind)  # H diagonal: no error to spread, exactly RTN
    np.testing.assert_array_equal(same.q, rtn.q)
    np.testing.assert_array_equal(same.scale, rtn.scale)
    # correlated inputs with uneven scales (what hidden states look like): lower output error
    x = rng.standard_normal((1024, 128)) @ (np.eye(128) + 0.4 * rng.standard_normal((128, 128)))
    x[:, :8] *= 6
    g = gptq_grid(w, hessian(x), kind)
    assert g.q.dtype == rtn.q.dtype and g.q.shape == rtn.q.shape
    native.pack(g)  # a valid grid: fp16 scales, codes in range
    out_err = lambda grid: np.linalg.norm(x @ (w - grid.dequantize()).T)  # noqa: E731
    assert out_err(g) < 0.8 * out_err(rtn), (out_err(g), out_err(rtn))
    with pytest.raises(UserError, match="multiple of 32"):
        gptq_grid(w[:, :100], np.eye(100), kind)


# -- motifs switched per token over one cache ----------------------------------------------------
def _reference_switching(dicts, choice, ids, c=CFG32):  # type: ignore[no-untyped-def]
    """Token by token in numpy (fp64): position t runs the weights ``dicts[choice[t]]`` (zeroed O /
    down columns for dropped units), every layer writing its K/V — what one shared cache holds."""
    hd, nh, nkv, inter = c["head_dim"], c["n_heads"], c["n_kv"], c["inter"]
    inv = 1.0 / c["rope_theta"] ** (np.arange(0, hd, 2) / hd)

    def rms(x, w):  # type: ignore[no-untyped-def]
        return x / np.sqrt((x * x).mean() + c["eps"]) * w

    def rope(x, pos):  # [heads, hd]
        ang = pos * inv
        cos, sin = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
        return x * cos + np.concatenate([-x[:, hd // 2 :], x[:, : hd // 2]], -1) * sin

    L = c["n_layers"]
    K = [[] for _ in range(L)]
    V = [[] for _ in range(L)]
    out = []
    for t, tok in enumerate(ids):
        d = dicts[choice[t]]
        h = d["emb"][tok].astype(np.float64)
        for layer in range(L):
            qkv = rms(h, d["norms"][0][layer]) @ d["qkv"][layer].T
            q = rope(qkv[: nh * hd].reshape(nh, hd), t)
            K[layer].append(rope(qkv[nh * hd : (nh + nkv) * hd].reshape(nkv, hd), t))
            V[layer].append(qkv[(nh + nkv) * hd :].reshape(nkv, hd))
            k, v = np.stack(K[layer]), np.stack(V[layer])  # [t+1, nkv, hd]
            att = np.zeros((nh, hd))
            for j in range(nh):
                s = k[:, j // (nh // nkv)] @ q[j] / np.sqrt(hd)
                p = np.exp(s - s.max())
                att[j] = (p / p.sum()) @ v[:, j // (nh // nkv)]
            h = h + att.reshape(-1) @ d["o"][layer].T
            gu = rms(h, d["norms"][1][layer]) @ d["gu"][layer].T
            h = h + (gu[:inter] / (1 + np.exp(-gu[:inter])) * gu[inter:]) @ d["down"][layer].T
        out.append(rms(h, d["final"]) @ d["head"].T)
    return np.stack(out)


def test_motifs_switched_per_token_share_one_cache():
    """Dense + two derived motifs (one drops a whole layer's attention, keeping its K/V) chosen per
    token: every step equals a numpy model that runs that token's weights over the one cache."""
    w, dense = _tiny(seed=21, c=CFG32)
    plans_a = (native.LayerPlan(heads=()), native.LayerPlan(ffn_blocks=(0,)))
    plans_b = (native.LayerPlan(heads=(1, 2), ffn_blocks=()), native.LayerPlan(heads=(), ffn_blocks=(2,)))
    a = native.derive(w, list(plans_a), keep_kv=True)
    b = native.derive(w, list(plans_b), head_bits=4, keep_kv=True)
    assert a.config["width"]["kv"] and a.qkv[0].n == 2 * CFG32["n_kv"] * 32 and a.o[0] is None
    refs = [dense, _narrowed_reference(dense, plans_a), _narrowed_reference(dense, plans_b, 4)]
    ids = np.arange(17) * 5 % CFG32["vocab"]
    choice = [0, 0, 0, 1, 2, 2, 0, 1, 0, 2, 1, 1, 0, 0, 2, 1, 0]
    ref = _reference_switching(refs, choice, ids)
    for threads in (1, 2):
        dec = native.NativeDecoder(w, threads=threads, max_ctx=32, capacity=16, motifs=[a, b])
        assert dec.n_motifs == 3
        first = dec.prefill(ids[:3])  # motif 0 for the prompt
        got = [first] + [dec.forward([int(t)], motif=m).copy() for t, m in zip(ids[3:], choice[3:])]
        np.testing.assert_allclose(np.stack(got), ref[2:], rtol=0, atol=2e-3 * np.abs(ref).max())
    # the K/V written while motif a skipped layer 0's attention matter: without them the cache
    # differs (the same steps with dense weights give other logits)
    all_dense = _reference_switching(refs, [0] * len(ids), ids)
    assert np.abs(all_dense[4:] - ref[4:]).max() > 0.05 * np.abs(ref).max()


def test_motifs_that_would_break_the_cache_are_refused():
    w, _ = _tiny(seed=22, c=CFG32)
    no_kv = native.derive(w, [native.LayerPlan(heads=()), native.LayerPlan()])
    assert "kv" not in no_kv.config["width"] and no_kv.qkv[0] is None
    with pytest.raises(UserError, match="keep_kv"):
        native.NativeDecoder(w, threads=1, max_ctx=16, motifs=[no_kv])
    other, _ = _tiny(seed=22, c={**CFG32, "inter": 64})
    with pytest.raises(UserError, match="another model shape"):
        native.NativeDecoder(w, threads=1, max_ctx=16, motifs=[other])
    dec = native.NativeDecoder(w, threads=1, max_ctx=16)
    with pytest.raises(UserError, match=r"motif 1.*\[0, 1\)"):
        dec.forward([1], motif=1)
    # a width claiming K/V rows the matrices lack is refused like any other bad width
    kv = native.derive(w, [native.LayerPlan(heads=()), native.LayerPlan()], keep_kv=True)
    bad = native.NativeWeights({**kv.config, "width": {**kv.config["width"], "kv": False}}, kv.attn_norm,
                               kv.ffn_norm, kv.final_norm, kv.qkv, kv.o, kv.gu, kv.down, kv.head, kv.emb)  # fmt: skip
    with pytest.raises(UserError, match="layer 0 qkv"):
        native.validate(bad)
    with pytest.raises(UserError, match="width.kv"):
        native.validate(native.NativeWeights({**kv.config, "width": {**kv.config["width"], "kv": 1}}, kv.attn_norm,
                        kv.ffn_norm, kv.final_norm, kv.qkv, kv.o, kv.gu, kv.down, kv.head, kv.emb))  # fmt: skip


def test_switching_session_runs_the_motif_the_entropy_picks():
    from cscompile.motifs.runtime import ControllerConfig, entropy
    from cscompile.native.switch import NativeSwitchingSession, ffn_fraction

    w, _ = _tiny(seed=23, c=CFG32)
    a = native.derive(
        w, [native.LayerPlan(heads=(), ffn_blocks=(1,)), native.LayerPlan(heads=(0, 3))], keep_kv=True
    )
    ids = (np.arange(14) * 11 + 3) % CFG32["vocab"]

    def reference(rule):  # type: ignore[no-untyped-def]
        dec = native.NativeDecoder(w, threads=1, max_ctx=32, motifs=[a])
        out = [dec.prefill(ids[:4])]
        picks = []
        for t in ids[4:]:
            m = rule(entropy(out[-1]))
            picks.append(m)
            out.append(dec.forward([int(t)], motif=m).copy())
        return np.stack(out), picks

    dense_run, _ = reference(lambda e: 0)
    mid = float(np.median([entropy(r) for r in dense_run]))
    for thr, rule in ((1e9, lambda e: 1), (-1.0, lambda e: 0), (mid, lambda e: int(e < mid))):
        sess = NativeSwitchingSession([w, a], ["native", "a"], ControllerConfig([thr], hold=0), threads=1,
                                      context_length=32)  # fmt: skip
        st = sess.new_state()
        got = [sess.forward_last(ids[None, :4], st)] + [
            sess.forward_last(np.array([[t]]), st) for t in ids[4:]
        ]
        ref, picks = reference(rule)
        np.testing.assert_allclose(np.stack(got), ref, rtol=0, atol=1e-5)
        names = ["native", "a"]
        assert dict(st.stats.histogram) == {n: picks.count(i) for i, n in enumerate(names) if picks.count(i)}
        assert st.stats.executed == [[1.0, ffn_fraction(a)][p] for p in picks]
    assert 0 < picks.count(1) < len(picks)  # the median threshold used both motifs
    # a sequence's first token runs dense even when it comes alone (it is the prompt)
    sess = NativeSwitchingSession(
        [w, a], ["native", "a"], ControllerConfig([1e9]), threads=1, context_length=32
    )
    st = sess.new_state()
    first = sess.forward(ids[None, :1], st)[0, -1]
    np.testing.assert_allclose(
        first, native.NativeDecoder(w, threads=1, max_ctx=32).prefill(ids[:1]), atol=1e-6
    )
    assert st.stats.steps == 0
    with pytest.raises(UserError, match="1 \\(one between each pair"):
        NativeSwitchingSession([w, a], ["native", "a"], ControllerConfig([]), threads=1)


def test_entropy_in_c_equals_numpy():
    from cscompile.motifs.runtime import entropy as np_entropy

    rng = np.random.default_rng(31)
    for n, scale in ((1, 1.0), (7, 1.0), (49152, 3.0), (1000, 30.0), (33, 0.0)):
        z = (rng.standard_normal(n) * scale).astype(np.float32)
        want = np.log(n) if scale == 0.0 else np_entropy(z)
        assert native.entropy(z) == pytest.approx(want, rel=1e-5, abs=1e-6)
    peaked = np.full(100, -50.0, np.float32)
    peaked[3] = 50.0
    assert native.entropy(peaked) == pytest.approx(0.0, abs=1e-6)
