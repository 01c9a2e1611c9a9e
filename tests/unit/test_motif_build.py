"""The motif family build on a tiny model: measured members, Pareto selection, bundle files."""

from __future__ import annotations

import numpy as np
import pytest

from cscompile.motifs.build import (
    FAMILY_FILE,
    PREDICTORS_FILE,
    build_family,
    load_family,
    npz_bytes,
    pareto,
    switching_session,
)
from cscompile.motifs.engine import LayeredEngine
from cscompile.motifs.family import FamilyMember
from cscompile.motifs.segments import plan_segments
from cscompile.passes.pipeline import analyze


def test_build_family_round_trips_through_bundle_files(tiny_dir, tmp_path):
    path = tiny_dir("llama-2l")
    model, um = analyze(path / "model.onnx")
    eng = LayeredEngine(plan_segments(model, um), 2)
    calib = np.random.default_rng(0).integers(3, 300, 900)
    fb = build_family(
        eng,
        calib,
        m=8,
        targets=(0.75, 0.5),
        max_engines=3,
        quality_tokens=128,
        sens_tokens=64,
        profile_steps=4,
    )
    members = fb.family.members
    assert members[0].name == "dense" and 1 <= len(members) <= 3
    assert len(fb.candidates) == 5
    for mb in fb.candidates:
        # profiled (profile_steps=4); its value is the machine's, so only its presence is checked
        assert mb.perplexity is not None and mb.perplexity > 1 and mb.decode_ms is not None
    dense_ppl = fb.candidates[0].perplexity
    assert all(mb.perplexity != dense_ppl for mb in fb.candidates[1:])  # sparse motifs really differ
    files = fb.files()
    assert set(files) == {FAMILY_FILE, PREDICTORS_FILE}
    assert files == fb.files()  # deterministic bytes
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    fam, preds, ctl = load_family(tmp_path)
    assert [mb.name for mb in fam.members] == [mb.name for mb in members]
    assert len(preds) == um.num_layers
    np.testing.assert_array_equal(preds[1].decoder, fb.predictors[1].decoder)
    sw = switching_session(eng, fam, preds, ctl)
    st = sw.new_state()
    sw.forward(np.array([[5, 6, 7]]), st)
    for t in range(4):
        sw.forward(np.array([[8 + t]]), st)
    assert st.stats.steps == 4


def test_pareto_keeps_dense_and_drops_dominated():
    mk = lambda n, ms, p: FamilyMember(n, [1.0], perplexity=p, decode_ms=ms)  # noqa: E731
    members = [
        mk("dense", 10, 14.0),
        mk("a", 9, 15.0),
        mk("b", 9.5, 16.0),
        mk("c", 7, 20.0),
        mk("d", 8, 30.0),
    ]
    front = pareto(members, 10)
    assert [m.name for m in front] == ["dense", "a", "c"]
    assert [m.name for m in pareto(members, 2)] == ["dense", "c"]


def test_npz_bytes_are_deterministic_and_refuse_objects():
    a = {"x": np.arange(4, dtype=np.float32), "y": np.ones((2, 2))}
    assert npz_bytes(a) == npz_bytes(dict(reversed(list(a.items()))))
    with pytest.raises(ValueError, match="object"):
        npz_bytes({"o": np.array([object()], dtype=object)})


def test_pareto_by_fraction_is_independent_of_timings():
    mk = lambda n, d, p, ms: FamilyMember(n, [d], perplexity=p, decode_ms=ms)  # noqa: E731
    members = [
        mk("dense", 1.0, 14.0, 30.0),
        mk("u90", 0.9, 15.5, 10.0),
        mk("a90", 0.9, 15.2, 99.0),
        mk("a50", 0.5, 22.0, 50.0),
    ]
    assert [m.name for m in pareto(members, 10, by="fraction")] == ["dense", "a90", "a50"]


def test_more_banks_than_prompts_is_a_clear_error_before_any_work(tiny_dir):
    from cscompile.errors import UserError

    model, um = analyze(tiny_dir("llama-2l") / "model.onnx")
    eng = LayeredEngine(plan_segments(model, um), 1)
    calib = np.random.default_rng(0).integers(3, 300, 900)
    with pytest.raises(UserError, match="motif banks.*1 calibration prompts.*at least 3"):
        build_family(eng, calib, m=8, prompts=[calib[:100]], banks=3)
