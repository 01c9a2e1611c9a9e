"""Serve a bundle over HTTP: an OpenAI-compatible API, health, Prometheus metrics and a chat page.

>>> from cscompile.serve import create_app, serve
>>> app = create_app("smollm2.csb", max_running=4)  # doctest: +SKIP  (any ASGI server runs it)
>>> serve("smollm2.csb", port=8000)  # doctest: +SKIP  (uvicorn, until Ctrl-C)

Needs the ``serve`` extra (starlette, uvicorn, prometheus_client), imported when an app is
made, so the runtime does not depend on it. This package imports only the runtime, never the
compiler.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve"]


def create_app(model_or_bundle_path: Any, **options: Any) -> Any:
    """See :func:`cscompile.serve.app.create_app`."""
    from cscompile.errors import require

    for module in ("starlette", "prometheus_client"):
        require(module, "serve", "serving a bundle")
    from cscompile.serve.app import create_app as make

    return make(model_or_bundle_path, **options)


def serve(bundle: Any, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """See :func:`cscompile.serve.app.serve`."""
    from cscompile.errors import require

    for module in ("starlette", "prometheus_client", "uvicorn"):
        require(module, "serve", "cscompile serve")
    from cscompile.serve.app import serve as run

    run(bundle, host, port, **options)
