"""The compiler pipeline, written out in order (no registration by import side effects).

``analyze``: load → canonicalize → discover units → align to the target's block size.
Verification between stages (each pass's ``requires``/``ensures``) is on by default;
``CSCOMPILE_VERIFY=0`` turns it off. A failure names the failing pass and the ones before it.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes import PassBase

from cscompile.errors import CscompileError, UserError
from cscompile.passes import META_KEY, AlignPass, CanonicalizePass, DiscoverUnitsPass, UnitMap


def load_model(path: Path | str) -> ir.Model:
    """Load an ONNX file (external data beside it is resolved by onnx-ir) with a clear error."""
    p = Path(path)
    if not p.is_file():
        raise UserError("ONNX model", f"no file at {p}", "a path to an existing .onnx file")
    try:
        model = ir.load(str(p))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"ONNX model {p}", f"could not be parsed ({first[:200]})", "a valid ONNX protobuf"
        ) from None
    _check_external_data(model, p)
    return model


def save_model(model: ir.Model, path: Path | str) -> None:
    """Save ``model`` at ``path`` so that it is complete there.

    A model loaded with external data (transformers' exporter writes ``model.onnx.data``) keeps
    reading its tensors from the source's file; saved elsewhere as is, its initializers would
    point at ``<path>.data`` beside the copy, which does not exist. Such a model's tensors are
    written to ``<name>.data`` beside ``path``; a model held in memory is saved in one file.
    """
    p = Path(path)
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    ir.save(model, str(p), external_data=f"{p.name}.data" if external else None)


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Every initializer stored outside the file: inside the model's folder, and within its file
    (what ONNX Runtime refuses too; onnx-ir reads lazily, so a pass would fail with a traceback).
    """
    base = path.parent.resolve()
    for name, value in model.graph.initializers.items():
        t = value.const_value
        if not isinstance(t, ir.ExternalTensor):
            continue
        where = (Path(t.base_dir) / t.location).resolve()
        if not where.is_relative_to(base) or not where.is_file():
            raise UserError(
                f"ONNX model {path}: initializer {name!r}",
                f"has external data at {t.location!r}, not a file in the model's folder",
                "external data beside the model (re-export it)",
            )
        end = (t.offset or 0) + (t.length if t.length is not None else 0)
        if end > where.stat().st_size:
            raise UserError(
                f"ONNX model {path}: initializer {name!r}",
                f"reads bytes up to {end} of {t.location!r} ({where.stat().st_size} bytes)",
                "external data within its file (re-export it)",
            )


def run_passes(model: ir.Model, passes: list[tuple[str, PassBase]]) -> ir.Model:
    verify = os.environ.get("CSCOMPILE_VERIFY", "1") != "0"
    done: list[str] = []
    for name, p in passes:
        try:
            # onnx-ir's __call__ checks requires/ensures around call(); call() alone skips them
            model = (p(model) if verify else p.call(model)).model
        except UserError:
            raise
        except Exception as exc:
            raise CscompileError(f"pass {name} failed after [{', '.join(done) or 'none'}]: {exc}") from exc
        done.append(name)
    return model


def analyze(path: Path | str, block_size: int = 1, target: str = "cpu") -> tuple[ir.Model, UnitMap]:
    """Canonicalize ``path`` and partition it into units for ``target``."""
    model = load_model(path)
    model = run_passes(
        model,
        [
            ("canonicalize", CanonicalizePass()),
            # discovery orders layers by node position: needs the topological sort above
            ("discover-units", DiscoverUnitsPass(block_size)),
            # alignment rebuilds the units with the target's block size, after discovery
            ("align", AlignPass(block_size, target)),
        ],
    )
    return model, model.meta[META_KEY]
