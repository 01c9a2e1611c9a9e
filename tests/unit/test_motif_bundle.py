"""Motif engines inside a bundle: build --motifs, verify, load memory-mapped, run from the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from cscompile.bundle import verify_bundle
from cscompile.cli.main import main
from cscompile.compiler.build import build_bundle
from cscompile.runtime import GenerationConfig, load


@pytest.fixture(scope="module")
def motif_bundle(tiny_dir, small_calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("mb") / "tiny-motifs"
    build_bundle(
        tiny_dir("llama-2l"), out, precision="fp32", motifs=True, motif_m=16, max_engines=3, calib=small_calib
    )
    return out


def test_bundle_lists_motif_engines_and_verifies(motif_bundle):
    report = verify_bundle(motif_bundle)
    names = report.engines
    assert "dense" in names and "motif-dense" in names
    assert 2 <= len(names) <= 4  # dense engine + at most max_engines motifs
    with load(motif_bundle, engine="motifs") as bm:
        assert bm.engine.kind == "motif"


def test_memory_mapped_motif_dense_equals_the_dense_engine(motif_bundle):
    cfg = GenerationConfig(max_new_tokens=10)
    with load(motif_bundle) as dense, load(motif_bundle, engine="motif-dense") as md:
        a = dense.generate("hello world", cfg)
        b = md.generate("hello world", cfg)
    assert a.token_ids == b.token_ids


def test_switching_runtime_generates_and_reports(motif_bundle):
    with load(motif_bundle, engine="motifs") as bm:
        res = bm.generate("the quick brown", GenerationConfig(max_new_tokens=8))
        st = bm.session.last_state.stats.summary()
    assert len(res.token_ids) > 0
    assert st["decode_steps"] == len(res.token_ids) - 1 or st["decode_steps"] == len(res.token_ids)
    assert sum(st["motif_histogram"].values()) == st["decode_steps"]


def test_a_flipped_byte_in_the_ffn_records_is_caught(motif_bundle, tmp_path):
    import shutil

    from cscompile.bundle import BundleError

    copy = tmp_path / "b"
    shutil.copytree(motif_bundle, copy)
    f = copy / "motifs" / "ffn.bin"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="ffn.bin"):
        verify_bundle(copy)


def test_cli_run_with_motifs_prints_the_motif_stats(motif_bundle, capsys):
    rc = main(["run", str(motif_bundle), "hi", "-n", "4", "--engine", "motifs", "--stats", "--raw"])
    assert rc == 0
    err_out = capsys.readouterr()
    assert "motifs {" in (err_out.out + err_out.err)


def test_engine_flag_needs_a_bundle(tiny_dir, capsys):
    rc = main(["run", str(tiny_dir("llama-2l")), "hi", "-n", "2", "--engine", "motifs"])
    assert rc == 2
    assert "--engine" in capsys.readouterr().err


def test_motif_records_are_read_only_views(motif_bundle):
    from cscompile.motifs.load import load_engine

    eng = load_engine(motif_bundle)
    assert isinstance(eng.ffn[0].w.base, np.memmap) or not eng.ffn[0].w.flags.owndata


def test_motif_builds_are_deterministic(tiny_dir, small_calib, tmp_path, motif_bundle):
    from cscompile.bundle import content_hash

    again = build_bundle(
        tiny_dir("llama-2l"),
        tmp_path / "again",
        precision="fp32",
        motifs=True,
        motif_m=16,
        max_engines=3,
        calib=small_calib,
    )
    assert again.content_hash == content_hash(motif_bundle)


def test_bundle_with_banks_picks_a_bank_at_prefill(tiny_dir, small_calib, tmp_path):
    from cscompile.motifs.build import load_banks

    out = tmp_path / "banked"
    build_bundle(
        tiny_dir("llama-2l"),
        out,
        precision="fp32",
        motifs=True,
        motif_m=16,
        max_engines=3,
        motif_banks=2,
        calib=small_calib,
    )
    centroids, banks = load_banks(out)
    assert centroids.shape[0] == 2 and len(banks) == 2
    assert not np.array_equal(banks[0][0].decoder, banks[1][0].decoder)  # really different banks
    with load(out, engine="motifs") as bm:
        bm.generate("the quick brown fox", GenerationConfig(max_new_tokens=6))
        first = bm.session.last_state.stats.summary()["bank"]
        bm.generate("the quick brown fox", GenerationConfig(max_new_tokens=6))
        assert bm.session.last_state.stats.summary()["bank"] == first in (0, 1)  # deterministic choice
    with load(out, engine="motif-dense") as md, load(out) as dense:  # one motif keeps its banks, still dense
        cfg = GenerationConfig(max_new_tokens=6)
        assert md.generate("hello", cfg).token_ids == dense.generate("hello", cfg).token_ids


def test_bundled_engine_skips_layers_like_the_built_one(tiny_dir, motif_bundle):
    """The K/V-only segments travel in the bundle: a loaded engine skips a layer exactly as the
    engine planned from the source graph does."""
    from cscompile.motifs.engine import LayeredEngine, Motif
    from cscompile.motifs.load import load_engine
    from cscompile.motifs.segments import plan_segments
    from cscompile.passes.pipeline import analyze

    loaded = load_engine(motif_bundle, threads=1)
    model, um = analyze(tiny_dir("llama-2l") / "model.onnx")
    built = LayeredEngine(plan_segments(model, um), 1)
    skip = Motif("skip1", [None] * um.num_layers, skip=frozenset({1}))
    ids = np.array([[5, 17, 33, 2]])
    sa, sb = loaded.new_state(), built.new_state()
    np.testing.assert_allclose(loaded.forward(ids, sa, skip), built.forward(ids, sb, skip), atol=1e-5)
    a = loaded.forward(np.array([[7]]), sa, skip)  # a decode step (the fast path) skipping layer 1
    np.testing.assert_allclose(a, built.forward(np.array([[7]]), sb, skip), atol=1e-5)
    sd = loaded.new_state()
    loaded.forward(ids, sd, skip)
    assert np.abs(a - loaded.forward(np.array([[7]]), sd)).max() > 1e-3  # skipping changed the step
