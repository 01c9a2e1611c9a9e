"""The on-disk cache and the atomic-write helpers everything else uses.

Cache root: ``$CSCOMPILE_CACHE`` if set, else ``$XDG_CACHE_HOME/cscompile``, else
``~/.cache/cscompile``. Every entry is built in a temporary sibling directory and renamed
into place, so an interrupted fetch or export never leaves a half-written entry behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cscompile import scratch
from cscompile.errors import UserError


def cache_root() -> Path:
    """The cache directory (not created)."""
    env = os.environ.get("CSCOMPILE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cscompile"


def ensure_writable_dir(path: Path, what: str = "cache directory") -> Path:
    """Create ``path`` if needed and check it is writable, with a clear error if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise UserError(
            f"{what} {path}",
            f"cannot be written ({exc.strerror or exc})",
            "a writable directory (set CSCOMPILE_CACHE or XDG_CACHE_HOME to choose another)",
        ) from None
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; rename it to ``final`` on success.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and
    ``final`` is left as it was. An existing ``final`` is replaced only after the new one is
    complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch.sweep(final.parent, f".{final.name}.tmp-")  # what killed writers left behind
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        scratch.hold(tmp)
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        scratch.release(tmp)
    except BaseException:
        scratch.remove(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
