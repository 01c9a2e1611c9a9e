"""Bundles: round trip, determinism, atomic writes, and a loader that rejects every kind of bad input."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cscompile.bundle import (
    BundleError,
    canonical_manifest_bytes,
    content_hash,
    open_bundle,
    verify_bundle,
    write_bundle,
)
from cscompile.bundle import format as bformat
from cscompile.bundle import loader as bloader
from cscompile.bundle import writer as bwriter
from cscompile.errors import UserError

W = np.array([1.0, 2.0], np.float32)


def add_model(opset: int = 17, external: str | None = None, offset: int = 0) -> bytes:
    """y = x + w; w inline, or stored as external data at ``external`` (relative to the model)."""
    w = numpy_helper.from_array(W, "w")
    if external is not None:
        raw = w.raw_data
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "add", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


NPZ = _npz(
    scale=np.arange(4, dtype=np.float32), idx=np.array([3, 1], np.int64)
)  # once: np.savez stamps times


def inputs(**over: object) -> dict:
    kw: dict = dict(
        files={
            "engines/dense.onnx": add_model(),
            "engines/motif.onnx": add_model(external="motif.onnx.data"),
            "engines/motif.onnx.data": W.tobytes(),
            "tokenizer/tokenizer.json": b'{"model": {"type": "BPE"}}',
            "tokenizer/tokenizer_config.json": b"{}",
            "unit_map.json": b'{"layers": [1, 2]}',
            "controller.json": b'{"k": 0.5}',
            "calib.npz": NPZ,
        },
        engines=[
            {
                "name": "dense",
                "file": "engines/dense.onnx",
                "kind": "dense",
                "params": {},
                "profile": {"tok_s": 9.5},
            },
            {"name": "motif", "file": "engines/motif.onnx", "kind": "motif", "params": {"fraction": 0.5}},
        ],
        source={"name": "tiny-add", "sha256": hashlib.sha256(b"source model").hexdigest()},
        requires={"onnxruntime_min": "1.32.0", "opsets": {"": 17, "com.microsoft": 1}, "target": "cpu"},
        tokenizer="tokenizer/",
        sections={"unit_map": "unit_map.json", "controller": "controller.json", "calib": "calib.npz"},
    )
    kw.update(over)
    return kw


def edit_manifest(bundle: Path, fn) -> None:
    """Apply ``fn`` to the parsed manifest of a directory bundle and write it back."""
    m = json.loads((bundle / "manifest.json").read_bytes())
    fn(m)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))


def replace_file(bundle: Path, rel: str, data: bytes) -> None:
    """Overwrite a file and re-list its hash and size, as a forger would."""
    (bundle / rel).write_bytes(data)

    def fix(m: dict) -> None:
        m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    edit_manifest(bundle, fix)


def tar_of(src: Path, dest: Path, extra=None) -> Path:
    """An archive of a bundle directory plus whatever ``extra(tf)`` adds."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=p.relative_to(src).as_posix(), recursive=False)
        if extra is not None:
            extra(tf)
    return dest


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """Point tempfile (the archive extraction directory) at an empty directory we can inspect."""
    d = tmp_path / "systmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@pytest.fixture
def built(tmp_path) -> Path:
    return write_bundle(tmp_path / "b", **inputs()).path


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every path the code under test opens (builtins.open, io.open, os.open).

    The installed onnxruntime's version is read from the environment (its package metadata,
    once per process) before recording: the files a bundle can make the loader read are what counts.
    """
    bformat.onnxruntime_version()
    seen: list[str] = []
    real_open, real_os_open, real_io_open = builtins.open, os.open, io.open

    def spy(real):
        def wrapper(file, *a, **k):
            if isinstance(file, (str, bytes, os.PathLike)):
                seen.append(os.path.realpath(os.fsdecode(file)))
            return real(file, *a, **k)

        return wrapper

    monkeypatch.setattr(builtins, "open", spy(real_open))
    monkeypatch.setattr(io, "open", spy(real_io_open))
    monkeypatch.setattr(os, "open", spy(real_os_open))
    return seen


# -- round trip and determinism ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["b", "b.csb"])
def test_round_trip(tmp_path, private_tmp, name):
    info = write_bundle(tmp_path / name, **inputs())
    assert info.archive == name.endswith(".csb") and info.files == 8
    assert (tmp_path / name).is_file() == info.archive
    with open_bundle(tmp_path / name) as b:
        assert b.archive == info.archive and b.content_hash == info.content_hash
        assert b.manifest == info.manifest and b.manifest["created_by"]["onnxruntime"] == ort.__version__
        assert [(e.name, e.kind) for e in b.engines] == [("dense", "dense"), ("motif", "motif")]
        assert b.engine("motif").params == {"fraction": 0.5} and b.engine("dense").profile == {"tok_s": 9.5}
        assert b.read_json("unit_map.json") == {"layers": [1, 2]}
        assert b.read_json(b.sections["controller"]) == {"k": 0.5}
        arrays = b.read_npz("calib.npz")
        assert sorted(arrays) == ["idx", "scale"] and arrays["scale"].tolist() == [0, 1, 2, 3]
        assert b.tokenizer_dir is not None and (b.tokenizer_dir / "tokenizer.json").is_file()
        assert b.section_path("calib") == b.root / "calib.npz"
        for engine in b.engines:  # both run, the external-data one included
            sess = ort.InferenceSession(str(engine.path), providers=["CPUExecutionProvider"])
            (y,) = sess.run(None, {"x": np.array([10, 20], np.float32)})
            assert y.tolist() == [11.0, 22.0]
        with pytest.raises(BundleError, match="has no listed file"):
            b.path_of("../b/manifest.json")
        with pytest.raises(BundleError, match="has no listed file"):
            b.path_of("manifest.json")
        with pytest.raises(BundleError, match="has no engine"):
            b.engine("nope")
        root = b.root
    assert root.exists() != info.archive  # an archive's private copy is gone after close
    assert list(private_tmp.iterdir()) == []
    if info.archive:
        with tarfile.open(info.path) as tf:
            manifest_bytes = tf.extractfile("manifest.json").read()  # type: ignore[union-attr]
    else:
        manifest_bytes = (info.path / "manifest.json").read_bytes()
    assert hashlib.sha256(manifest_bytes).hexdigest() == info.content_hash


def test_closed_archive_refuses_paths(tmp_path, private_tmp):
    info = write_bundle(tmp_path / "b.csb", **inputs())
    b = open_bundle(info.path)
    assert not b.closed and b.root.parent == private_tmp
    b.close()
    assert b.closed and not b.root.exists()
    with pytest.raises(ValueError, match="closed"):
        b.path_of("unit_map.json")
    b2 = open_bundle(info.path)
    root = b2.root
    del b2  # the finalizer cleans up a bundle that was never closed
    import gc

    gc.collect()
    assert not root.exists()


def test_content_hash_is_deterministic_and_covers_bytes(tmp_path):
    a = write_bundle(tmp_path / "a", **inputs())
    b = write_bundle(tmp_path / "x" / "b", **inputs())
    assert a.content_hash == b.content_hash == content_hash(a.manifest) == content_hash(tmp_path / "a")
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "x/b/manifest.json").read_bytes()
    assert (tmp_path / "a/manifest.json").read_bytes() == canonical_manifest_bytes(a.manifest)
    kw = inputs()
    kw["files"]["controller.json"] = b'{"k": 0.6}'
    assert write_bundle(tmp_path / "c", **kw).content_hash != a.content_hash
    kw = inputs()
    kw["engines"][1]["params"] = {"fraction": 0.25}
    assert write_bundle(tmp_path / "d", **kw).content_hash != a.content_hash


def test_archive_is_byte_identical_and_normalized(tmp_path):
    one = write_bundle(tmp_path / "one.csb", **inputs())
    two = write_bundle(tmp_path / "sub" / "two.csb", **inputs())
    assert one.path.read_bytes() == two.path.read_bytes()
    assert one.content_hash == two.content_hash
    with tarfile.open(one.path) as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and "manifest.json" in names and "engines" in names
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        assert m.mode == (0o755 if m.isdir() else 0o644) and (m.isdir() or m.isreg())
    with open_bundle(one.path) as b:
        assert b.manifest == one.manifest


def test_archive_written_by_plain_tar_with_dot_prefix_opens(built, tmp_path):
    dest = tmp_path / "dot.csb"
    with tarfile.open(dest, "w") as tf:
        tf.add(built, arcname=".")  # members "." and "./engines/dense.onnx": what `tar -C dir -cf x .` writes
    assert verify_bundle(dest).files_checked == 8


def test_verify_report(built):
    report = verify_bundle(built)
    sizes = json.loads((built / "manifest.json").read_text())["files"]
    assert report.files_checked == 8 and report.bytes_hashed == sum(e["size"] for e in sizes.values())
    assert report.engines == ("dense", "motif") and report.target == "cpu" and not report.archive
    assert report.content_hash == content_hash(built) and "OK" in report.summary()


def test_replacing_an_existing_bundle(tmp_path):
    write_bundle(tmp_path / "b", **inputs())
    kw = inputs()
    kw["files"]["controller.json"] = b'{"k": 1}'
    info = write_bundle(tmp_path / "b", **kw)
    assert open_bundle(tmp_path / "b").read_json("controller.json") == {"k": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    write_bundle(tmp_path / "b.csb", **inputs())
    write_bundle(tmp_path / "b.csb", **kw)
    assert content_hash(tmp_path / "b.csb") == info.content_hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.csb"]


# -- tampering: directory form --------------------------------------------------------------------


def test_flipped_byte_in_any_file_is_caught(built):
    files = json.loads((built / "manifest.json").read_text())["files"]
    assert len(files) == 8
    for rel in files:
        path = built / rel
        original = path.read_bytes()
        for pos in {0, len(original) // 2, len(original) - 1}:
            data = bytearray(original)
            data[pos] ^= 0x01
            path.write_bytes(bytes(data))
            with pytest.raises(BundleError, match=f"{rel} \\| has sha256 .* but the manifest lists"):
                verify_bundle(built)
        path.write_bytes(original)
    verify_bundle(built)


def test_flipped_byte_in_any_archive_member_is_caught(tmp_path, private_tmp):
    info = write_bundle(tmp_path / "b.csb", **inputs())
    original = info.path.read_bytes()
    with tarfile.open(info.path) as tf:
        members = [m for m in tf.getmembers() if m.isreg() and m.size]
    assert len(members) == 9  # 8 files + the manifest
    for m in members:
        data = bytearray(original)
        data[m.offset_data + m.size // 2] ^= 0x20
        info.path.write_bytes(bytes(data))
        with pytest.raises(BundleError):
            verify_bundle(info.path)
    assert list(private_tmp.iterdir()) == []  # failed extractions are removed


def test_truncated_extra_missing_files(built):
    data = (built / "calib.npz").read_bytes()
    (built / "calib.npz").write_bytes(data[:-1])
    with pytest.raises(
        BundleError, match=rf"calib.npz \| is {len(data) - 1} bytes but the manifest lists {len(data)}"
    ):
        verify_bundle(built)
    (built / "calib.npz").write_bytes(data)
    (built / "engines" / "stray.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="engines/stray.bin \\| is not listed in the manifest"):
        verify_bundle(built)
    (built / "engines" / "stray.bin").unlink()
    (built / "controller.json").unlink()
    with pytest.raises(BundleError, match="controller.json \\| is listed in the manifest but missing"):
        verify_bundle(built)


def test_symlinks_inside_a_directory_bundle_are_refused(built, tmp_path, opened):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(built / "unit_map.json", outside / "unit_map.json")
    (built / "unit_map.json").unlink()
    (built / "unit_map.json").symlink_to(outside / "unit_map.json")
    opened.clear()
    with pytest.raises(BundleError, match="unit_map.json \\| is a symbolic link"):
        open_bundle(built)
    assert opened == [str((built / "manifest.json").resolve())]
    (built / "unit_map.json").unlink()
    shutil.copy(outside / "unit_map.json", built / "unit_map.json")
    shutil.move(built / "tokenizer", outside / "tokenizer")
    (built / "tokenizer").symlink_to(outside / "tokenizer", target_is_directory=True)
    opened.clear()
    with pytest.raises(BundleError, match="tokenizer \\| is a symbolic link"):
        open_bundle(built)
    assert opened == [str((built / "manifest.json").resolve())]


def test_symlinked_manifest_is_refused(built, tmp_path):
    shutil.move(built / "manifest.json", tmp_path / "m.json")
    (built / "manifest.json").symlink_to(tmp_path / "m.json")
    with pytest.raises(BundleError, match="manifest.json \\| is not a regular file"):
        open_bundle(built)


def test_fifo_inside_bundle_is_refused(built):
    os.mkfifo(built / "pipe")
    with pytest.raises(BundleError, match="pipe \\| is a device, FIFO or socket"):
        open_bundle(built)


@pytest.mark.parametrize(
    "location", ["../x.bin", "../../x.bin", "/etc/passwd", "sub/../../x.bin", "missing.bin", "a\\b", ""]
)
def test_external_data_outside_the_bundle_is_refused(built, tmp_path, opened, location):
    (tmp_path / "x.bin").write_bytes(W.tobytes())
    replace_file(built, "engines/motif.onnx", add_model(external=location))
    opened.clear()
    with pytest.raises(BundleError, match="external-data location"):
        open_bundle(built)
    assert str((tmp_path / "x.bin").resolve()) not in opened and "/etc/passwd" not in opened


def test_external_data_range_must_fit(built):
    replace_file(built, "engines/motif.onnx", add_model(external="motif.onnx.data", offset=4))
    with pytest.raises(BundleError, match="reads bytes 4..12 of engines/motif.onnx.data"):
        open_bundle(built)


def test_writer_refuses_external_data_outside(tmp_path):
    kw = inputs()
    kw["files"]["engines/motif.onnx"] = add_model(external="../unit_map.json")
    with pytest.raises(BundleError, match="external-data location"):
        write_bundle(tmp_path / "b", **kw)
    assert list(tmp_path.iterdir()) == []


def test_unparsable_onnx_is_refused(built):
    replace_file(built, "engines/dense.onnx", b"\xff\xff\xff not a protobuf")
    with pytest.raises(BundleError, match="engines/dense.onnx \\| is not a parsable ONNX model"):
        open_bundle(built)


# -- tampering: archive form ---------------------------------------------------------------------


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = ""):
    def add(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = kind, link, len(data)
        tf.addfile(info, io.BytesIO(data) if data else None)

    return add


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            _member("tokenizer/evil", tarfile.SYMTYPE, link="/etc/passwd"),
            "tokenizer/evil \\| is a symbolic link",
        ),
        (_member("evil", tarfile.LNKTYPE, link="unit_map.json"), "evil \\| is a hard link"),
        (_member("../evil", data=b"bad"), "../evil \\| path '../evil' has a '..' segment"),
        (_member("/tmp/evil", data=b"bad"), "/tmp/evil \\| path '/tmp/evil' is absolute"),
        (_member("a\\b", data=b"bad"), "contains a backslash"),
        (_member("unit_map.json", data=b"{}"), "unit_map.json \\| appears twice"),
        (_member("fifo", tarfile.FIFOTYPE), "fifo \\| is a FIFO"),
        (_member("dev", tarfile.CHRTYPE), "dev \\| is a character device"),
        (_member("engines/dense.onnx/x", data=b"1"), "appears twice|both a file and a directory"),
        (_member("stray.bin", data=b"unlisted"), "stray.bin \\| is in the archive but not listed"),
    ],
)
def test_bad_archive_members_are_refused_before_extraction(
    built, tmp_path, private_tmp, opened, extra, message
):
    dest = tar_of(built, tmp_path / "bad.csb", extra)
    opened.clear()
    with pytest.raises(BundleError, match=message):
        open_bundle(dest)
    assert list(private_tmp.iterdir()) == []  # nothing was extracted
    assert opened == [str(dest.resolve())]  # the archive itself is the only file opened
    assert not (tmp_path / "evil").exists()


def test_too_many_archive_members(built, tmp_path):
    def many(tf: tarfile.TarFile) -> None:
        for i in range(4100):
            _member(f"d{i}", tarfile.DIRTYPE)(tf)

    with pytest.raises(BundleError, match="more than 4096 archive members"):
        open_bundle(tar_of(built, tmp_path / "many.csb", many))


def test_archive_without_manifest_and_non_tar_files(built, tmp_path):
    (built / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json member"):
        open_bundle(tar_of(built, tmp_path / "nomanifest.csb"))
    junk = tmp_path / "junk.csb"
    junk.write_bytes(os.urandom(3000))
    with pytest.raises(BundleError, match="not a bundle"):
        open_bundle(junk)
    gz = tmp_path / "b.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(tmp_path / "junk.csb", arcname="manifest.json")
    with pytest.raises(BundleError, match="uncompressed tar"):
        open_bundle(gz)


def test_truncated_archive(tmp_path, private_tmp):
    info = write_bundle(tmp_path / "b.csb", **inputs())
    data = info.path.read_bytes()
    for cut in (100, 600, len(data) // 2, len(data) - 11000):
        info.path.write_bytes(data[:cut])
        with pytest.raises(BundleError):
            open_bundle(info.path)
    assert list(private_tmp.iterdir()) == []


# -- manifest checks -------------------------------------------------------------------------------


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        open_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="is not a bundle \\(no manifest.json\\)"):
        open_bundle(tmp_path / "empty")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(BundleError, match="neither a directory nor a regular file"):
        open_bundle(tmp_path / "fifo")


def test_manifest_json_problems(built):
    path = built / "manifest.json"
    good = path.read_bytes()
    for bad, msg in [
        (b"{not json", "is not valid JSON"),
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b'{"a": NaN}', "non-finite"),
        (b"\xff\xfe", "is not valid JSON"),
        (b"[" * 100000, "is not valid JSON|deeper"),
        (b"[" * 100 + b"]" * 100, "deeper than 64"),
        (b"1" * 5000, "is not valid JSON"),
        (b" " * (5 << 20), "at most 4194304 bytes"),
        (b"[]", "manifest \\(top level\\) \\| got a list"),
    ]:
        path.write_bytes(bad)
        with pytest.raises(BundleError, match=msg):
            open_bundle(built)
    path.write_bytes(good)
    open_bundle(built)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m.update(format="other"),
            "manifest format \\| got a string \\('other'\\). Expected 'cscompile-bundle'",
        ),
        (lambda m: m.update(schema_version=2), "schema_version \\| is 2, written by a newer cscompile"),
        (lambda m: m.update(schema_version=0), "schema_version \\| got an integer \\(0\\)"),
        (lambda m: m.update(schema_version="1"), "schema_version \\| got a string"),
        (lambda m: m.update(schema_version=True), "schema_version \\| got a boolean"),
        (lambda m: m.pop("engines"), "has no key 'engines'"),
        (lambda m: m.update(extra=1), "has the unknown key 'extra'"),
        (
            lambda m: m["engines"][0].update(kind="sparse"),
            "engines\\[0\\].kind \\| got a string \\('sparse'\\)",
        ),
        (lambda m: m["engines"][0].update(file="calib.npz"), "engines\\[0\\].file \\| is 'calib.npz'"),
        (lambda m: m["engines"][1].update(name="dense"), "repeats the engine name 'dense'"),
        (lambda m: m["engines"][0].update(params=[]), "engines\\[0\\].params \\| got a list"),
        (lambda m: m.update(tokenizer="tok/"), "no listed file is under 'tok/'"),
        (lambda m: m.update(tokenizer="tokenizer"), "tokenizer \\| got a string"),
        (lambda m: m["sections"].update(x="nope.json"), "sections\\['x'\\] \\| 'nope.json' is not listed"),
        (lambda m: m["sections"].update(x="../unit_map.json"), "has a '..' segment"),
        (lambda m: m["source"].update(sha256="XYZ"), "source.sha256 \\| got 'XYZ'"),
        (
            lambda m: m["requires"].update(target="tpu"),
            "requires.target \\| got 'tpu'. Expected 'cpu' or 'trt'",
        ),
        (lambda m: m["requires"].update(onnxruntime_min="latest"), "onnxruntime_min \\| got 'latest'"),
        (lambda m: m["requires"]["opsets"].update({"org.foo": 1}), "unknown operator domain 'org.foo'"),
        (lambda m: m["requires"]["opsets"].update({"": "17"}), "opsets\\[''\\] \\| got a string"),
        (lambda m: m["files"].update({"/etc/passwd": m["files"]["calib.npz"]}), "is absolute"),
        (lambda m: m["files"].update({"a//b": m["files"]["calib.npz"]}), "empty segment"),
        (lambda m: m["files"].update({"a\x00b": m["files"]["calib.npz"]}), "NUL"),
        (
            lambda m: m["files"].update({"manifest.json": m["files"]["calib.npz"]}),
            "lists the manifest itself",
        ),
        (lambda m: m["files"]["calib.npz"].update(sha256=1), "sha256 \\| got an integer"),
    ],
)
def test_manifest_field_errors(built, edit, message):
    edit_manifest(built, edit)
    with pytest.raises(BundleError, match=message) as exc:
        open_bundle(built)
    assert isinstance(exc.value, UserError) and "\n" not in str(exc.value) and ". Expected " in str(exc.value)


@pytest.mark.parametrize("size", [-1, 1.5, "12", True, None, 65 << 30, 10**30])
def test_absurd_sizes_fail_before_reading(built, monkeypatch, size):
    edit_manifest(built, lambda m: m["files"]["calib.npz"].update(size=size))

    def no(*a, **k):
        raise AssertionError("read a file before rejecting the manifest")

    monkeypatch.setattr(bloader, "_walk", no)
    monkeypatch.setattr(bloader, "_hash_file", no)
    with pytest.raises(BundleError, match="calib.npz'\\].size"):
        open_bundle(built)


def test_too_many_files_fails_before_reading(built, monkeypatch):
    entry = {"sha256": "0" * 64, "size": 1}
    edit_manifest(built, lambda m: m["files"].update({f"f{i}": entry for i in range(4097)}))
    monkeypatch.setattr(bloader, "_walk", lambda *a: pytest.fail("walked"))
    with pytest.raises(BundleError, match="lists 4105 files. Expected at most 4096"):
        open_bundle(built)


# -- requirements against this machine ------------------------------------------------------------


def test_newer_onnxruntime_required(built, monkeypatch):
    edit_manifest(built, lambda m: m["requires"].update(onnxruntime_min="99.0"))
    with pytest.raises(
        BundleError, match=f"requires onnxruntime >= 99.0 \\| the installed onnxruntime is {ort.__version__}"
    ):
        open_bundle(built)
    open_bundle(built, check_requires=False)
    edit_manifest(built, lambda m: m["requires"].update(onnxruntime_min="1.4.0"))  # numeric, not string order
    open_bundle(built)
    monkeypatch.setattr(bformat, "onnxruntime_version", lambda: "1.31.9")
    edit_manifest(built, lambda m: m["requires"].update(onnxruntime_min="1.32"))
    with pytest.raises(BundleError, match="installed onnxruntime is 1.31.9"):
        open_bundle(built)


def test_onnxruntime_version_is_the_installed_one():
    assert bformat.onnxruntime_version() == ort.__version__


def test_version_compare():
    vt, ge = bformat.version_tuple, bformat.version_at_least
    assert vt("1.32.0.dev20250101") == (1, 32, 0) and vt("dev") is None
    assert ge((1, 100), (1, 32, 0)) and ge((1, 32), (1, 32, 0)) and not ge((1, 9, 9), (1, 32))


def test_opset_requirements(built):
    edit_manifest(built, lambda m: m["requires"]["opsets"].update({"": 999}))
    with pytest.raises(
        BundleError, match="requires ONNX opset 999 \\| the installed onnx supports opsets up to"
    ):
        open_bundle(built)
    edit_manifest(built, lambda m: m["requires"]["opsets"].update({"": 17}))
    replace_file(built, "engines/dense.onnx", add_model(opset=18))
    with pytest.raises(BundleError, match="imports opset ai.onnx version 18 but requires.opsets declares 17"):
        open_bundle(built)


def test_trt_target_on_a_cpu_machine(built, monkeypatch):
    from cscompile.trt import engine as trt_engine

    if trt_engine.gpu_problem() is None:
        pytest.skip("this machine has a GPU with TensorRT")
    edit_manifest(built, lambda m: m["requires"].update(target="trt"))
    with pytest.raises(BundleError) as exc:
        open_bundle(built)
    msg = str(exc.value)
    assert "target 'trt' | this machine has no CUDA GPU with TensorRT" in msg
    assert "Expected a bundle built with --target cpu" in msg and "cscompile[trt]" in msg
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(BundleError, match="the Python packages tensorrt and torch are not installed"):
        open_bundle(built)
    assert verify_bundle(built, check_requires=False).target == "trt"


# -- data sections --------------------------------------------------------------------------------


def test_npz_without_pickle(built):
    replace_file(built, "calib.npz", _npz(obj=np.array([{"a": 1}], dtype=object)))
    with open_bundle(built) as b, pytest.raises(BundleError, match="holds Python objects"):
        b.read_npz("calib.npz")
    replace_file(built, "calib.npz", NPZ[: len(NPZ) // 2])
    with open_bundle(built) as b, pytest.raises(BundleError, match="is not a valid .npz"):
        b.read_npz("calib.npz")
    replace_file(built, "controller.json", b'{"k": Infinity}')
    with open_bundle(built) as b, pytest.raises(BundleError, match="controller.json \\| is not valid JSON"):
        b.read_json("controller.json")


def test_npz_header_claiming_huge_array(built):
    data = bytearray(NPZ)
    at = data.index(b"(4,)")  # the "scale" header; stored (uncompressed) by np.savez
    data[at : at + 4] = b"(9,)"
    replace_file(built, "calib.npz", bytes(data))
    with open_bundle(built) as b, pytest.raises(BundleError):
        b.read_npz("calib.npz")


# -- writer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["b", "b.csb"])
def test_failed_write_leaves_nothing(tmp_path, name):
    kw = inputs()
    kw["files"]["missing.bin"] = tmp_path / "does-not-exist.bin"
    with pytest.raises(BundleError, match="does-not-exist.bin cannot be read"):
        write_bundle(tmp_path / name, **kw)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "where"),
    [("b", "copy"), ("b", "validate"), ("b.csb", "copy"), ("b.csb", "validate"), ("b.csb", "tar")],
)
def test_interrupted_write_leaves_nothing_and_keeps_old(tmp_path, monkeypatch, name, where):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(b"z" * 100_000)
    kw = inputs()
    kw["files"]["big.bin"] = src / "big.bin"

    def boom(*a, **k):
        raise KeyboardInterrupt

    target = {
        "copy": (shutil, "copyfile"),
        "tar": (bwriter, "_write_tar"),
        "validate": (bwriter, "check_bundle_dir"),
    }
    monkeypatch.setattr(*target[where], boom)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_bundle(out / name, **kw)
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    old = write_bundle(out / name, **inputs())
    monkeypatch.setattr(*target[where], boom)
    with pytest.raises(KeyboardInterrupt):
        write_bundle(out / name, **kw)
    assert [p.name for p in out.iterdir()] == [name]
    assert content_hash(out / name) == old.content_hash


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda kw: kw["files"].update({"../x": b"1"}), "has a '..' segment"),
        (lambda kw: kw["files"].update({"/abs": b"1"}), "is absolute"),
        (lambda kw: kw["files"].update({"./a": b"1"}), "has a '.' segment"),
        (lambda kw: kw["files"].update({"a/": b"1"}), "empty segment"),
        (lambda kw: kw["files"].update({"manifest.json": b"1"}), "the manifest's own name"),
        (lambda kw: kw["files"].update({"x.bin": "not bytes"}), "Expected a Path or bytes"),
        (lambda kw: kw["files"].update({"unit_map.json/x": b"1"}), "both as a file and as a directory"),
        (
            lambda kw: kw["engines"].append({"name": "x", "file": "x.onnx", "kind": "dense"}),
            "is not listed in files",
        ),
        (lambda kw: kw.update(tokenizer="tok/"), "no listed file is under"),
        (lambda kw: kw.update(requires={**kw["requires"], "target": "gpu"}), "'cpu' or 'trt'"),
        (lambda kw: kw.update(source={"name": "x"}), "has no key 'sha256'"),
        (lambda kw: kw["engines"][0].update(params={"x": float("nan")}), "not serializable"),
        (lambda kw: kw["engines"][0].update(params={"x": object()}), "not serializable"),
    ],
)
def test_writer_validates_inputs(tmp_path, change, message):
    kw = inputs()
    change(kw)
    with pytest.raises(BundleError, match=message):
        write_bundle(tmp_path / "b", **kw)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_to_replace_what_is_not_a_bundle(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):
        write_bundle(home, **inputs())
    assert (home / "precious.txt").read_text() == "keep me"
    (tmp_path / "notes.txt").write_text("keep me too")
    with pytest.raises(BundleError, match="not a bundle archive"):
        write_bundle(tmp_path / "notes.txt", archive=True, **inputs())
    with pytest.raises(BundleError, match="is an existing directory"):
        write_bundle(home, archive=True, **inputs())
    with pytest.raises(BundleError, match="no file name"):
        write_bundle(tmp_path / "..", **inputs())
    (tmp_path / "link").symlink_to(home)
    with pytest.raises(BundleError, match="is a symbolic link"):
        write_bundle(tmp_path / "link", **inputs())
    assert (tmp_path / "notes.txt").read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "link", "notes.txt"]


def test_files_from_paths(tmp_path):
    src = tmp_path / "model.onnx"
    src.write_bytes(add_model())
    kw = inputs()
    kw["files"]["engines/dense.onnx"] = src
    a = write_bundle(tmp_path / "a", **kw)
    assert a.content_hash == write_bundle(tmp_path / "b", **inputs()).content_hash
