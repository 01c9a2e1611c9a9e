from __future__ import annotations

from pathlib import Path

import pytest

from cscompile.cache import atomic_dir, atomic_write_json, cache_root, ensure_writable_dir, sha256_file
from cscompile.errors import UserError


def test_cache_root_env_order(monkeypatch, tmp_path):
    monkeypatch.setenv("CSCOMPILE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("CSCOMPILE_CACHE")
    assert cache_root() == tmp_path / "x" / "cscompile"


def test_atomic_dir_success_replaces(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (final / "new.txt").exists()  # not visible until complete
    assert (final / "new.txt").read_text() == "new"
    assert not (final / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failure_keeps_previous(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "good.txt").write_text("good")
    with pytest.raises(KeyboardInterrupt), atomic_dir(final):
        raise KeyboardInterrupt
    assert (final / "good.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_unwritable_cache_dir_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="cannot be written.*Expected a writable directory"):
        ensure_writable_dir(blocker / "cache")


def test_atomic_write_json_and_hash(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"b": 1, "a": [1, 2]})
    assert p.read_text().startswith('{\n  "a"')
    import hashlib

    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    assert [x.name for x in Path(tmp_path).iterdir()] == ["m.json"]
