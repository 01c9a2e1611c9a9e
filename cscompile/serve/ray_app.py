"""Ray Serve: the same OpenAI app (:func:`cscompile.serve.app.create_app`) on N replicas.

Each replica loads the bundle once, when Ray starts it (a replica is ready only once its model
is), and serves the unchanged routes through Ray Serve's ASGI ingress (``serve.ingress`` with a
builder function, evaluated on the replica). Responses carry ``x-cscompile-replica`` (the Ray
replica's id), so an operator can see which replica answered. Needs the ``ray`` extra.

Three ways in (docs/usage.md "Serve on Ray"):

- ``cscompile serve smol.csb --ray --replicas 2`` (a local Ray, or the cluster in ``RAY_ADDRESS``);
- ``serve run cscompile.serve.ray_app:app_builder bundle=/models/smol.csb replicas=2`` (any cluster);
- a RayService on Kubernetes (KubeRay) whose ``import_path`` is the same builder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cscompile.errors import UserError

#: the Ray Serve application and deployment name
NAME = "cscompile"
REPLICA_HEADER = b"x-cscompile-replica"


def with_replica_header(app: Any, replica: str) -> Callable[..., Any]:
    """``app`` (ASGI) with ``x-cscompile-replica: replica`` added to every HTTP response."""
    value = replica.encode("latin-1", "replace")

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, value)]}
            await send(message)

        return await app(scope, receive, send_with_header)

    return wrapped


def build_app(
    bundle: str | Path,
    *,
    replicas: int = 1,
    threads: int | None = None,
    num_cpus: float | None = None,
    engine: str | None = None,
    model_name: str | None = None,
    **options: Any,
) -> Any:
    """A Ray Serve application: ``replicas`` copies of the OpenAI app over ``bundle``.

    ``bundle`` must be readable at the same path on every node that runs a replica (a shared
    volume, or baked into the image). Each replica reserves ``num_cpus`` (default: ``threads``,
    else 1) and runs the engine with ``threads`` intra-op threads. ``options`` go to
    :func:`cscompile.serve.app.create_app` (``max_running``, ``max_queue``, ``max_tokens``, ...).
    """
    from cscompile.errors import require

    serve = require("ray.serve", "ray", "serving on Ray")
    for module in ("starlette", "prometheus_client"):
        require(module, "serve", "serving a bundle")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise UserError("--replicas", repr(replicas), "an integer >= 1")
    cpus = float(num_cpus if num_cpus is not None else (threads or 1))
    if not cpus > 0:
        raise UserError("num_cpus", repr(num_cpus), "a number of CPUs > 0 per replica")
    path = str(Path(bundle).expanduser().resolve())
    name = model_name or Path(path).name.removesuffix(".csb") or "model"

    def asgi_app() -> Any:  # runs on each replica, once
        from ray import serve as ray_serve

        from cscompile.runtime import load
        from cscompile.serve.app import create_app

        model = load(path, threads, engine=engine)
        replica = ray_serve.get_replica_context().replica_id.unique_id
        return with_replica_header(create_app(model, model_name=name, **options), replica)

    ingress = serve.ingress(asgi_app)()
    deployment = serve.deployment(
        ingress, name=NAME, num_replicas=replicas, ray_actor_options={"num_cpus": cpus}
    )
    return deployment.bind()


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run cscompile.serve.ray_app:app_builder bundle=PATH [replicas=N] [threads=T]
    [engine=E] [model_name=M] [max_running=R] [max_queue=Q] [max_tokens=K]`` and a RayService's
    ``import_path`` (its ``args``).
    """
    ints = ("replicas", "threads", "max_running", "max_queue", "max_tokens", "max_prompt_tokens")
    known = {"bundle", "engine", "model_name", "num_cpus", *ints}
    unknown = sorted(set(args) - known)
    if unknown:
        raise UserError("ray_app args", f"'{unknown[0]}'", f"one of {', '.join(sorted(known))}")
    if "bundle" not in args:
        raise UserError("ray_app args", "no bundle", "bundle=PATH (a .csb file or bundle directory)")
    kw: dict[str, Any] = {}
    for key, value in args.items():
        if key in ints:
            try:
                kw[key] = int(value)
            except (TypeError, ValueError):
                raise UserError(f"ray_app {key}", repr(value), "an integer") from None
        elif key == "num_cpus":
            try:
                kw[key] = float(value)
            except (TypeError, ValueError):
                raise UserError("ray_app num_cpus", repr(value), "a number") from None
        elif key != "bundle":
            kw[key] = str(value)
    return build_app(args["bundle"], **kw)


def run(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """``cscompile serve --ray``: connect to Ray (``RAY_ADDRESS``, else a local instance), run
    :func:`build_app` on ``host:port``, and keep it up until Ctrl-C / SIGTERM, then shut Serve down.
    """
    import os
    import signal
    import threading

    from cscompile.errors import require

    ray = require("ray", "ray", "serving on Ray")
    app = build_app(bundle, **options)  # checked before Ray starts
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=NAME, route_prefix="/")
        print(f"serving {bundle} on http://{host}:{port} (Ray Serve, Ctrl-C to stop)", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
