"""Compiled C libraries of this package: the installed copy, else compiled into the cache.

``pip install`` compiles each kernel next to its package (setup.py); when that copy is missing
(a wheel built elsewhere, a failed build) the first use compiles the source into the cache with
the system C compiler, keyed by the source hash, or says what is missing. Loaded with ctypes,
its ABI number checked and every function's signature declared.

OpenMP's wait policy: libgomp reads ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` once, when it is
first loaded (here, with the first kernel). Its default spins 300,000 rounds at each barrier; on
cores another process wants, the spinning thread keeps the descheduled one from running and a
native token takes 100x its time (issue 25). Unless the user set either variable, the load runs
with ``GOMP_SPINCOUNT`` = :data:`SPIN_COUNT` (a few microseconds: a barrier on idle cores is
still met spinning), then the variable is removed again so child processes see the user's
environment.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cscompile.errors import UserError

#: libgomp spin rounds at a barrier before a thread sleeps (docs/design.md "Native engine on shared cores")
SPIN_COUNT = 1000
OMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


@contextmanager
def openmp_wait_policy(spin_count: int = SPIN_COUNT) -> Iterator[bool]:
    """``GOMP_SPINCOUNT=spin_count`` for the duration (yields True), unless the user set a wait
    variable (yields False, nothing touched). Only a libgomp not yet loaded reads it.
    """
    if any(v in os.environ for v in OMP_WAIT_VARS):
        yield False
        return
    os.environ["GOMP_SPINCOUNT"] = str(int(spin_count))
    try:
        yield True
    finally:
        os.environ.pop("GOMP_SPINCOUNT", None)


def installed_library(stem: str, package_dir: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = package_dir / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def compile_into_cache(source: Path, what: str) -> Path:
    from cscompile.cache import cache_root, ensure_writable_dir

    if not source.is_file():
        raise UserError(what, f"its source {source} is missing", "a complete cscompile install")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    out_dir = ensure_writable_dir(cache_root() / "kernels")
    lib = out_dir / f"{source.stem}-{digest}.so"
    if lib.is_file():
        return lib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise UserError(
            what,
            "it was not built at install time and no C compiler (cc/gcc) is on PATH",
            "a C compiler with OpenMP, or a reinstall: pip install --force-reinstall cscompile",
        )
    flags = os.environ.get("CSCOMPILE_CFLAGS", "-O3 -march=native").split()
    tmp = lib.with_suffix(f".tmp-{os.getpid()}.so")
    cmd = [
        cc,
        *flags,
        "-fopenmp",
        "-fno-math-errno",
        "-std=c11",
        "-shared",
        "-fPIC",
        str(source),
        "-o",
        str(tmp),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = (proc.stderr.strip().splitlines() or ["no output"])[0]
        raise UserError(what, f"compiling it failed ({first[:200]})", "a C compiler with OpenMP")
    os.replace(tmp, lib)
    return lib


def load_library(
    stem: str,
    source: Path,
    what: str,
    abi_symbol: str,
    abi: int,
    signatures: dict[str, tuple[Any, list[Any]]],
) -> ctypes.CDLL:
    """A compiled C library of this package (the installed copy, else compiled into the cache),
    its ABI checked and each function in ``signatures`` (``name: (restype, argtypes)``) declared.
    """
    path = installed_library(stem, source.parent.parent) or compile_into_cache(source, what)
    with openmp_wait_policy():
        lib = ctypes.CDLL(str(path))
    found = getattr(lib, abi_symbol)()
    if found != abi:
        raise UserError(what, f"{path} has ABI {found}", f"ABI {abi} (reinstall cscompile)")
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib
