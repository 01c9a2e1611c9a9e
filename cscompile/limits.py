"""Hard bounds on numbers that reach C code or size allocations (core: imports only errors).

Thread counts: at most ``THREADS_PER_CPU`` × the machine's CPUs, and never more than
``MAX_THREADS`` (the C kernels refuse more too). More threads than that only oversubscribe the
cores, and huge counts crash or hang the OpenMP and ONNX Runtime thread pools.
Integers from a bundle that the C step stores in 32-bit fields must fit ``INT32_MAX``: ctypes
would wrap them silently.
"""

from __future__ import annotations

import os
from typing import Any

from cscompile.errors import UserError

#: the C kernels' own bound (qdecode.c CS_MAX_THREADS)
MAX_THREADS = 1024
THREADS_PER_CPU = 4
INT32_MAX = 2**31 - 1


def max_threads() -> int:
    """The most threads any engine is asked for on this machine."""
    return min(MAX_THREADS, THREADS_PER_CPU * (os.cpu_count() or 1))


def check_threads(threads: Any, what: str = "threads") -> int:
    """``threads`` as an int in ``[1, max_threads()]``, or a one-line :class:`UserError`."""
    top = max_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= top:
        raise UserError(
            what,
            f"{threads!r}",
            f"an integer in [1, {top}] ({THREADS_PER_CPU} per CPU of this machine's {os.cpu_count() or 1}, "
            f"at most {MAX_THREADS})",
        )
    return int(threads)


def is_int32(value: Any, low: int = 1) -> bool:
    """Whether ``value`` is a (non-bool) int in ``[low, INT32_MAX]``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= INT32_MAX
