"""``cscompile build``: bundles from tiny models, determinism, atomicity, bad input, and the bundle CLI."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from cscompile.bundle import content_hash, open_bundle, verify_bundle
from cscompile.bundle.parts import BundlePart
from cscompile.cache import sha256_file
from cscompile.cli.main import EXIT_INTERRUPTED, EXIT_OK, EXIT_USER, main
from cscompile.compiler.build import build_bundle
from cscompile.errors import UserError
from cscompile.passes.precision import precision_plan

# llama-2l has K=48 projections (not a multiple of the 32-wide quantization block): its int4
# build is refused with a one-line error; int4 bundles are built from llama-q-2l (K=64, 128).
FP32_MODEL, INT4_MODEL = "llama-2l", "llama-q-2l"


def _run(argv, capsys):
    capsys.readouterr()  # drop what fixtures printed (tiny model builds)
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.fixture(scope="module")
def bundles(tiny_dir, tmp_path_factory):
    """fp32 and int4 bundles, each as a directory and as a .csb archive (built once)."""
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for precision, name in (("fp32", FP32_MODEL), ("int4", INT4_MODEL)):
        for form in ("dir", "csb"):
            path = root / (f"{precision}.csb" if form == "csb" else f"{precision}-bundle")
            out[precision, form] = build_bundle(tiny_dir(name), path, precision=precision)
    return out


@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("form", ["dir", "csb"])
def test_bundle_contents(bundles, tiny_dir, precision, form):
    res = bundles[precision, form]
    assert res.archive == (form == "csb") and res.path.exists()
    with open_bundle(res.path) as b:
        assert b.content_hash == res.content_hash
        assert {"engines/dense.onnx", "unit_map.json", "build.json", "config.json"} <= set(b.files)
        assert "tokenizer/tokenizer.json" in b.files and b.manifest["tokenizer"] == "tokenizer/"
        engines = [(e.name, e.kind, e.file) for e in b.engines]
        # int4 builds of Llama decoders also get the native engine (no source grid here: RTN Q4_1)
        assert engines == [("dense", "dense", "engines/dense.onnx")] + (
            [("native", "native", "native/engine.json")] if precision == "int4" else []
        )
        assert b.engines[0].params["precision"] == precision
        assert b.manifest["requires"]["target"] == "cpu"
        assert b.manifest["requires"]["opsets"][""] >= 17
        src = tiny_dir(FP32_MODEL if precision == "fp32" else INT4_MODEL) / "model.onnx"
        assert b.manifest["source"]["sha256"] == sha256_file(src)
        build = b.read_json("build.json")
        assert build["precision"] == precision and build["seed"] == 0 and build["block_size"] == 1
        assert "/" not in b.read_bytes("build.json").decode()  # no paths, absolute or not
        assert len(b.read_json("unit_map.json")["layers"]) == 2
        if precision == "int4":
            assert b.manifest["requires"]["opsets"]["com.microsoft"] >= 1
            assert build["quantize"]["projections"].get("int4-rtn", 0) > 0
            assert b.engines[1].params["weights"] == "RTN Q4_1, Q8_0 head"


def test_load_generates_like_load_text_model(bundles, tiny_dir, tmp_path):
    from cscompile.passes.precision import quantize_model
    from cscompile.runtime import GenerationConfig, load, load_text_model

    cfg = GenerationConfig(max_new_tokens=16, stop_at_eos=False)
    prompt = "The quick brown fox"
    # fp32: the engine is the source model, canonicalized; greedy output is the source model's
    want = load_text_model(tiny_dir(FP32_MODEL), threads=1).generate(prompt, cfg)
    for form in ("dir", "csb"):
        with load(bundles["fp32", form].path, threads=1) as bm:
            got = bm.generate(prompt, cfg)
            assert got.token_ids == want.token_ids and got.text == want.text
    # int4: the same engine, written through quantize_model, loaded by load_text_model
    ref_dir = tmp_path / "q"
    quantize_model(tiny_dir(INT4_MODEL), ref_dir, precision_plan("int4"))
    ref = load_text_model(ref_dir, threads=1)
    import onnx_ir as ir

    split = tmp_path / "split"  # the bundle keeps the engine's weights beside it (engines/dense.bin)
    split.mkdir()
    ir.save(ir.load(str(ref_dir / "model.onnx")), str(split / "dense.onnx"), external_data="dense.bin")
    for form in ("dir", "csb"):
        with load(bundles["int4", form].path, threads=1, engine="dense") as bm:
            assert sha256_file(split / "dense.onnx") == bm.manifest["files"]["engines/dense.onnx"]["sha256"]
            assert sha256_file(split / "dense.bin") == bm.manifest["files"]["engines/dense.bin"]["sha256"]
            for chat in (False, True):
                assert (
                    bm.generate(prompt, cfg, chat=chat).token_ids
                    == ref.generate(prompt, cfg, chat=chat).token_ids
                )
            assert "".join(ev.text for ev in bm.stream(prompt, cfg)) == ref.generate(prompt, cfg).text


def test_archive_extraction_is_removed_on_close(bundles):
    from cscompile.runtime import load

    bm = load(bundles["int4", "csb"].path, threads=1)
    root = bm.bundle.root
    assert root.is_dir() and bm.context_length == 256 and not bm.closed
    assert bm.build_info["precision"] == "int4" and [e.name for e in bm.engines] == ["dense", "native"]
    bm.close()
    assert not root.exists() and bm.closed
    with pytest.raises(ValueError, match="closed"):
        bm.generate("hi")


def test_bundle_runs_after_copy_and_delete(bundles, tmp_path, capsys):
    from cscompile.runtime import GenerationConfig, load

    cfg = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    for form in ("dir", "csb"):
        built = bundles["int4", form].path
        copy = shutil.copytree if form == "dir" else shutil.copy2
        original = tmp_path / "original" / form / built.name
        original.parent.mkdir(parents=True)
        copy(built, original)
        with load(original, threads=1) as bm:
            want = bm.generate("hello", cfg).token_ids
        moved = (
            tmp_path / "elsewhere" / form / "renamed.csb" if form == "csb" else tmp_path / "elsewhere" / "b"
        )
        moved.parent.mkdir(parents=True, exist_ok=True)
        copy(original, moved)
        shutil.rmtree(original.parent)
        with load(moved, threads=1) as bm:
            assert bm.generate("hello", cfg).token_ids == want
            assert bm.content_hash == bundles["int4", form].content_hash
        code, out, _ = _run(["run", moved, "hello", "-n", "8", "--raw", "--threads", "1", "--stats"], capsys)
        assert code == EXIT_OK and "prompt" in out and "tok/s" in out and "engine: native (native)" in out


def test_build_is_deterministic(tiny_dir, tmp_path, bundles):
    for precision, name in (("fp32", FP32_MODEL), ("int4", INT4_MODEL)):
        a = build_bundle(tiny_dir(name), tmp_path / f"a-{precision}.csb", precision=precision)
        b = build_bundle(tiny_dir(name), tmp_path / f"b-{precision}", precision=precision)
        assert a.content_hash == b.content_hash == bundles[precision, "dir"].content_hash
        assert content_hash(a.path) == a.content_hash
        assert (tmp_path / f"a-{precision}.csb").read_bytes() == bundles[precision, "csb"].path.read_bytes()
    # a different seed is a different build (recorded in build.json)
    c = build_bundle(tiny_dir(FP32_MODEL), tmp_path / "c", precision="fp32", seed=1)
    assert c.content_hash != bundles["fp32", "dir"].content_hash


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("name", ["out.csb", "out-dir"])
def test_failed_build_leaves_nothing(tiny_dir, tmp_path, monkeypatch, exc, name):
    from cscompile.passes import precision as quantize_mod

    real = quantize_mod.quantize_model
    seen = []

    def fail_after_quantizing(model, out_dir, *a, **kw):
        real(model, out_dir, *a, **kw)
        seen.append(out_dir)
        assert (out_dir / "model.onnx").is_file()
        raise exc

    monkeypatch.setattr(quantize_mod, "quantize_model", fail_after_quantizing)
    parent = tmp_path / "o"
    parent.mkdir()
    with pytest.raises(type(exc)):
        build_bundle(tiny_dir(FP32_MODEL), parent / name, precision="fp32")
    assert seen and not seen[0].exists()
    assert _entries(parent) == set()


@pytest.mark.parametrize("name", ["out.csb", "out-dir"])
def test_interrupt_while_packaging_leaves_nothing(tiny_dir, tmp_path, monkeypatch, name):
    from cscompile.bundle import writer

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_write_tar" if name.endswith(".csb") else "check_bundle_dir", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_bundle(tiny_dir(FP32_MODEL), tmp_path / name, precision="fp32")
    assert _entries(tmp_path) == set()


def test_failed_rebuild_keeps_the_old_bundle(bundles, tiny_dir, tmp_path, monkeypatch):
    from cscompile.passes import precision as quantize_mod

    out = tmp_path / "b.csb"
    shutil.copy2(bundles["fp32", "csb"].path, out)
    monkeypatch.setattr(
        quantize_mod, "quantize_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
    )
    with pytest.raises(KeyboardInterrupt):
        build_bundle(tiny_dir(FP32_MODEL), out, precision="fp32")
    assert _entries(tmp_path) == {"b.csb"}
    assert verify_bundle(out).content_hash == bundles["fp32", "csb"].content_hash


def test_cli_build_interrupted_exit_code(tiny_dir, tmp_path, monkeypatch, capsys):
    from cscompile.passes import precision as quantize_mod

    monkeypatch.setattr(
        quantize_mod, "quantize_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
    )
    code, _, err = _run(
        ["build", tiny_dir(FP32_MODEL), "-o", tmp_path / "x.csb", "--precision", "fp32"], capsys
    )
    assert code == EXIT_INTERRUPTED and "interrupted" in err
    assert _entries(tmp_path) == set()


def test_cli_build_prints_summary(tiny_dir, tmp_path, capsys, bundles):
    out = tmp_path / "m.csb"
    code, stdout, err = _run(["build", tiny_dir(INT4_MODEL), "-o", out], capsys)  # default precision int4
    assert code == EXIT_OK, err
    flat = "".join(stdout.split())  # the table may fold the hash across lines
    assert bundles["int4", "csb"].content_hash in flat.replace("│", "")
    assert "int4" in stdout and "dense" in stdout and "MB" in stdout
    assert "round-to-nearest" in err  # no GGUF beside a tiny model: the RTN warning
    assert out.read_bytes() == bundles["int4", "csb"].path.read_bytes()


def test_extra_parts_are_merged(tiny_dir, tmp_path):
    engine = (tiny_dir(FP32_MODEL) / "model.onnx").read_bytes()
    # an extra ORT engine of a kind the gate does not compare (as the classifier's)
    part = BundlePart(
        files={"extra/m0.onnx": engine, "extra/family.json": b'{"members": []}\n'},
        engines=[{"name": "m0", "file": "extra/m0.onnx", "kind": "dense", "params": {"k": 3}, "profile": {}}],
        sections={"family": "extra/family.json"},
    )
    res = build_bundle(tiny_dir(FP32_MODEL), tmp_path / "p", precision="fp32", extra_parts=[part])
    with open_bundle(res.path) as b:
        assert [e.name for e in b.engines] == ["dense", "m0"]
        assert b.read_json(b.sections["family"]) == {"members": []}
    # a motif engine without its family cannot be gated: refused in one line, nothing written
    motif = BundlePart(files={"motifs/m0.onnx": engine},
                       engines=[{"name": "m0", "file": "motifs/m0.onnx", "kind": "motif"}])  # fmt: skip
    with pytest.raises(UserError, match="motif engine 'm0' without its motif family") as exc:
        build_bundle(tiny_dir(FP32_MODEL), tmp_path / "m", precision="fp32", extra_parts=[motif])
    assert "\n" not in str(exc.value) and not (tmp_path / "m").exists()
    clash = BundlePart(files={"build.json": b"{}"})
    with pytest.raises(UserError, match="build part 0"):
        build_bundle(tiny_dir(FP32_MODEL), tmp_path / "q", precision="fp32", extra_parts=[clash])
    assert not (tmp_path / "q").exists()


def test_target_trt_and_block_size(tiny_dir, tmp_path, capsys):
    from cscompile.trt.engine import gpu_problem

    if gpu_problem() is None:
        pytest.skip("this machine has a GPU with TensorRT (tests/gpu builds there)")
    # no GPU: one clear line, exit 2, before any work and with nothing written
    code, _, err = _run(["build", str(tiny_dir(FP32_MODEL)), "-o", str(tmp_path / "t.csb"), "--target", "trt",
                         "--precision", "fp32"], capsys)  # fmt: skip
    assert code == EXIT_USER
    _one_line_error(err, "--target trt", "no CUDA GPU with TensorRT", "cscompile[trt]", "--target cpu here")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="--trt-precision"):
        build_bundle(
            tiny_dir(FP32_MODEL), tmp_path / "t", precision="fp32", target="trt", trt_precision="int8"
        )
    with pytest.raises(UserError, match="--trt-context"):
        build_bundle(tiny_dir(FP32_MODEL), tmp_path / "t", precision="fp32", target="trt", trt_context=4)
    with pytest.raises(UserError, match="--motif-banks"):
        build_bundle(
            tiny_dir(FP32_MODEL), tmp_path / "t", precision="fp32", target="trt", motifs=True, motif_banks=3
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    res = build_bundle(tiny_dir(FP32_MODEL), tmp_path / "b8", precision="fp32", block_size=8)
    with open_bundle(res.path) as b:
        assert (
            b.read_json("unit_map.json")["block_size"] == 8 and b.read_json("build.json")["block_size"] == 8
        )
    code, _, err = _run(["build", tiny_dir(FP32_MODEL), "-o", tmp_path / "b7", "--precision", "fp32",
                         "--block-size", "7"], capsys)  # fmt: skip
    assert code == EXIT_USER
    _one_line_error(err, "block size", "7 does not divide")
    assert not (tmp_path / "b7").exists()


def test_calib_is_recorded_by_hash(tiny_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text\n")
    res = build_bundle(tiny_dir(FP32_MODEL), tmp_path / "c", precision="fp32", calib=calib, max_engines=2)
    assert res.build["calib_sha256"] == sha256_file(calib) and res.build["max_engines"] == 2


# -- bad input: one line, exit 2, nothing written ------------------------------------------------------


def _no_kv_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)],
        "no_cache",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_bad_inputs_are_one_line_errors(tiny_dir, tmp_path, capsys):
    src = tmp_path / "src"  # a tokenizer beside the bad model files: the model is what fails
    shutil.copytree(tiny_dir(FP32_MODEL) / "tokenizer", src / "tokenizer")
    text = src / "notes.txt"
    text.write_text("hello")
    fake = src / "fake.onnx"
    fake.write_text("not a protobuf")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    shutil.copy2(tiny_dir(FP32_MODEL) / "model.onnx", no_tok / "model.onnx")
    bad_tok = tmp_path / "bad_tok"
    bad_tok.mkdir()
    (bad_tok / "tokenizer.json").write_text("{ not json")
    not_bundle_dir = tmp_path / "occupied"
    not_bundle_dir.mkdir()
    (not_bundle_dir / "keep.txt").write_text("mine")
    m = tiny_dir(FP32_MODEL)
    cases = [
        ([text], "is not an .onnx file"),
        ([fake], "could not be parsed"),
        ([_no_kv_onnx(src / "nokv.onnx")], "has no KV-cache inputs"),
        ([tmp_path / "missing"], "neither a known model name nor an existing path"),
        ([no_tok], "no tokenizer.json"),
        ([m, "--tokenizer", tmp_path / "nope"], "--tokenizer"),
        ([m, "--tokenizer", bad_tok], "could not be parsed"),
        ([m, "--calib", tmp_path / "nope.txt"], "--calib"),
        ([m, "--precision", "int4"], "--precision int4"),  # K=48: not quantizable, names the fix
        ([tiny_dir("gpt2-2l"), "--precision", "int4"], "--precision int4"),  # fused QKV
    ]
    for args, needle in cases:
        out = tmp_path / "out.csb"
        code, _, err = _run(["build", args[0], "-o", out, *args[1:]], capsys)
        assert code == EXIT_USER, (args, err)
        _one_line_error(err, needle)
        assert not out.exists()
    code, _, err = _run(["build", m, "-o", not_bundle_dir, "--precision", "fp32"], capsys)
    assert code == EXIT_USER and "not a bundle" in err
    assert _entries(not_bundle_dir) == {"keep.txt"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--precision", "int3"], "--precision"),
        (["--target", "gpu"], "--target"),
        (["--block-size", "0"], "--block-size"),
        (["--max-engines", "0"], "--max-engines"),
        (["--seed", "-1"], "--seed"),
        (["--frobnicate"], "--frobnicate"),
    ],
)
def test_bad_flags(tiny_dir, tmp_path, capsys, flags, needle):
    code, _, err = _run(["build", tiny_dir(FP32_MODEL), "-o", tmp_path / "o.csb", *flags], capsys)
    assert code == EXIT_USER and needle in err and "Traceback" not in err
    assert not (tmp_path / "o.csb").exists()


def test_build_without_output_flag(tiny_dir, capsys):
    code, _, err = _run(["build", tiny_dir(FP32_MODEL)], capsys)
    assert code == EXIT_USER and "--output" in err


# -- verify / inspect / bench --------------------------------------------------------------------------


def _flip_byte_in_member(archive: Path, member: str) -> None:
    with tarfile.open(archive) as tf:
        info = tf.getmember(member)
        offset = info.offset_data + info.size // 2
    data = bytearray(archive.read_bytes())
    data[offset] ^= 0x01
    archive.write_bytes(bytes(data))


@pytest.mark.parametrize("form", ["dir", "csb"])
def test_verify_catches_a_flipped_byte_in_every_engine(tiny_dir, tmp_path, capsys, form):
    part = BundlePart(
        files={"extra/m0.onnx": (tiny_dir(FP32_MODEL) / "model.onnx").read_bytes()},
        engines=[{"name": "m0", "file": "extra/m0.onnx", "kind": "dense"}],
    )
    good = build_bundle(
        tiny_dir(FP32_MODEL),
        tmp_path / ("g.csb" if form == "csb" else "g"),
        precision="fp32",
        extra_parts=[part],
    )
    code, out, _ = _run(["verify", good.path], capsys)
    assert code == EXIT_OK and good.content_hash[:16] in out
    engine_files = [e["file"] for e in good.manifest["engines"]]
    assert engine_files == ["engines/dense.onnx", "extra/m0.onnx"]
    for rel in engine_files:
        bad = tmp_path / f"bad-{rel.replace('/', '_')}{'.csb' if form == 'csb' else ''}"
        if form == "csb":
            shutil.copy2(good.path, bad)
            _flip_byte_in_member(bad, rel)
        else:
            shutil.copytree(good.path, bad)
            data = bytearray((bad / rel).read_bytes())
            data[len(data) // 2] ^= 0x01
            (bad / rel).write_bytes(bytes(data))
        code, _, err = _run(["verify", bad], capsys)
        assert code == EXIT_USER, err
        _one_line_error(err, rel, "sha256")
        code, _, err = _run(["run", bad, "hi", "-n", "2"], capsys)  # the runtime refuses it too
        assert code == EXIT_USER
        _one_line_error(err, rel)


def test_verify_not_a_bundle(tmp_path, capsys):
    code, _, err = _run(["verify", tmp_path], capsys)
    assert code == EXIT_USER
    _one_line_error(err, "no manifest.json")


def test_inspect_bundle_and_model(bundles, tiny_dir, capsys):
    res = bundles["int4", "csb"]
    code, out, _ = _run(["inspect", res.path], capsys)
    assert code == EXIT_OK
    assert res.content_hash in out and "engines/dense.onnx" in out and "runnable here: yes" in out
    assert "onnxruntime >= " in out and tiny_dir(INT4_MODEL).name in out
    kinds = [
        e["kind"] for e in json.loads(_run(["inspect", res.path, "--json"], capsys)[1])["manifest"]["engines"]
    ]
    batches = "the native engine batches the running sequences" in out  # how `serve` schedules it
    assert batches == ("native" in kinds) and ("one sequence per step" in out) == ("native" not in kinds)
    code, out, _ = _run(["inspect", bundles["fp32", "dir"].path], capsys)
    assert "serving (`cscompile serve`): one sequence per step" in out  # fp32: no native engine
    code, out, _ = _run(["inspect", bundles["fp32", "dir"].path, "--json"], capsys)
    doc = json.loads(out)
    assert doc["content_hash"] == bundles["fp32", "dir"].content_hash and doc["build"]["precision"] == "fp32"
    code, out, _ = _run(["inspect", tiny_dir(FP32_MODEL)], capsys)  # a model: the unit map, as before
    assert code == EXIT_OK and "head_group" in out


def test_bench_bundle_against_dense(bundles, tiny_dir, tmp_path, capsys):
    report = tmp_path / "bench.json"
    code, out, err = _run(
        ["bench", bundles["int4", "csb"].path, "--model", tiny_dir(INT4_MODEL), "--per-family", "1", "-n", "6",
         "--threads", "1", "--json", report],
        capsys,
    )  # fmt: skip
    assert code == EXIT_OK, err
    data = json.loads(report.read_text())
    assert data["results"][0]["system"] == "bundle int4.csb" and len(data["prompts"]) == 4
    assert data["results"][1]["system"] == f"dense {tiny_dir(INT4_MODEL).name}"
    assert (
        all(r["prompts"] == 4 for r in data["results"])
        and data["results"][1]["decode_speedup_vs_dense"] == 1.0
    )
    assert "decode ms/tok" in out and "greedy text identical to dense" in out
    code, out, _ = _run(["bench", bundles["fp32", "dir"].path, "--family", "math", "--per-family", "2", "-n", "4",
                         "--threads", "1"], capsys)  # fmt: skip
    assert code == EXIT_OK and "vs dense" in out


@pytest.mark.parametrize("command", ["build", "verify", "bench", "inspect", "run"])
def test_help(command, capsys):
    code, out, _ = _run([command, "--help"], capsys)
    assert code == EXIT_OK and "Usage" in out
    if command == "build":
        assert "int4" in out and "TensorRT" in out


def test_latency_budget_fails_the_build_and_writes_nothing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "slow.csb"
    rc = main(
        [
            "build",
            str(tiny_dir("llama-2l")),
            "-o",
            str(out),
            "--precision",
            "fp32",
            "--latency-budget",
            "0.000001",
        ]
    )
    err = capsys.readouterr().err
    assert rc == EXIT_USER
    assert "--latency-budget" in err and "ms/token" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir()]


def test_latency_budget_met_is_reported_not_stored(tiny_dir, tmp_path, monkeypatch):
    # the measurement pinned: the decision must not depend on how busy the machine is
    timed = []
    monkeypatch.setattr(
        "cscompile.decode.session.measure_decode_ms", lambda engine, threads=None: timed.append(engine) or 2.5
    )
    res = build_bundle(tiny_dir("llama-2l"), tmp_path / "ok", precision="fp32", latency_budget_ms=3.0)
    assert res.decode_ms == 2.5 and [p.name for p in timed] == ["model.onnx"]  # the dense engine, timed once
    plain = build_bundle(tiny_dir("llama-2l"), tmp_path / "plain", precision="fp32")
    assert plain.decode_ms is None and len(timed) == 1  # no budget, no measurement
    assert res.content_hash == plain.content_hash
    with pytest.raises(UserError, match=r"2\.50 ms/token on this machine, over the budget of 2 ms"):
        build_bundle(tiny_dir("llama-2l"), tmp_path / "over", precision="fp32", latency_budget_ms=2.0)
    assert not (tmp_path / "over").exists()


def test_default_engine_is_native_unless_its_kernel_is_slow_here(bundles, monkeypatch):
    from cscompile.native import engine as native
    from cscompile.runtime import load

    with load(bundles["int4", "dir"].path, threads=1) as bm:
        assert bm.engine.kind == "native"
    monkeypatch.setattr(native, "unavailable", lambda: "its kernel was compiled without AVX2 or AVX-512")
    with pytest.warns(UserWarning, match="running the dense engine, not the native one: its kernel"):
        with load(bundles["int4", "dir"].path, threads=1) as bm:
            assert bm.engine.kind == "dense"
    with pytest.warns(UserWarning, match="running the native engine 'native' anyway: its kernel"):
        with load(bundles["int4", "dir"].path, threads=1, engine="native") as bm:  # asked for: still runs
            assert bm.engine.kind == "native"


def test_a_native_run_imports_neither_onnxruntime_nor_onnx_ir(bundles):
    """A process that loads a bundle and generates with its native engine keeps its memory for the
    model: onnxruntime and onnx-ir (which imports sympy) are not imported (a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cscompile.runtime import GenerationConfig, load\n"
        f"with load({str(bundles['int4', 'csb'].path)!r}, threads=1) as bm:\n"
        "    assert bm.engine.kind == 'native', bm.engine\n"
        "    bm.generate('hello', GenerationConfig(max_new_tokens=3, stop_at_eos=False))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'onnxruntime', 'onnx_ir', 'sympy', 'torch'}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_native_flag_errors_are_one_line_and_write_nothing(tiny_dir, tmp_path, capsys, monkeypatch):
    from cscompile.errors import UserError
    from cscompile.native import engine as native

    out = tmp_path / "n.csb"
    model = str(tiny_dir(INT4_MODEL))
    code, _, err = _run(["build", model, "-o", out, "--native", "on", "--precision", "fp32"], capsys)
    assert code == 2 and "--native on" in err and "--precision int4 or int8" in err and not out.exists()
    code, _, err = _run(["build", model, "-o", out, "--native", "sometimes"], capsys)
    assert code == 2 and "sometimes" in err and not out.exists()

    def refuse(*a, **k):  # type: ignore[no-untyped-def]
        raise UserError("native decoder", "layer 0 is not plain RoPE + SwiGLU", "an unmodified Llama layer")

    monkeypatch.setattr(native, "weights_from_model", refuse)
    code, _, err = _run(["build", model, "-o", out, "--native", "on"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not plain RoPE" in err and not out.exists()
    # auto: built without the native engine, and the reason is a warning
    code, _, err = _run(["build", model, "-o", out], capsys)
    assert code == 0 and "no native engine (native decoder: layer 0 is not plain RoPE" in " ".join(
        err.split()
    )
    with open_bundle(out) as b:
        assert [e.kind for e in b.engines] == ["dense"]


def test_the_source_is_analyzed_once_per_build(tiny_dir, tmp_path, monkeypatch):
    """Analysis (canonicalize, discover, shape inference) is the expensive part on a real graph:
    check, native engine, dense engine and packaging share one (a motif build adds its own)."""
    from cscompile.passes import pipeline, precision

    real = pipeline.analyze
    calls = []

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "analyze", counting)
    monkeypatch.setattr(precision, "analyze", counting)
    res = build_bundle(tiny_dir(INT4_MODEL), tmp_path / "b", precision="int4")
    assert {"dense", "native"} <= set(res.engines)
    assert len(calls) == 1, calls
    assert res.analyses == 1
