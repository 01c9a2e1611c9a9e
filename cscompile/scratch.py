"""Scratch directories and files that never outlive their process for long.

Every temporary place cscompile writes (a bundle extracted for running, a build's work
directory, a bundle or cache entry being written) is locked with ``flock`` by the process that
made it, for as long as it lives. A process killed outright (SIGKILL, power loss) cannot clean up;
the next run that makes the same kind of scratch sweeps the old ones whose lock nobody holds
(owned by this user, older than a minute). SIGTERM is turned into a normal exit by the CLI, so
its ``finally`` blocks clean up as for Ctrl-C. Without ``fcntl`` (Windows) nothing is swept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None  # type: ignore[assignment]

#: scratch younger than this is never swept (the moment between creating and locking it)
MIN_AGE_S = 60.0
_held: dict[str, int] = {}
_lock = threading.Lock()


def hold(path: Path | str) -> None:
    """Lock ``path`` (a directory or file this process just made) for this process's lifetime."""
    if fcntl is None:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    with _lock:
        _held[str(path)] = fd


def release(path: Path | str) -> None:
    """Drop this process's lock on ``path`` (after removing or renaming it)."""
    with _lock:
        fd = _held.pop(str(path), None)
    if fd is not None:
        os.close(fd)


def remove(path: Path | str) -> None:
    """Remove a held scratch directory or file and drop its lock."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()
    release(p)


def sweep(parent: Path | str, prefix: str, min_age_s: float = MIN_AGE_S) -> int:
    """Remove ``parent/prefix*`` entries of this user that no live process holds; returns how many."""
    if fcntl is None:
        return 0
    removed = 0
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return 0
    now = time.time()
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        with _lock:
            if str(p) in _held:
                continue
        try:
            st = os.lstat(p)
            if st.st_uid != os.getuid() or now - st.st_mtime < min_age_s:
                continue
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live process holds it
            os.close(fd)
            continue
        try:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()
            removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
