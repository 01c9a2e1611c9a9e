"""Every llama.cpp weight type the intake reads, dequantized as the gguf package does."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from cscompile.errors import UserError

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402

from cscompile.quant.gguf import GRID_TYPES, SUPPORTED_TYPES, GGUFGrid  # noqa: E402

N, K = 6, 512  # rows, columns: two 256-blocks per row for the K-quants

#: bytes per 256-value block and the offsets of the fp16 scales (d, dmin) inside it
K_LAYOUT = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def _k_blocks(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with finite, small fp16 scales (gguf has no K-quant quantizer)."""
    size, scale_at = K_LAYOUT[kind]
    raw = rng.integers(0, 256, size=(N, K // 256, size), dtype=np.uint8)
    for at in scale_at:
        raw[:, :, at : at + 2] = (
            (rng.uniform(-0.05, 0.05, (N, K // 256, 1))).astype(np.float16).view(np.uint8)
        )
    return raw.reshape(N, -1)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    expected = {}
    for kind in SUPPORTED_TYPES:
        qt = T[kind]
        if kind in K_LAYOUT:
            raw = _k_blocks(kind, rng)
        else:
            x = rng.standard_normal((N, K)).astype(np.float32)
            raw = quants.quantize(x, qt)
        w.add_tensor(f"t.{kind}", raw, raw_dtype=None if kind == "F32" else qt)
        expected[kind] = quants.dequantize(raw, qt).astype(np.float32)
    bad = rng.integers(0, 256, size=(N, (K // 256) * 84), dtype=np.uint8)  # Q2_K: 84 bytes per block
    w.add_tensor("t.Q2_K", bad, raw_dtype=T.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, expected


@pytest.mark.parametrize("kind", SUPPORTED_TYPES)
def test_dequantize_matches_gguf_reference(gguf_file, kind):
    path, expected = gguf_file
    g = GGUFGrid(path)
    assert g.kind(f"t.{kind}") == kind
    got = g.tensor(f"t.{kind}")
    assert got.shape == (N, K) and got.dtype == np.float32
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, expected[kind])


@pytest.mark.parametrize("kind", GRID_TYPES)
def test_block_grid_equals_the_library_dequantization(gguf_file, kind):
    path, expected = gguf_file
    np.testing.assert_array_equal(GGUFGrid(path).grid(f"t.{kind}").dequantize(), expected[kind])


def test_unsupported_type_is_refused_naming_tensor_and_type(gguf_file):
    path, _ = gguf_file
    with pytest.raises(UserError) as exc:
        GGUFGrid(path).tensor("t.Q2_K")
    msg = str(exc.value)
    assert "t.Q2_K" in msg and "Q2_K" in msg and "Q4_K" in msg and "\n" not in msg


# -- the native step keeps every block grid exactly (issue 23) -----------------------------------
#: the kernel code width and scale format each GGUF type lands in (PackedMatrix.fmt)
NATIVE = {"Q4_0": (4, 0), "Q4_1": (4, 0), "Q5_0": (8, 0), "Q5_1": (8, 0), "Q8_0": (8, 0),
          "Q4_K": (4, 1), "Q5_K": (8, 1), "Q6_K": (8, 2)}  # fmt: skip


@pytest.mark.parametrize("kind", GRID_TYPES)
def test_native_kernel_keeps_the_grid_exactly(gguf_file, kind):
    """pack/unpack round-trips codes, scales and offsets bit for bit; gemv and gemm compute
    ``x @ W^T`` of the gguf package's dequantization (int16 activations: float tolerance)."""
    from cscompile.native import engine as native

    path, expected = gguf_file
    g = GGUFGrid(path).grid(f"t.{kind}")
    p = native.pack(g)
    assert (p.bits, p.fmt) == NATIVE[kind]
    back = native.unpack(p)
    np.testing.assert_array_equal(back.q, g.q)
    np.testing.assert_array_equal(back.dequantize(), expected[kind])
    rng = np.random.default_rng(5)
    x = rng.standard_normal((11, K)).astype(np.float32)
    ref = x.astype(np.float64) @ expected[kind].astype(np.float64).T
    tol = 3e-4 * np.abs(ref).max()
    for threads in (1, 2):
        np.testing.assert_allclose(native.gemv(p, x[0], threads), ref[0], rtol=0, atol=tol)
        np.testing.assert_allclose(native.gemm(p, x, threads), ref, rtol=0, atol=tol)


def test_mixed_grids_stack_exactly(gguf_file):
    """Projections of one input with different types (Llama Q4_K_M: Q4_K q/k, Q6_K v) stack into
    one 8-bit matrix with a scale per 16 and offsets, still the exact grids."""
    from cscompile.native import engine as native

    path, expected = gguf_file
    grid = GGUFGrid(path)
    kinds = ["Q4_K", "Q6_K", "Q5_0", "Q4_1"]
    p = native.pack(native.stack([grid.grid(f"t.{k}") for k in kinds]))
    assert (p.bits, p.fmt, p.m is not None) == (8, 2, True)
    want = np.concatenate([expected[k] for k in kinds])
    np.testing.assert_array_equal(native.unpack(p).dequantize(), want)
    x = np.random.default_rng(6).standard_normal(K).astype(np.float32)
    ref = want.astype(np.float64) @ x
    np.testing.assert_allclose(native.gemv(p, x), ref, rtol=0, atol=3e-4 * np.abs(ref).max())


def test_native_refuses_scale_sizes_that_do_not_fit(gguf_file):
    """The C step checks every length against its format: a per-16 scale array cut to the per-32
    size, or a scale format out of range, is refused before any read."""
    from cscompile.native import engine as native

    path, _ = gguf_file
    p = native.pack(GGUFGrid(path).grid("t.Q6_K"))
    short = native.PackedMatrix(p.codes, p.d, None, p.n, p.k, 8)
    s = short.struct()
    s.d_len = p.d.size // 2
    x = np.zeros(K, np.float32)
    y, work = np.zeros(p.n_padded, np.float32), np.zeros(K + 64, np.float32)
    lib = native.library()
    call = lambda s: lib.cs_dec_gemv(ctypes.addressof(s), x.ctypes.data, x.size, y.ctypes.data, y.size, 1,  # noqa: E731
                                     work.ctypes.data, work.size)  # fmt: skip
    assert call(s) == -5
    s = short.struct()
    s.fmt = 3
    assert call(s) == -5
    q4 = native.pack(GGUFGrid(path).grid("t.Q4_K")).struct()
    q4.fmt = 2  # a scale per 16 with 4-bit codes
    assert call(q4) == -5


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler")
@pytest.mark.parametrize("march,level", [("x86-64", "scalar"), ("haswell", "avx2")])
def test_other_builds_keep_the_grids_the_same(tmp_path, gguf_file, march, level):
    """The scalar and AVX2 paths give the installed (AVX-512 here) build's numbers for every format,
    one token (qgemv) and several (qgemm)."""
    from cscompile.native import engine as native

    cc = shutil.which("cc") or shutil.which("gcc")
    lib_path = tmp_path / f"qdec-{march}.so"
    subprocess.run([cc, "-O2", f"-march={march}", "-fopenmp", "-std=c11", "-shared", "-fPIC",
                    str(native._SOURCE), "-o", str(lib_path), "-lm"], check=True)  # fmt: skip
    lib = ctypes.CDLL(str(lib_path))
    for name, (restype, argtypes) in native.SIGNATURES.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    assert native.SIMD_LEVELS[lib.cs_dec_simd()] == level
    path, _ = gguf_file
    grid = GGUFGrid(path)
    x = np.random.default_rng(7).standard_normal(K).astype(np.float32)
    xs = np.random.default_rng(8).standard_normal((11, K)).astype(np.float32)
    mats = [native.pack(grid.grid(f"t.{k}")) for k in GRID_TYPES]
    mats.append(native.pack(native.stack([grid.grid("t.Q4_K"), grid.grid("t.Q6_K")])))
    for p in mats:
        y, work = np.zeros(p.n_padded, np.float32), np.zeros(K + 64, np.float32)
        s = p.struct()
        rc = lib.cs_dec_gemv(ctypes.addressof(s), x.ctypes.data, x.size, y.ctypes.data, y.size, 1,
                             work.ctypes.data, work.size)  # fmt: skip
        assert rc == 0
        want = native.gemv(p, x)  # float sums in another order: a tolerance of the largest output
        np.testing.assert_allclose(y[: p.n], want, rtol=0, atol=1e-6 * np.abs(want).max())
        t = xs.shape[0]  # the multi-token kernel: 8 + 2 + 1 tokens on AVX2
        y2 = np.zeros((t, p.n_padded), np.float32)
        work = np.zeros(t * (K + 32) // 2 + 64 + 2 * t * (K // 32 + 1), np.float32)
        rc = lib.cs_dec_gemm(ctypes.addressof(s), xs.ctypes.data, xs.size, t, y2.ctypes.data, y2.size, 1,
                             work.ctypes.data, work.size)  # fmt: skip
        assert rc == 0
        want = native.gemm(p, xs)
        np.testing.assert_allclose(y2[:, : p.n], want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory):
    """A tiny Llama (hidden 256: K-quant rows) whose GGUF mixes every block type, as a Q4_K_M
    file does; its fp32 weights are the GGUF's dequantization. ``(model dir, gguf path)``."""
    import torch
    import transformers

    from cscompile.models.export import export_hf_model
    from cscompile.quant.gguf import gguf_name

    tmp_path = tmp_path_factory.mktemp("mixed")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=128, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    rng = np.random.default_rng(1)
    types = [{"q": "Q4_K", "k": "Q4_K", "v": "Q6_K", "o": "Q5_K", "gate": "Q5_0", "up": "Q5_1", "down": "Q6_K"},
             {"q": "Q4_0", "k": "Q5_0", "v": "Q8_0", "o": "Q4_1", "gate": "Q4_K", "up": "Q4_K", "down": "Q5_K"}]  # fmt: skip
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            a, m = layer.self_attn, layer.mlp
            for role, lin in [("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj), ("o", a.o_proj),
                              ("gate", m.gate_proj), ("up", m.up_proj), ("down", m.down_proj)]:  # fmt: skip
                kind = types[i][role]
                n, k = lin.weight.shape
                if kind in K_LAYOUT:  # random blocks, scales sized like a real model's weights
                    size, scale_at = K_LAYOUT[kind]
                    raw = rng.integers(0, 256, (n, k // 256, size), dtype=np.uint8)
                    for at in scale_at:
                        raw[..., at : at + 2] = (
                            rng.uniform(5e-5, 1e-4, (n, k // 256, 1)).astype(np.float16).view(np.uint8)
                        )
                    raw = raw.reshape(n, -1)
                else:
                    raw = quants.quantize(lin.weight.numpy().astype(np.float32), T[kind])
                lin.weight.copy_(torch.from_numpy(quants.dequantize(raw, T[kind]).reshape(n, k)))
                writer.add_tensor(gguf_name(i, role), raw, raw_dtype=T[kind])
        emb = quants.quantize(hf.model.embed_tokens.weight.numpy().astype(np.float32), T.Q8_0)
        hf.model.embed_tokens.weight.copy_(torch.from_numpy(quants.dequantize(emb, T.Q8_0)))
        writer.add_tensor("token_embd.weight", emb, raw_dtype=T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "model"
    out.mkdir()
    export_hf_model(hf, out / "model.onnx")
    hf.config.save_pretrained(out)  # eps and RoPE base for the native config
    return out, tmp_path / "tiny.gguf"


def test_tiny_model_native_build_keeps_every_grid(tmp_path, mixed_model):
    """The native weights keep each grid of the mixed file (no round-to-nearest note), and the
    native decoder follows ONNX Runtime on the fp32 model set to the same grid."""
    import json

    from helpers import run_logits

    from cscompile.bundle import BundleError
    from cscompile.native import engine as native

    out, gguf_path = mixed_model
    w = native.weights_from_model(out / "model.onnx", gguf_path, bits=4)
    assert w.config["weights"] == "source GGUF grid (exact)"
    assert [m.fmt for m in w.qkv] == [2, 0] and [m.fmt for m in w.down] == [2, 1]
    ids = np.random.default_rng(2).integers(0, 96, 24)
    ref = run_logits(out / "model.onnx", ids[None].astype(np.int64))[0]
    got = native.NativeDecoder(w, threads=2, max_ctx=64).logits_all(ids)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3 * np.abs(ref).max())
    # the bundle's files keep the fp32 and per-16 scales and the 8-bit offsets
    files = native.engine_files(w)
    for rel, data in files.items():
        (tmp_path / "b" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "b" / rel).write_bytes(data)
    meta = json.loads((tmp_path / "b" / native.ENGINE_JSON).read_text())
    back = native.load_weights(tmp_path / "b", meta, "test")
    np.testing.assert_array_equal(native.NativeDecoder(back, threads=1, max_ctx=64).logits_all(ids[:8]),
                                  native.NativeDecoder(w, threads=1, max_ctx=64).logits_all(ids[:8]))  # fmt: skip
    meta["arrays"].pop("L000.gu.m")  # 8-bit offsets (Q5_1) dropped: refused, not read as none
    with pytest.raises(BundleError, match="offsets"):
        native.load_weights(tmp_path / "b", meta, "test")


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_dense_engine_keeps_every_grid(tmp_path, mixed_model, precision):
    """The dense ORT engine keeps every grid of the mixed file too (4-bit grids as 4-bit codes at
    int4, everything else as 8-bit codes, Q6_K with a block of 16): at accuracy level 0 (fp32
    activations) its logits equal the fp32 model's to fp32 rounding, far inside what
    round-to-nearest costs (shown on the same model)."""
    from helpers import run_logits

    from cscompile.passes.precision import precision_plan, quantize_model

    out, gguf_path = mixed_model
    ids = np.random.default_rng(3).integers(0, 96, (1, 24)).astype(np.int64)
    ref = run_logits(out / "model.onnx", ids)[0]
    scale = np.abs(ref).max()
    report = quantize_model(out, tmp_path / "q", precision_plan(precision), grid=str(gguf_path),
                            accuracy_level=0, fuse_attention="off")  # fmt: skip
    assert not any(k.endswith("-rtn") for k in report["projections"]), report["projections"]
    got = run_logits(tmp_path / "q" / "model.onnx", ids)[0]
    err = np.abs(got - ref).max() / scale
    assert err < 1e-5, err
    quantize_model(out, tmp_path / "r", precision_plan(precision), grid="none", accuracy_level=0,
                   fuse_attention="off")  # fmt: skip
    assert np.abs(run_logits(tmp_path / "r" / "model.onnx", ids)[0] - ref).max() / scale > 100 * err
