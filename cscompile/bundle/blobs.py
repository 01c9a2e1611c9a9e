"""Arrays stored in one bundle file: packed 64-byte aligned, read back as read-only mapped views.

NumPy only, so the runtime's engines (the native step above all) read their weights without
importing the graph libraries (onnx, onnx-ir) that the builders need.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ALIGN = 64


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, dict[str, Any]]]:
    """Concatenate arrays (sorted by name) with 64-byte alignment; the index says where each is."""
    out = bytearray()
    index: dict[str, dict[str, Any]] = {}
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        out += b"\0" * (-len(out) % ALIGN)
        index[name] = {"offset": len(out), "shape": list(a.shape), "dtype": a.dtype.str}
        out += a.tobytes()
    return bytes(out), index


def array_views(path: Path, index: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Read-only views into ``path`` (mapped) at the places ``index`` (from :func:`pack_arrays`) names."""
    size = path.stat().st_size
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    out = {}
    for name, e in index.items():
        dt = np.dtype(e["dtype"])
        shape = tuple(int(d) for d in e["shape"])
        n = int(np.prod(shape)) * dt.itemsize
        off = int(e["offset"])
        if off < 0 or off + n > size or dt.hasobject:
            raise ValueError(f"{path.name}: {name} lies outside the file or has an object dtype")
        out[name] = mm[off : off + n].view(dt).reshape(shape)
    return out
