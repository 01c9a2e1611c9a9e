"""Every llama.cpp weight type the intake reads, dequantized as the gguf package does."""

from __future__ import annotations

import numpy as np
import pytest

from cscompile.errors import UserError

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402

from cscompile.quant.gguf import SUPPORTED_TYPES, GGUFGrid  # noqa: E402

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


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_block_grid_equals_the_library_dequantization(gguf_file, kind):
    path, expected = gguf_file
    np.testing.assert_array_equal(GGUFGrid(path).grid(f"t.{kind}").dequantize(), expected[kind])


def test_unsupported_type_is_refused_naming_tensor_and_type(gguf_file):
    path, _ = gguf_file
    with pytest.raises(UserError) as exc:
        GGUFGrid(path).tensor("t.Q2_K")
    msg = str(exc.value)
    assert "t.Q2_K" in msg and "Q2_K" in msg and "Q4_K" in msg and "\n" not in msg
