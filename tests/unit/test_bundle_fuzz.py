"""Fuzzing the bundle loader: any mutation ends in success or a BundleError, never another exception.

Every example also runs under an open() spy: the loader must not open a path outside the
bundle (or its private extraction directory, which is pointed inside the example's directory).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from cscompile.bundle import Bundle, BundleError, open_bundle, write_bundle

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
W = np.array([1.0, 2.0], np.float32)


def _add_model(external: str | None = None) -> bytes:
    w = numpy_helper.from_array(W, "w")
    if external is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", "8")):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "add", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, scale=np.arange(4, dtype=np.float32))
    return buf.getvalue()


INPUTS: dict[str, Any] = dict(
    files={
        "engines/dense.onnx": _add_model(),
        "engines/motif.onnx": _add_model(external="motif.onnx.data"),
        "engines/motif.onnx.data": W.tobytes(),
        "tokenizer/tokenizer.json": b'{"model": {}}',
        "unit_map.json": b'{"layers": [1, 2]}',
        "calib.npz": _npz(),
    },
    engines=[
        {
            "name": "dense",
            "file": "engines/dense.onnx",
            "kind": "dense",
            "params": {"a": [1, 2]},
            "profile": {},
        },
        {"name": "motif", "file": "engines/motif.onnx", "kind": "motif", "params": {}, "profile": {"t": 1.5}},
    ],
    source={"name": "tiny", "sha256": "ab" * 32},
    requires={"onnxruntime_min": "1.32.0", "opsets": {"": 17, "com.microsoft": 1}, "target": "cpu"},
    tokenizer="tokenizer/",
    sections={"unit_map": "unit_map.json", "calib": "calib.npz"},
)
DATA_FILES = sorted(INPUTS["files"])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One good bundle, directory and archive form, shared by every example."""
    d = tmp_path_factory.mktemp("base")
    write_bundle(d / "b", **INPUTS)
    write_bundle(d / "b.csb", **INPUTS)
    return d


@contextlib.contextmanager
def case(base: Path, form: str) -> Iterator[Path]:
    """A fresh copy of the base bundle in its own directory, which also serves as tempfile's directory."""
    work = Path(tempfile.mkdtemp(prefix="fuzz-")).resolve()
    old_tempdir = tempfile.tempdir
    try:
        if form == "dir":
            shutil.copytree(base / "b", work / "b")
        else:
            shutil.copy(base / "b.csb", work / "b.csb")
        (work / "tmp").mkdir()
        tempfile.tempdir = str(work / "tmp")
        yield work / ("b" if form == "dir" else "b.csb")
        assert list((work / "tmp").iterdir()) == [], "extraction directory left behind"
    finally:
        tempfile.tempdir = old_tempdir
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def confined(*roots: Path) -> Iterator[list[str]]:
    """Fail if anything opens a path outside ``roots`` (builtins.open, io.open, os.open)."""
    seen: list[str] = []
    real = (builtins.open, io.open, os.open)

    def spy(fn):
        def wrapper(file, *a, **k):
            if isinstance(file, (str, bytes, os.PathLike)):
                name = os.fsdecode(file)
                if k.get("dir_fd") is not None:  # shutil.rmtree opens relative to a directory fd
                    name = os.path.join(os.readlink(f"/proc/self/fd/{k['dir_fd']}"), name)
                path = os.path.realpath(name)
                seen.append(path)
                inside = any(path == str(r) or path.startswith(str(r) + os.sep) for r in roots)
                assert inside, f"opened {path} outside {roots}"
            return fn(file, *a, **k)

        return wrapper

    builtins.open, io.open, os.open = spy(real[0]), spy(real[1]), spy(real[2])  # type: ignore[assignment]
    try:
        yield seen
    finally:
        builtins.open, io.open, os.open = real  # type: ignore[assignment]


def load(path: Path, use: bool = True) -> Bundle | None:
    """Open (and, if ``use``, read every section of) a bundle; None when it was rejected."""
    try:
        with confined(path, path.parent / "tmp"), open_bundle(path) as b:
            if use:
                for rel in b.sections.values():
                    (b.read_npz if rel.endswith(".npz") else b.read_json)(rel)
            return b
    except BundleError as exc:
        assert "\n" not in str(exc) and " | " in str(exc) and ". Expected " in str(exc)
        return None


# -- (a) structural mutations of the manifest -------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_structure(base, data):
    with case(base, data.draw(st.sampled_from(["dir", "csb"]), label="form")) as path:
        manifest = json.loads((base / "b" / "manifest.json").read_text())
        for _ in range(data.draw(st.integers(1, 3), label="n")):
            target = data.draw(st.sampled_from(_paths(manifest)), label="path")
            op = data.draw(st.sampled_from(["replace", "delete", "add"]), label="op")
            if not target:
                manifest = data.draw(JSON, label="whole")
                continue
            *up, last = target
            parent = manifest
            for key in up:
                parent = parent[key]
            if op == "replace":
                parent[last] = data.draw(JSON, label="value")
            elif op == "delete":
                del parent[last]
            elif isinstance(parent[last], dict):
                parent[last][data.draw(st.text(max_size=20), label="key")] = data.draw(JSON, label="value")
            elif isinstance(parent[last], list):
                parent[last].append(data.draw(JSON, label="value"))
        text = json.dumps(manifest, indent=data.draw(st.sampled_from([None, 2])), sort_keys=True)
        if path.is_dir():
            (path / "manifest.json").write_text(text)
        else:
            _retar(path, {"manifest.json": text.encode()})
        b = load(path)
        if b is not None:
            assert b.manifest == manifest


def _retar(path: Path, replace: dict[str, bytes]) -> None:
    """Rewrite an archive with some members' content replaced (same order, same metadata)."""
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read() if m.isreg() else None) for m in src.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as dst:
        for m, content in members:
            content = replace.get(m.name, content)
            if content is not None:
                m.size = len(content)
            dst.addfile(m, io.BytesIO(content) if content is not None else None)


# -- (b) byte mutations of the files of a directory bundle ---------------------------------------------


def _mutate(data: bytes, draw) -> bytes:
    op = draw(st.sampled_from(["flip", "truncate", "append", "splice"]), label="op")
    if op == "flip" and data:
        i = draw(st.integers(0, len(data) - 1), label="at")
        out = bytearray(data)
        out[i] ^= draw(st.integers(1, 255), label="xor")
        return bytes(out)
    if op == "truncate":
        return data[: draw(st.integers(0, len(data)), label="len")]
    if op == "append":
        return data + draw(st.binary(max_size=64), label="tail")
    i = draw(st.integers(0, len(data)), label="at")
    return (
        data[:i]
        + draw(st.binary(max_size=16), label="chunk")
        + data[i + draw(st.integers(0, 16), label="cut") :]
    )


@FUZZ
@given(data=st.data())
def test_fuzz_file_bytes(base, data):
    with case(base, "dir") as path:
        rel = data.draw(st.sampled_from([*DATA_FILES, "manifest.json"]), label="file")
        before = (path / rel).read_bytes()
        after = _mutate(before, data.draw)
        (path / rel).write_bytes(after)
        b = load(path)
        if rel != "manifest.json" and after != before:
            assert b is None, f"a changed {rel} was accepted"
        if after == before:
            assert b is not None


# -- (c) byte mutations of the archive ----------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_fuzz_archive_bytes(base, data):
    with case(base, "csb") as path:
        before = path.read_bytes()
        after = bytearray(before)
        with tarfile.open(base / "b.csb") as tf:
            headers = [m.offset for m in tf.getmembers()]
        for _ in range(data.draw(st.integers(1, 3), label="n")):
            if data.draw(st.booleans(), label="in a header"):  # names, sizes, types, checksums
                at = data.draw(st.sampled_from(headers), label="header") + data.draw(
                    st.integers(0, 511), label="at"
                )
                if at < len(after):
                    after[at] = data.draw(st.integers(0, 255), label="byte")
            else:
                after = bytearray(_mutate(bytes(after), data.draw))
        path.write_bytes(bytes(after))
        b = load(path)
        if len(after) == len(before):  # a changed byte inside a data member must be caught
            with tarfile.open(base / "b.csb") as tf:
                members = [m for m in tf.getmembers() if m.isreg() and m.name != "manifest.json"]
            regions = [(m.offset_data, m.offset_data + m.size) for m in members]
            changed = [i for i in range(len(before)) if before[i] != after[i]]
            if any(lo <= i < hi for i in changed for lo, hi in regions):
                assert b is None


# -- (d) re-hashed mutations: the parsers behind the hashes (ONNX, npz, JSON) --------------------------


@FUZZ
@given(data=st.data())
def test_fuzz_rehashed_payload(base, data):
    with case(base, "dir") as path:
        rel = data.draw(st.sampled_from(DATA_FILES), label="file")
        after = (path / rel).read_bytes()
        for _ in range(data.draw(st.integers(1, 4), label="n")):
            after = _mutate(after, data.draw)
        (path / rel).write_bytes(after)
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"][rel] = {"sha256": hashlib.sha256(after).hexdigest(), "size": len(after)}
        (path / "manifest.json").write_text(json.dumps(manifest))
        load(path)


LOCATIONS = st.sampled_from(
    ["motif.onnx.data", "../x.bin", "/etc/passwd", "./motif.onnx.data", "..", "a/../motif.onnx.data", "C:\\x"]
) | st.text(alphabet="./\\ab\x00:", max_size=12)


@FUZZ
@given(location=LOCATIONS)
def test_fuzz_external_data_location(base, location):
    with case(base, "dir") as path:
        (path.parent / "x.bin").write_bytes(W.tobytes())
        model = _add_model(external=location)
        (path / "engines/motif.onnx").write_bytes(model)
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"]["engines/motif.onnx"] = {
            "sha256": hashlib.sha256(model).hexdigest(),
            "size": len(model),
        }
        (path / "manifest.json").write_text(json.dumps(manifest))
        with confined(path) as seen:
            b = load(path)
        assert (b is not None) == (location == "motif.onnx.data")
        assert str(path.parent / "x.bin") not in seen
