"""The correctness gate on motif engines (cscompile.compiler.gate_units): each motif engine against the
source with the FFN channels it did not run zeroed. Honest builds record every motif engine; a motif
engine whose weights were altered after building is caught and the family dropped with one warning
line; `verify` and `inspect` read the records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import PINNED_ORT_COEF

from cscompile.cli.main import EXIT_OK, EXIT_USER, main
from cscompile.compiler import gate as gate_mod
from cscompile.compiler.build import build_bundle
from cscompile.compiler.gate_units import MaskedReference, masked_source

MODEL = "llama-2l"  # randomised norms; --motifs lowers it (SwiGLU)


def _run(argv, capsys):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _build(tiny_dir, small_calib, out, **kw):
    return build_bundle(
        tiny_dir(MODEL),
        out,
        precision="fp32",
        motifs=True,
        motif_m=16,
        max_engines=3,
        calib=small_calib,
        **kw,
    )


@pytest.fixture(scope="module")
def honest(tiny_dir, small_calib, tmp_path_factory):
    return _build(tiny_dir, small_calib, tmp_path_factory.mktemp("gm") / "honest")


def test_every_motif_engine_has_a_passing_record(honest):
    motifs = [e for e in honest.manifest["engines"] if e["kind"] == "motif"]
    assert len(motifs) >= 2 and not honest.warnings
    rec = honest.build["gate"]["engines"]
    for e in motifs:
        m = rec[e["name"]]
        assert m["max_rel"] <= gate_mod.FP32_REL and m["tolerance"] == {"max_rel": gate_mod.FP32_REL}
        assert "dropped" not in m
    sparse = [e["name"] for e in motifs if e["params"]["ffn_fraction"] < 1.0]
    assert sparse and all(rec[n]["reference"].startswith("source with the FFN channels") for n in sparse)
    assert rec["motif-dense"]["reference"] == "source"


def test_the_masked_reference_is_the_source_with_channels_removed(tiny_dir, tmp_path):
    """All-ones masks: the source's logits exactly; a zeroed channel set: the source with those
    FFN channels removed, which moves the logits (the reference is not the unmasked source)."""
    from cscompile.passes.pipeline import analyze

    src = tiny_dir(MODEL) / "model.onnx"
    _, um = analyze(src)
    acts, contexts = [la.mlp_act for la in um.layers], [la.attn_context for la in um.layers]
    width = um.layers[0].mlp.intermediate_size
    path = masked_source(src, acts, contexts, tmp_path / "ref" / "model.onnx")
    ref = MaskedReference(path, [width] * len(acts))
    ids = (np.arange(24) * 7 % 90 + 3).astype(np.int64)
    full = ref.forward(ids, ref.new_state(), [None] * len(acts))
    from cscompile.decode.session import DecoderSession

    sess = DecoderSession(src)
    source = sess.forward(ids[None], sess.new_state())[0]
    assert np.allclose(full, source, rtol=0, atol=1e-5), np.abs(full - source).max()
    half = ref.forward(ids, ref.new_state(), [np.arange(width // 2)] * len(acts))
    assert np.abs(half - source).max() > 100 * gate_mod.FP32_REL * np.abs(source).max()


def _alter(monkeypatch, what):
    """Alter the motif part's bytes after it was built: the norm weight inside the last layer's
    segment graph (``norm``; the analysis folded the models' norm weights into the projections, the
    segment's RMSNorms scale by this one) or that layer's FFN down rows (``ffn``)."""
    import onnx
    from onnx import numpy_helper

    import cscompile.motifs.artifact as artifact

    real = artifact.motif_part

    def altered(*args, **kwargs):
        part = real(*args, **kwargs)
        meta = json.loads(part.files["motifs/engine.json"])
        if what == "norm":
            rel = "motifs/" + meta["segments"][-2]["file"]
            seg = onnx.load_from_string(part.files[rel])
            t = next(t for t in seg.graph.initializer if "norm" in t.name)
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.5), t.name))
            part.files[rel] = seg.SerializeToString()
            return part
        entry = meta["ffn"][sorted(meta["ffn"])[-1]]
        data = bytearray(part.files["motifs/ffn.bin"])
        n = int(np.prod(entry["shape"]))
        view = np.frombuffer(data, np.float32, n, entry["offset"]).reshape(entry["shape"]).copy()
        view[:, 2, :] *= np.float32(1.25)
        data[entry["offset"] : entry["offset"] + view.nbytes] = view.tobytes()
        part.files["motifs/ffn.bin"] = bytes(data)
        return part

    monkeypatch.setattr(artifact, "motif_part", altered)


@pytest.mark.parametrize("what", ["norm", "ffn"])
def test_an_altered_motif_engine_is_dropped_with_one_line(
    tiny_dir, small_calib, tmp_path, monkeypatch, capsys, what
):
    _alter(monkeypatch, what)
    res = _build(tiny_dir, small_calib, tmp_path / "b")
    assert res.engines == ("dense",)  # the whole family, never part of it
    lines = [w for w in res.warnings if "motif" in w]
    assert len(lines) == 1 and lines[0].startswith("motif engines dropped: motif-")
    assert "max |Δlogit|" in lines[0] and "tolerance 0.0001" in lines[0]
    rec = res.build["gate"]["engines"]
    assert all(v.get("dropped") for k, v in rec.items() if k.startswith("motif-"))
    assert not any(rel.startswith("motifs/") for rel in res.manifest["files"])
    code, _, err = _run(["verify", res.path], capsys)
    assert code == EXIT_OK, err
    code, out, _ = _run(["inspect", res.path], capsys)
    assert code == EXIT_OK and "motif-dense: max |Δlogit|" in out and "— dropped" in out


def test_verify_and_inspect_read_the_motif_records(honest, tmp_path, capsys):
    from tests.unit.test_gate import _rewrite

    code, out, err = _run(["verify", honest.path], capsys)
    assert code == EXIT_OK and "warning" not in err
    code, out, _ = _run(["inspect", honest.path], capsys)
    assert code == EXIT_OK and "motif-dense: max |Δlogit|" in out and "reference: source with the FFN" in out
    name = next(
        e["name"] for e in honest.manifest["engines"] if e["kind"] == "motif" and e["name"] != "motif-dense"
    )
    _rewrite(honest.path, tmp_path / "norec", lambda b: b["gate"]["engines"].pop(name))
    code, _, err = _run(["verify", tmp_path / "norec"], capsys)
    assert code == EXIT_USER and f"engine '{name}'" in err and "no gate measurement" in err
    _rewrite(honest.path, tmp_path / "bad", lambda b: b["gate"]["engines"][name].update(max_rel=0.01))
    code, _, err = _run(["verify", tmp_path / "bad"], capsys)
    assert code == EXIT_USER and "recorded gate errors fail" in err


class _Stages:
    def __init__(self):
        self.started = []

    def start(self, stage):
        self.started.append(stage)

    def done(self, stage):
        return None

    def say(self, stage, message):
        return None


def test_a_model_the_motifs_cannot_lower_is_refused_right_after_the_analysis(tiny_dir, tmp_path):
    from cscompile.errors import UserError

    stages = _Stages()
    with pytest.raises(UserError, match="motif lowering") as err:
        build_bundle(tiny_dir("gpt2-2l"), tmp_path / "b", precision="fp32", motifs=True, progress=stages)
    assert "architecture 'gpt2'" in str(err.value) and "without --motifs" in str(err.value)
    assert stages.started == ["check", "analyze"]  # no native engine, dense engine or calibration
    assert not (tmp_path / "b").exists()


def test_the_peers_default_bundle_is_built_once_without_motifs_when_they_cannot_lower(
    tiny_dir, tmp_path, monkeypatch
):
    import cscompile.compiler.build as build_mod
    from cscompile.evaluation import peers

    calls = []
    monkeypatch.setattr(build_mod, "build_bundle", lambda model, out, **kw: calls.append(kw))

    class Art:
        directory = tiny_dir("gpt2-2l")

    log = []
    peers.default_bundle(Art(), tmp_path, log.append)
    assert len(calls) == 1 and calls[0]["motifs"] is False
    assert calls[0]["analysis"][1].architecture == "gpt2"  # the build reuses the analysis that refused
    assert any("no motif family for this model (architecture 'gpt2')" in line for line in log)
    calls.clear()
    Art.directory = tiny_dir(MODEL)
    peers.default_bundle(Art(), tmp_path / "llama", log.append)
    assert len(calls) == 1 and calls[0]["motifs"] is True


def _front(tiny_dir, small_calib, out):
    table = out.parent / f"{out.name}-table.json"
    table.write_text(json.dumps({"coef_ms": PINNED_ORT_COEF}))
    return build_bundle(tiny_dir("llama-4l"), out, precision="int4", pareto=True, native="off",
                        latency_table=table, calib=small_calib)  # fmt: skip


def test_ort_pareto_points_have_records_and_a_wrong_depth_is_dropped(
    tiny_dir, small_calib, tmp_path, monkeypatch, capsys
):
    import cscompile.search.artifact as artifact

    honest = _front(tiny_dir, small_calib, tmp_path / "honest")
    rec = honest.build["gate"]["engines"]
    points = [e for e in honest.manifest["engines"] if e["name"].startswith("pareto-")]
    dropping = [e["name"] for e in points if "drop" in e["params"]["search"]["layers"]]
    assert dropping and not any("dropped" in w for w in honest.warnings)
    for e in points:  # each within the quantized bounds against its own reference, and the dense engine's
        m = rec[e["name"]]
        assert m["reference"].startswith("source with the point's dropped layers") and "dropped" not in m
        assert m["mean_kl"] <= gate_mod.NATIVE_RATIO * rec["dense"]["mean_kl"] + gate_mod.NATIVE_SLACK
    code, _, err = _run(["verify", honest.path], capsys)
    assert code == EXIT_OK and "warning" not in err

    real = artifact.pareto_part

    def lying(*args, **kwargs):  # a point that says it dropped other layers than its graph did
        part = real(*args, **kwargs)
        for e in part.engines:
            layers = e["params"]["search"]["layers"]
            if "drop" in layers:
                kept = next(i for i, o in enumerate(layers) if o != "drop")
                gone = layers.index("drop")
                layers[kept], layers[gone] = layers[gone], layers[kept]
                break
        return part

    monkeypatch.setattr(artifact, "pareto_part", lying)
    res = _front(tiny_dir, small_calib, tmp_path / "lying")
    lines = [w for w in res.warnings if w.startswith("pareto point")]
    assert len(lines) == 1 and "disagrees with its reference" in lines[0] and "mean KL" in lines[0], (
        res.warnings
    )
    name = lines[0].split()[2]
    assert name not in res.engines and f"engines/{name}.onnx" not in res.manifest["files"]
    assert res.build["gate"]["engines"][name]["dropped"] is True
    code, _, err = _run(["verify", res.path], capsys)
    assert code == EXIT_OK, err
    from cscompile.bundle import open_bundle

    with open_bundle(res.path) as b:
        section = b.read_json(b.sections["pareto"])
    assert name not in [p["engine"] for p in section["points"]]
