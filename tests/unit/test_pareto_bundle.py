"""`cscompile build --pareto` on a tiny model: the front's points as engines with shared weights,
picked at load by latency or quality target; bad targets name the nearest feasible point."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import PINNED_ORT_COEF

from cscompile.errors import UserError
from cscompile.runtime.front import select_engine
from cscompile.search.artifact import share_weights


def _manifest(points):
    engines = [{"name": "dense", "kind": "dense", "params": {"precision": "int4"}, "profile": {}}]
    for i, (ms, ppl) in enumerate(points):
        engines.append({"name": f"pareto-{i}", "kind": "dense",
                        "params": {"search": {}, "latency_ms_pred": ms, "dense_latency_ms_pred": 10.0},
                        "profile": {"ppl_increase": ppl}})  # fmt: skip
    return {"engines": engines}


def test_select_engine_by_latency_or_quality():
    m = _manifest([(9.0, 0.02), (8.0, 0.05), (6.0, 0.30)])
    assert select_engine(m, 9.5, None) == "pareto-0"  # best quality within 9.5 ms
    assert select_engine(m, 10.0, None) == "dense"
    assert select_engine(m, 7.0, None) == "pareto-2"
    assert select_engine(m, None, 0.04) == "pareto-0"  # fastest within +4%
    assert select_engine(m, None, 0.5) == "pareto-2"
    assert select_engine(m, 8.5, 0.06) == "pareto-1"
    with pytest.raises(UserError, match=r"none meets ≤ 5 ms/token.*nearest feasible point: pareto-2 at 6.00"):
        select_engine(m, 5.0, None)
    with pytest.raises(UserError, match="nearest feasible point: pareto-1"):
        select_engine(m, 7.0, 0.06)
    bad = _manifest([(9.0, 0.02)])
    bad["engines"][1]["params"]["latency_ms_pred"] = "fast"
    with pytest.raises(UserError, match="malformed engine entry"):
        select_engine(bad, 5.0, None)
    bad["engines"][1]["params"]["latency_ms_pred"] = float("nan")
    with pytest.raises(UserError, match="non-finite"):
        select_engine(bad, 5.0, None)
    with pytest.raises(UserError, match="without a Pareto front"):
        select_engine({"engines": _manifest([])["engines"]}, 5.0, None)


def test_select_engine_counts_the_native_point():
    m = _manifest([(9.0, 0.02), (8.0, 0.05), (6.0, 0.30)])
    m["engines"].append({"name": "native", "kind": "native", "params": {}, "profile": {}})
    section = {"native": {"engine": "native", "latency_ms_pred": 4.5, "ppl_increase": -0.003}}
    assert select_engine(m, 9.5, None, section) == "native"  # best quality within the SLO
    assert select_engine(m, None, 0.0, section) == "native"  # fastest within +0%
    assert select_engine(m, 5.0, None, section) == "native"  # no longer "none meets"
    assert select_engine(m, 9.5, None) == "pareto-0"  # without the section: as before
    # a section naming a native engine the bundle does not have is ignored; a malformed one refused
    assert select_engine(_manifest([(9.0, 0.02)]), 9.5, None, section) == "pareto-0"
    section["native"]["latency_ms_pred"] = "fast"
    with pytest.raises(UserError, match="malformed native point"):
        select_engine(m, 9.5, None, section)
    section["native"]["latency_ms_pred"] = float("nan")
    with pytest.raises(UserError, match="non-finite"):
        select_engine(m, 9.5, None, section)


def test_share_weights_deduplicates_and_keeps_numbers(tiny_dir, tmp_path):
    from cscompile.decode.session import DecoderSession
    from cscompile.search.joint import OPTIONS, Config, assemble

    d = tiny_dir("llama-4l")
    a = Config((OPTIONS[0],) * 4)
    b = Config((OPTIONS[0], OPTIONS[0], OPTIONS[6], OPTIONS[1]))
    assemble(d, a, tmp_path / "a", None)
    assemble(d, b, tmp_path / "b", None)
    paths = {"a": tmp_path / "a" / "model.onnx", "b": tmp_path / "b" / "model.onnx"}
    before = {k: DecoderSession(p, threads=1).forward(np.array([[5, 9, 30, 7]]), DecoderSession(p, threads=1).new_state())
              for k, p in paths.items()}  # fmt: skip
    inline = sum(p.stat().st_size for p in paths.values())
    shared = share_weights(paths, tmp_path / "shared")
    size = (tmp_path / "shared" / "pareto.bin").stat().st_size
    assert size < 0.75 * inline  # layer 0, 1 and the embedding are stored once
    for k, p in shared.items():
        s = DecoderSession(p, threads=1)
        np.testing.assert_array_equal(s.forward(np.array([[5, 9, 30, 7]]), s.new_state()), before[k])


def test_build_pareto_bundle_runs_a_chosen_point(tiny_dir, small_calib, tmp_path):
    """Without the native engine: the ONNX Runtime depth × precision front."""
    from cscompile.bundle import verify_bundle
    from cscompile.compiler.build import build_bundle
    from cscompile.runtime import GenerationConfig, load
    from cscompile.search.joint import Config, LatencyTable

    table = tmp_path / "table.json"
    coef = PINNED_ORT_COEF
    table.write_text(json.dumps({"coef_ms": coef}))
    out = tmp_path / "p.csb"
    res = build_bundle(
        tiny_dir("llama-4l"),
        out,
        precision="int4",
        pareto=True,
        native="off",
        latency_table=table,
        calib=small_calib,
    )
    names = [e["name"] for e in res.manifest["engines"]]
    assert names[0] == "dense" and any(n.startswith("pareto-") for n in names)
    assert "engines/pareto.bin" in res.manifest["files"]
    verify_bundle(out)
    points = [e for e in res.manifest["engines"] if e["name"].startswith("pareto-")]
    pinned = LatencyTable(coef, [])
    for e in points:  # the stored predictions are the pinned table's (dense: 1.0 + 4 × (0.2 + 0.3))
        assert e["params"]["dense_latency_ms_pred"] == pytest.approx(3.0)
        want = pinned.predict(Config.from_dict(e["params"]["search"]))
        assert e["params"]["latency_ms_pred"] == pytest.approx(want, rel=1e-4), e["name"]
        assert np.isfinite(e["profile"]["ppl_increase"])
    fastest = min(points, key=lambda e: e["params"]["latency_ms_pred"])
    with load(out, threads=1, slo_ms_per_token=fastest["params"]["latency_ms_pred"] + 1e-6) as bm:
        assert bm.engine.name == select_engine(
            res.manifest, fastest["params"]["latency_ms_pred"] + 1e-6, None
        )
        ids = bm.generate("hello", GenerationConfig(max_new_tokens=4, stop_at_eos=False)).token_ids
        assert len(ids) == 4
    with pytest.raises(UserError, match="nearest feasible point"):
        load(out, threads=1, slo_ms_per_token=1e-6)
    from cscompile.bundle import BundleError

    with pytest.raises(BundleError, match="no motif engines"):  # no switching points here
        load(out, threads=1, engine="motifs")


#: a pinned native latency table (ms per token per term; near one measured on the tiny model, with
#: 4-bit cheaper than 8-bit, a 4-bit LM head that pays and a small base, so that 4-bit-head points
#: and a switching point ship): which points ship, and which one a latency target picks, must not
#: depend on how busy the machine is
NATIVE_COEF = {"base": 0.005, "attn@8": 0.004, "attn@4": 0.003, "qhead@8": 0.001, "qhead@4": 0.0007,
               "ffn@8": 0.003, "ffn@4": 0.002, "block@8": 0.0006, "block@4": 0.0004, "lmhead@4": -0.004}  # fmt: skip


@pytest.fixture(scope="module")
def native_front(tiny_dir, small_calib, tmp_path_factory):  # type: ignore[no-untyped-def]
    from cscompile.compiler.build import build_bundle

    tmp = tmp_path_factory.mktemp("nf")
    table = tmp / "native-table.json"
    table.write_text(json.dumps({"coef_ms": NATIVE_COEF}))
    res = build_bundle(
        tiny_dir("llama-hd32-3l"),
        tmp / "n.csb",
        precision="int4",
        pareto=True,
        calib=small_calib,
        latency_table=table,
    )
    return tmp / "n.csb", res.manifest


def test_native_build_searches_the_native_front(native_front):
    """With the native engine (the default engine): its width × depth × precision front, every
    point a configuration over the one native weights file, derived at load."""
    from cscompile.bundle import open_bundle, verify_bundle
    from cscompile.native import engine as native
    from cscompile.native.points import NativeConfig
    from cscompile.runtime import GenerationConfig, load
    from cscompile.search.native_search import NativeLatencyTable

    out, manifest = native_front
    verify_bundle(out)
    points = [
        e for e in manifest["engines"] if e["name"].startswith("native-") and "switch" not in e["params"]
    ]
    assert points and all(e["kind"] == "native" and e["file"] == native.ENGINE_JSON for e in points)
    assert not any(e["name"].startswith("pareto-") for e in manifest["engines"])
    with open_bundle(out) as b:
        section = b.read_json(b.sections["pareto"])
    assert section["reference"] == "native" and len(section["ranking"]["heads"]) == 3
    # the pinned table's 4-bit head pays, so 4-bit-head points ship with the front's GPTQ head
    assert any(e["params"]["search"]["head_bits"] == 4 for e in points)
    assert "native/front.bin" in manifest["files"] and "head_q4" in section
    pinned = NativeLatencyTable(NATIVE_COEF, [])
    for e in points:  # the stored predictions are the pinned table's
        want = pinned.predict(NativeConfig.from_dict(e["params"]["search"]))
        assert e["params"]["latency_ms_pred"] == pytest.approx(want, rel=1e-4), e["name"]
        assert np.isfinite(e["profile"]["ppl_increase"])
    with load(out, threads=1) as bm:
        assert bm.engine.name == "native"  # the default stays the whole model
        whole = bm.session.weights.nbytes
    fastest = min(points, key=lambda e: e["params"]["latency_ms_pred"])
    slo = fastest["params"]["latency_ms_pred"] + 1e-6
    with load(out, threads=1, slo_ms_per_token=slo) as bm:
        assert bm.engine.name == select_engine(manifest, slo, None, section)
        w = bm.session.weights
        counts = NativeConfig.from_dict(bm.engine.params["search"]).counts()
        heads, ffn = w.width()
        assert sum(map(len, heads)) == counts["heads"] and sum(ffn) == 32 * counts["blocks"]
        assert w.nbytes < whole
        ids = bm.generate("hello", GenerationConfig(max_new_tokens=4, stop_at_eos=False)).token_ids
        assert len(ids) == 4
    with pytest.raises(UserError, match="nearest feasible point"):
        load(out, threads=1, slo_ms_per_token=1e-6)


def test_inspect_shows_the_native_front(native_front, capsys):
    from cscompile.cli.main import main

    out, manifest = native_front
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Pareto front of the native engine" in text
    for e in manifest["engines"]:
        if e["name"].startswith("native-"):
            assert e["name"] in text


def test_native_front_point_with_a_bad_ranking_is_refused(native_front, tmp_path):
    from cscompile.bundle import BundleError, open_bundle
    from cscompile.native.engine import load_weights
    from cscompile.runtime.front import load_point

    out, manifest = native_front
    point = next(e for e in manifest["engines"] if "search" in e["params"])
    with open_bundle(out) as b:
        section = b.read_json(b.sections["pareto"])
        base = load_weights(b.root, b.read_json("native/engine.json"), "t")
    from cscompile.native.engine import validate

    validate(load_point(base, point["params"], section, "t"))
    bad = json.loads(json.dumps(section))
    bad["ranking"]["heads"][0] = [0, 0, 1, 2]
    with pytest.raises(BundleError, match="permutation"):
        load_point(base, point["params"], bad, "t")
    with pytest.raises(BundleError, match="ranking"):
        load_point(base, point["params"], {}, "t")
    with pytest.raises(BundleError, match="every layer dropped"):
        load_point(base, {"search": {"layers": ["drop"] * 3}}, section, "t")
    # a point with a 4-bit LM head reads the front's GPTQ head; a tampered index is refused
    four = {"search": {**point["params"]["search"], "head_bits": 4}}
    with open_bundle(out) as b:  # the pinned table ships a GPTQ head (test above)
        w = load_point(base, four, section, "t", b.root)
        assert w.head.bits == 4 and w.head.codes.base is not None  # mapped from native/front.bin
        bad = json.loads(json.dumps(section))
        bad["head_q4"]["arrays"]["head_q4.codes"]["offset"] = 10**9
        with pytest.raises(BundleError, match="unreadable 4-bit head"):
            load_point(base, four, bad, "t", b.root)
        assert load_point(base, four, {**section, "head_q4": None}, "t", b.root).head.bits == 4  # RTN


def test_pareto_build_measures_its_latency_table(tiny_dir, small_calib, tmp_path):
    """Without a pinned table the build times probe engines and fits every term (values: the machine's)."""
    from cscompile.bundle import open_bundle
    from cscompile.compiler.build import build_bundle
    from cscompile.search.joint import LAT_TERMS

    out = tmp_path / "m.csb"
    build_bundle(tiny_dir("llama-4l"), out, precision="int4", pareto=True, native="off", calib=small_calib)
    with open_bundle(out) as b:
        coef = b.read_json(b.sections["pareto"])["latency_table"]["coef_ms"]
    assert set(coef) == set(LAT_TERMS) and all(np.isfinite(v) for v in coef.values())


def test_latency_table_needs_pareto(tiny_dir, tmp_path):
    from cscompile.compiler.build import build_bundle

    table = tmp_path / "t.json"
    table.write_text(json.dumps({"coef_ms": {}}))
    with pytest.raises(UserError, match="--latency-table"):
        build_bundle(tiny_dir("llama-4l"), tmp_path / "x.csb", latency_table=table)
    assert not (tmp_path / "x.csb").exists()


def test_bad_latency_table_is_one_line_and_writes_nothing(tiny_dir, tmp_path, capsys):
    from cscompile.cli.main import main

    table = tmp_path / "t.json"
    table.write_text("{not json")
    out = tmp_path / "x.csb"
    code = main(
        ["build", str(tiny_dir("llama-4l")), "-o", str(out), "--pareto", "--latency-table", str(table)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--latency-table" in err and not out.exists()


def test_latency_table_lacking_terms_is_one_line(tmp_path):
    from cscompile.search.artifact import _read_coef
    from cscompile.search.native_search import LAT_TERMS

    table = tmp_path / "t.json"
    table.write_text(json.dumps({"coef_ms": {"base": 0.3, "attn@4": 0.01}}))
    with pytest.raises(UserError, match=r"lacks the terms \['attn@8'"):
        _read_coef(table, LAT_TERMS)
    table.write_text(json.dumps({"latency_table": {"coef_ms": dict.fromkeys(LAT_TERMS, 0.1)}}))
    assert _read_coef(table, LAT_TERMS)["lmhead@4"] == 0.1  # a bundle's pareto.json / front.json works too


def test_native_front_switching_points(native_front):
    """Switching points (the native engine ↔ a front point per token) ship only where no static
    point is as fast and as good; a switch entry loads as the switching runtime over one cache,
    and malformed ones are refused."""
    from cscompile.bundle import BundleError, open_bundle
    from cscompile.native.engine import load_weights
    from cscompile.native.points import NativeConfig
    from cscompile.native.switch import NativeSwitchingSession
    from cscompile.runtime import GenerationConfig, load
    from cscompile.runtime.front import load_switch_point
    from cscompile.search.native_search import NativeLatencyTable

    out, manifest = native_front
    engines = manifest["engines"]
    static = [e for e in engines if "search" in e["params"]]
    switch = [e for e in engines if "switch" in e["params"]]
    dense_ms = static[0]["params"]["dense_latency_ms_pred"]
    by_name = {e["name"]: e for e in static}
    pinned = NativeLatencyTable(NATIVE_COEF, [])
    assert switch  # the pinned table ships one (the checks below are not vacuous)
    for e in switch:
        ms, q, share = e["params"]["latency_ms_pred"], e["profile"]["ppl_increase"], e["params"]["share_pred"]
        first, point = e["params"]["switch"]["motifs"]
        assert first == "native" and 0 < share <= 1
        # predicted from the share of steps each motif runs (share_pred is stored to 4 digits)
        motif_ms = pinned.predict_motif(NativeConfig.from_dict(by_name[point]["params"]["search"]))
        assert ms == pytest.approx((1 - share) * dense_ms + share * motif_ms, rel=1e-3), e["name"]
        assert not any(
            s["params"]["latency_ms_pred"] <= ms and s["profile"]["ppl_increase"] <= q for s in static
        )
    with open_bundle(out) as b:
        section = b.read_json(b.sections["pareto"])
        base = load_weights(b.root, b.read_json("native/engine.json"), "t")
        name = static[-1]["name"]
        ok = {"switch": {"motifs": ["native", name], "entropy_thresholds": [1e9], "hold": 0}}
        sess = load_switch_point(base, ok, section, b.engines, "t", b.root, threads=1, context_length=64)
        assert isinstance(sess, NativeSwitchingSession) and sess.names == ["native", name]
        st = sess.new_state()
        sess.forward_last(np.array([[1, 2, 3]]), st)
        for t in (4, 5, 6):
            sess.forward_last(np.array([[t]]), st)
        assert dict(st.stats.histogram) == {name: 3}  # every decode step is confident enough
        for bad, match in (
            ({"motifs": ["native"], "entropy_thresholds": []}, "malformed"),
            ({"motifs": ["native", name], "entropy_thresholds": [1.0, 2.0]}, "malformed"),
            ({"motifs": ["native", name, name], "entropy_thresholds": [2.0, 1.0]}, "malformed"),
            ({"motifs": ["native", name], "entropy_thresholds": [float("nan")]}, "malformed"),
            ({"motifs": ["native", name], "entropy_thresholds": [1.0], "hold": -1}, "malformed"),
            ({"motifs": ["native", "engines/../x"], "entropy_thresholds": [1.0]}, "names the motif"),
        ):
            with pytest.raises(BundleError, match=match):
                load_switch_point(base, {"switch": bad}, section, b.engines, "t", b.root)
    with load(out, threads=1, engine="motifs") as bm:
        assert bm.engine.name == switch[0]["name"]
        assert isinstance(bm.session, NativeSwitchingSession)
        ids = bm.generate("hello", GenerationConfig(max_new_tokens=4, stop_at_eos=False)).token_ids
        assert len(ids) == 4
