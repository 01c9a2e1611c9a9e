"""Scratch files never outlive their process for long: locked while alive, swept once orphaned,
and a SIGTERM'd command cleans up as for Ctrl-C."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cscompile import scratch


def _age(path: Path, seconds: float = 3600) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_sweep_removes_orphans_and_keeps_what_a_live_process_holds(tmp_path):
    orphan = tmp_path / "x-orphan"
    orphan.mkdir()
    (orphan / "f").write_bytes(b"1")
    young = tmp_path / "x-young"
    young.mkdir()
    other = tmp_path / "y-other"
    other.mkdir()
    held = tmp_path / "x-held"
    held.mkdir()
    # a live process (not this one) holds its scratch
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from cscompile import scratch; scratch.hold({str(held)!r}); print('ok', flush=True); "
            "import time; time.sleep(60)",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ok"
        for p in (orphan, other, held):
            _age(p)
        assert scratch.sweep(tmp_path, "x-") == 1
        assert not orphan.exists() and young.exists() and held.exists() and other.exists()
    finally:
        proc.kill()
        proc.wait()
    assert scratch.sweep(tmp_path, "x-") == 1  # its holder is gone now
    assert not held.exists() and young.exists()


def test_own_held_scratch_is_never_swept(tmp_path):
    d = tmp_path / "x-mine"
    d.mkdir()
    scratch.hold(d)
    _age(d)
    assert scratch.sweep(tmp_path, "x-") == 0
    scratch.remove(d)
    assert not d.exists()


@pytest.fixture(scope="module")
def archive(tiny_dir, tmp_path_factory):
    from cscompile.compiler.build import build_bundle

    return build_bundle(tiny_dir("llama-2l"), tmp_path_factory.mktemp("sc") / "t.csb", precision="fp32").path


def _extractions(tmp: Path) -> list[Path]:
    return [p for p in tmp.iterdir() if p.name.startswith("cscompile-bundle-")]


def _run_until_extracted(archive: Path, tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp)}
    code = (
        "import sys, time; from cscompile.runtime import load; "
        "from cscompile.cli.main import _terminate; import signal; signal.signal(signal.SIGTERM, _terminate); "
        f"m = load({str(archive)!r}); print('loaded', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "loaded"
    assert len(_extractions(tmp)) == 1, list(tmp.iterdir())
    return proc


def test_sigterm_removes_the_extracted_archive(archive, tmp_path):
    proc = _run_until_extracted(archive, tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert _extractions(tmp_path) == []


def test_sigkill_leftovers_are_swept_by_the_next_load(archive, tmp_path, monkeypatch):
    from cscompile.bundle import open_bundle
    from cscompile.bundle.loader import EXTRACT_PREFIX

    proc = _run_until_extracted(archive, tmp_path)
    proc.kill()
    proc.wait()
    (left,) = _extractions(tmp_path)
    _age(left)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with open_bundle(archive) as b:
        names = [p.name for p in _extractions(tmp_path)]
        assert left.name not in names and len(names) == 1 and names[0].startswith(EXTRACT_PREFIX)
        assert b.root.is_dir()
