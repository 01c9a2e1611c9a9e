"""The correctness gate (cscompile.compiler.gate): honest builds pass and record their errors; engines
that compute something else than the source (a zeroed norm, a wrong RoPE base, a fusion that breaks
attention) fail the build or are dropped with a one-line warning; `verify` and `inspect` read the record."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cscompile.bundle import open_bundle, write_bundle
from cscompile.cli.main import EXIT_OK, EXIT_USER, main
from cscompile.compiler import gate as gate_mod
from cscompile.compiler.build import build_bundle
from cscompile.errors import UserError
from cscompile.passes import precision as quantize_mod

FP32_MODEL, INT4_MODEL = "llama-2l", "llama-q-2l"  # llama-q-2l: head_dim 16, its attention fuses


def _run(argv, capsys):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def honest(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    return {
        p: build_bundle(tiny_dir(m), root / f"{p}-bundle", precision=p)
        for p, m in (("fp32", FP32_MODEL), ("int4", INT4_MODEL))
    }


def _zero_first_norm(onnx_path, scale=0.0):
    """Scale (default: zero) the first layer's input RMSNorm weight in an engine file, in place."""
    model = onnx.load(str(onnx_path))
    norm = next(i for i in model.graph.initializer if "norm" in i.name and "layers.0" in i.name)
    norm.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(norm) * np.float32(scale), norm.name))
    onnx.save(model, str(onnx_path))
    return norm.name


def test_honest_builds_pass_and_record_their_errors(honest):
    fp32, int4 = honest["fp32"].build["gate"], honest["int4"].build["gate"]
    assert fp32["steps"] >= 16 and fp32["sequences"] >= 2
    assert set(fp32["engines"]) == {"dense"} and set(int4["engines"]) == {"dense", "native"}
    assert fp32["engines"]["dense"]["max_rel"] <= gate_mod.FP32_REL
    for name in ("dense", "native"):
        m = int4["engines"][name]
        assert m["mean_kl"] <= gate_mod.QUANT_KL and m["top1"] >= gate_mod.QUANT_TOP1 and "dropped" not in m
        assert m["max_abs"] > 0  # quantized: measured, not trivially equal
    assert honest["int4"].engines == ("dense", "native") and not any(
        "dropped" in w for w in honest["int4"].warnings
    )


def test_measure_against_numpy():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(5, 11)) * 3
    e = s + rng.normal(size=s.shape) * 0.1
    m = gate_mod.measure([s], [e])
    ps, pe = np.exp(s) / np.exp(s).sum(1, keepdims=True), np.exp(e) / np.exp(e).sum(1, keepdims=True)
    np.testing.assert_allclose(m.mean_kl, np.mean((ps * np.log(ps / pe)).sum(1)), rtol=1e-9)
    assert m.max_abs == pytest.approx(np.abs(e - s).max()) and m.max_rel == pytest.approx(
        m.max_abs / np.abs(s).max()
    )
    assert gate_mod.verdict(m, "fp32") is not None  # 0.1 noise is far beyond fp32 rounding
    assert gate_mod.verdict(gate_mod.measure([s], [s + 1e-7]), "fp32") is None


def test_a_broken_fp32_dense_engine_fails_the_build(tiny_dir, tmp_path, monkeypatch):
    original = quantize_mod.quantize_model
    broken: list[str] = []

    def quantize_then_break(model, out_dir, *a, **kw):
        report = original(model, out_dir, *a, **kw)
        broken.append(_zero_first_norm(out_dir / "model.onnx"))
        return report

    monkeypatch.setattr(quantize_mod, "quantize_model", quantize_then_break)
    out = tmp_path / "b.csb"
    with pytest.raises(UserError) as info:
        build_bundle(tiny_dir(FP32_MODEL), out, precision="fp32")
    msg = str(info.value)
    assert broken and "dense fp32 engine" in msg and "disagrees with the source" in msg
    assert "tolerance 0.0001" in msg and "position" in msg
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, work dir removed


def test_a_fusion_that_breaks_attention_is_dropped_not_shipped(tiny_dir, tmp_path, monkeypatch):
    """The fused engine disagrees (a stand-in for a fusion that drops a QK-norm): the build rebuilds
    the dense engine unfused, which passes, and says so in one line."""
    original = quantize_mod.quantize_model
    calls: list[str] = []

    def fused_is_broken(model, out_dir, *a, fuse_attention="auto", **kw):
        report = original(model, out_dir, *a, fuse_attention=fuse_attention, **kw)
        calls.append(fuse_attention)
        if fuse_attention == "auto":  # 20x: a zeroed layer-0 norm stays within int4's loose bound here
            _zero_first_norm(out_dir / "model.onnx", scale=20.0)
        return report

    monkeypatch.setattr(quantize_mod, "quantize_model", fused_is_broken)
    res = build_bundle(tiny_dir(INT4_MODEL), tmp_path / "b", precision="int4", native="off")
    assert calls == ["auto", "off"]
    drops = [w for w in res.warnings if w.startswith("attention fusion dropped")]
    assert len(drops) == 1 and "\n" not in drops[0] and "mean KL" in drops[0]
    dense = next(e for e in res.manifest["engines"] if e["name"] == "dense")
    assert dense["params"]["attention"] == "plain"
    with open_bundle(res.path) as b:
        meta = onnx.load(str(b.path_of("engines/dense.onnx")), load_external_data=False)
    assert "GroupQueryAttention" not in {n.op_type for n in meta.graph.node}
    assert res.build["gate"]["engines"]["dense"]["mean_kl"] <= gate_mod.QUANT_KL


def test_a_native_engine_with_the_wrong_rope_is_dropped_with_one_line(tiny_dir, tmp_path, monkeypatch):
    """Like Llama-3's RoPE scaling read from a key transformers 5 no longer writes: a wrong RoPE base."""
    from cscompile.native import engine as native

    original = native.weights_from_model

    def wrong_rope(*a, **kw):
        w = original(*a, **kw)
        return dataclasses.replace(w, config={**w.config, "rope_theta": w.config["rope_theta"] / 100})

    monkeypatch.setattr(native, "weights_from_model", wrong_rope)
    res = build_bundle(tiny_dir(INT4_MODEL), tmp_path / "b", precision="int4")
    assert res.engines == ("dense",)
    drops = [w for w in res.warnings if w.startswith("native engine dropped")]
    assert len(drops) == 1 and "\n" not in drops[0]
    assert res.build["gate"]["engines"]["native"]["dropped"] is True
    assert "native/engine.json" not in res.manifest["files"]


def test_a_native_engine_with_a_zeroed_norm_is_dropped(tiny_dir, tmp_path, monkeypatch):
    from cscompile.native import engine as native

    original = native.weights_from_model

    def zero_norm(*a, **kw):
        w = original(*a, **kw)
        norm = w.attn_norm.copy()
        norm[0] = 0
        return dataclasses.replace(w, attn_norm=norm)

    monkeypatch.setattr(native, "weights_from_model", zero_norm)
    res = build_bundle(tiny_dir(INT4_MODEL), tmp_path / "b", precision="int4")
    assert res.engines == ("dense",) and any(w.startswith("native engine dropped") for w in res.warnings)


def _rewrite(src, out, edit):
    """A copy of bundle directory ``src`` at ``out`` with its build.json passed through ``edit``."""
    with open_bundle(src) as b:
        m = b.manifest
        files = {rel: b.path_of(rel).read_bytes() for rel in m["files"]}
        build = json.loads(files["build.json"])
        edit(build)
        files["build.json"] = (json.dumps(build, indent=2, sort_keys=True) + "\n").encode()
        return write_bundle(out, files=files, engines=[dict(e) for e in m["engines"]], source=m["source"],
                            requires=m["requires"], tokenizer=m["tokenizer"], sections=m["sections"])  # fmt: skip


def test_verify_checks_the_record(honest, tmp_path, capsys):
    code, out, err = _run(["verify", honest["int4"].path], capsys)
    assert code == EXIT_OK and " OK: " in out and "warning" not in err
    # a bundle from before the gate: a warning line, not a failure
    _rewrite(honest["int4"].path, tmp_path / "old", lambda b: b.pop("gate"))
    code, out, err = _run(["verify", tmp_path / "old"], capsys)
    assert code == EXIT_OK and err.strip().startswith("warning: ") and "no correctness-gate record" in err
    # a shipped engine the record says was dropped, or one without a measurement: a failure
    _rewrite(
        honest["int4"].path,
        tmp_path / "dropped",
        lambda b: b["gate"]["engines"]["native"].update(dropped=True),
    )
    code, _, err = _run(["verify", tmp_path / "dropped"], capsys)
    assert code == EXIT_USER and "engine 'native'" in err and "the gate dropped it" in err
    _rewrite(honest["int4"].path, tmp_path / "nodense", lambda b: b["gate"]["engines"].pop("dense"))
    code, _, err = _run(["verify", tmp_path / "nodense"], capsys)
    assert code == EXIT_USER and "engine 'dense'" in err and "no gate measurement" in err
    # recorded errors beyond the recorded precision's tolerance
    _rewrite(
        honest["fp32"].path, tmp_path / "bad", lambda b: b["gate"]["engines"]["dense"].update(max_rel=0.5)
    )
    code, _, err = _run(["verify", tmp_path / "bad"], capsys)
    assert code == EXIT_USER and "recorded gate errors fail" in err


def test_inspect_shows_the_record(honest, tmp_path, capsys):
    code, out, _ = _run(["inspect", honest["int4"].path], capsys)
    dense = honest["int4"].build["gate"]["engines"]["dense"]
    assert code == EXIT_OK and "correctness gate: 2 sequences" in out
    assert f"dense: max |Δlogit| {dense['max_abs']:.3g}" in out and "native: max |Δlogit|" in out
    code, out, _ = _run(["inspect", honest["int4"].path, "--json"], capsys)
    assert json.loads(out)["build"]["gate"] == honest["int4"].build["gate"]
    shutil.rmtree(tmp_path, ignore_errors=True)
