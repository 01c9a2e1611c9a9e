"""The engine registry: one loader per engine kind, each reading only through the ``Bundle`` API.

:func:`cscompile.runtime.load` picks the engine (the one named, a front point for a target, the
native one by default, else dense) and calls ``LOADERS[kind]``; every loader returns a
:class:`~cscompile.decode.session.Session`. Loaders import their backend lazily, so a process
running the native engine never imports ONNX Runtime, and the runtime imports no build step
(an import-linter contract in pyproject.toml checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cscompile.errors import UserError

if TYPE_CHECKING:
    from cscompile.bundle import Bundle, Engine
    from cscompile.decode.session import Session


@dataclass(frozen=True)
class LoadRequest:
    """What a loader gets: the verified bundle, the engine chosen, and the caller's settings."""

    bundle: Bundle
    engine: Engine
    threads: int | None
    spinning: bool
    switching: bool  # run the switching runtime over the engine's family (``engine="motifs"``)
    explicit: bool  # the caller named this engine (or a target picked it), not the default
    front: dict[str, Any] | None  # the bundle's ``pareto`` section, when a front point is involved
    context_length: int | None
    head: str = "auto"  # the native engine's LM head: auto (sensed when the bundle has one), full, sensed


def _dense(req: LoadRequest) -> Session:
    from cscompile.decode.session import DecoderSession

    return DecoderSession(req.engine.path, threads=req.threads, spinning=req.spinning)


def _native(req: LoadRequest) -> Session:
    from cscompile.native.engine import NativeSession, load_weights, unavailable

    b, e = req.bundle, req.engine
    if req.explicit and (why := unavailable()) is not None:  # asked for (or a front point)
        import warnings

        warnings.warn(f"bundle {b.source}: running the native engine {e.name!r} anyway: {why}", stacklevel=4)
    weights = load_weights(b.root, b.read_json(e.file), str(b.source))
    front = req.front
    if front is None and ("search" in e.params or "switch" in e.params) and "pareto" in b.sections:
        front = b.read_json(b.sections["pareto"])  # a point named with --engine
    if "switch" in e.params:  # motifs of the native front switched per token
        from cscompile.runtime.front import load_switch_point

        return load_switch_point(  # type: ignore[no-any-return]
            weights, e.params, front, b.engines, str(b.source), b.root, req.threads, req.context_length
        )
    if "search" in e.params:  # a point of the native front: derived from the one weights file
        from cscompile.runtime.front import load_point

        weights = load_point(weights, e.params, front, str(b.source), b.root)
    sensed = None
    if req.head != "full" and "vocab" in b.sections and "search" not in e.params:  # the build's own head
        from cscompile.native.engine import head_as_planes
        from cscompile.native.vocab import load_vocab

        sensed = load_vocab(b.root, b.read_json(b.sections["vocab"]), weights, str(b.source))
        weights = head_as_planes(weights)  # the preview is the head's high bit plane
    elif req.head == "sensed":
        raise UserError(
            "--head sensed",
            f"engine {e.name!r} of {b.source} has no sensed vocabulary head",
            "a bundle built with the native engine and --sensed-head auto/on (its own head, not a front point)",
        )
    session = NativeSession(weights, req.threads, context_length=req.context_length, sensed=sensed)
    session.sensed_sampling = req.head == "sensed"  # asked for: sampling uses it too (approximate)
    return session


def _motif(req: LoadRequest) -> Session:
    from cscompile.bundle import BundleError
    from cscompile.motifs.load import has_motifs, load_switching

    b, e = req.bundle, req.engine
    if not has_motifs(b.root):
        raise BundleError(
            f"bundle {b.source}: engine {e.name!r}",
            "is a motif engine but the bundle has no compiled motif family (motifs/engine.json)",
            "a bundle built with `cscompile build --motifs`",
        )
    switching = load_switching(b.root, req.threads, b.read_npz)
    return switching if req.switching else switching.only(e.name.removeprefix("motif-"))


def _trt(req: LoadRequest) -> Session:
    from cscompile.trt.load import trt_session

    b = req.bundle
    build = b.read_json(b.sections["build"]) if "build" in b.sections else {}
    # TensorRT bundles run on the GPU: the engines alone, or the switching controller on them
    return trt_session(b.root, build if isinstance(build, dict) else {}, str(b.source), req.switching)  # type: ignore[no-any-return]


#: engine kind (manifest ``engines[].kind``) → its loader
LOADERS: dict[str, Callable[[LoadRequest], Session]] = {
    "dense": _dense,
    "native": _native,
    "motif": _motif,
    "trt": _trt,
}


def load_session(req: LoadRequest) -> Session:
    """The session of ``req.engine`` from its kind's loader."""
    loader = LOADERS.get(req.engine.kind)
    if loader is None:
        raise UserError(
            f"bundle {req.bundle.source}: engine {req.engine.name!r}",
            f"has the kind {req.engine.kind!r}",
            f"one of {', '.join(sorted(LOADERS))}",
        )
    return loader(req)
