"""``cscompile.serve.ray_app`` without a Ray cluster: its arguments are refused in one line, and the
replica header is added to HTTP responses only (the cluster test is tests/integration/test_ray_serve.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cscompile.cli.main import EXIT_USER, main
from cscompile.errors import UserError
from cscompile.serve.ray_app import app_builder, with_replica_header


@pytest.mark.parametrize(
    "args,match",
    [
        ({"replicas": "2"}, "no bundle"),
        ({"bundle": "x.csb", "replica": "2"}, "'replica'"),
        ({"bundle": "x.csb", "replicas": "two"}, "ray_app replicas | 'two'"),
        ({"bundle": "x.csb", "num_cpus": "many"}, "ray_app num_cpus | 'many'"),
    ],
)
def test_app_builder_refuses_bad_args_before_ray(args, match):
    with pytest.raises(UserError, match=match):
        app_builder(args)


def test_replicas_without_ray_is_a_one_line_error(tmp_path, capsys):
    bundle = tmp_path / "b.csb"
    bundle.write_bytes(b"")
    code = main(["serve", str(bundle), "--replicas", "2"])
    err = capsys.readouterr().err
    assert code == EXIT_USER and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --replicas | 2 without --ray.")


def test_replica_header_is_added_to_http_responses_only():
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
            )
            await send({"type": "http.response.body", "body": b"ok"})
        else:
            await send({"type": "lifespan.startup.complete"})

    async def send(message: dict[str, Any]) -> None:
        seen.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    wrapped = with_replica_header(app, "r1")
    asyncio.run(wrapped({"type": "http"}, receive, send))
    asyncio.run(wrapped({"type": "lifespan"}, receive, send))
    assert seen[0]["headers"] == [(b"content-type", b"text/plain"), (b"x-cscompile-replica", b"r1")]
    assert seen[1] == {"type": "http.response.body", "body": b"ok"}
    assert seen[2] == {"type": "lifespan.startup.complete"}
