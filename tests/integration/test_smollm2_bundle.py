"""The bundle on the real model: build SmolLM2, move the bundle elsewhere, run it there, and catch
a flipped byte in its engine."""

from __future__ import annotations

import shutil
import tarfile

import pytest

from cscompile.bundle import BundleError, verify_bundle
from cscompile.compiler.build import build_bundle
from cscompile.runtime import GenerationConfig, load

pytestmark = pytest.mark.integration


def test_build_copy_run_and_tamper(smollm2, tmp_path):
    src = tmp_path / "build" / "smol.csb"
    res = build_bundle(smollm2.directory, src, precision="int4")
    assert res.build["quantize"]["grid"]  # the GGUF grid was found: exact int4
    cfg = GenerationConfig(max_new_tokens=16)
    with load(src, threads=2) as bm:
        before = bm.generate("What is the capital of France?", cfg, chat=True).token_ids
    moved = tmp_path / "elsewhere" / "copy.csb"
    moved.parent.mkdir()
    shutil.copy2(src, moved)
    shutil.rmtree(src.parent)
    with load(moved, threads=2) as bm:
        assert bm.generate("What is the capital of France?", cfg, chat=True).token_ids == before
    assert verify_bundle(moved).content_hash == res.content_hash
    with tarfile.open(moved) as tf:
        member = tf.getmember("engines/dense.onnx")
    data = bytearray(moved.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x20
    bad = tmp_path / "bad.csb"
    bad.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="dense.onnx"):
        verify_bundle(bad)
