"""``cscompile serve``: an OpenAI-compatible HTTP server over a bundle."""

from __future__ import annotations

import click


@click.command("serve")
@click.argument("bundle")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface)."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--model-name", default=None, help="The model id clients send (default: the bundle's file name)."
)
@click.option("--max-running", default=4, show_default=True, type=click.IntRange(1, None),
              help="Sequences generated at once (interleaved token by token).")  # fmt: skip
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(0, None),
              help="Requests waiting for a slot; beyond that a request gets 429 with Retry-After.")  # fmt: skip
@click.option("--max-tokens", default=None, type=click.IntRange(1, None),
              help="Most new tokens per request (default: up to the context).")  # fmt: skip
@click.option("--max-prompt-tokens", default=None, type=click.IntRange(1, None),
              help="Longest prompt accepted, in tokens (default: the context).")  # fmt: skip
@click.option("--drain-timeout", default=30.0, show_default=True, type=click.FloatRange(0, None),
              help="On Ctrl-C / SIGTERM: seconds running requests get to finish.")  # fmt: skip
@click.option(
    "--threads", type=click.IntRange(1, None), default=None, help="Intra-op threads (default: all cores)."
)
@click.option("--engine", default=None, help="Bundle engine to serve (default: as `cscompile run`).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))  # fmt: skip
@click.option("--ray", "use_ray", is_flag=True,
              help="Serve through Ray Serve (the ray extra): a local Ray, or the cluster in RAY_ADDRESS.")  # fmt: skip
@click.option("--replicas", default=None, type=click.IntRange(1, None),
              help="With --ray: replicas of the app, each loading the bundle once (default 1).")  # fmt: skip
def serve_cmd(bundle: str, host: str, port: int, model_name: str | None, max_running: int, max_queue: int,
              max_tokens: int | None, max_prompt_tokens: int | None, drain_timeout: float, threads: int | None,
              engine: str | None, log_level: str, use_ray: bool, replicas: int | None) -> None:  # fmt: skip
    """Serve BUNDLE (a .csb file or bundle directory) over an OpenAI-compatible API.

    Endpoints: /v1/models, /v1/completions, /v1/chat/completions (stream: true sends server-sent
    events), /health, /metrics (Prometheus) and a chat page at /.
    """
    from pathlib import Path

    from cscompile.errors import UserError
    from cscompile.runtime import is_bundle
    from cscompile.serve import serve

    if replicas is not None and not use_ray:
        raise UserError(
            "--replicas", f"{replicas} without --ray", "--ray --replicas N (one process serves without Ray)"
        )
    if not is_bundle(bundle):
        raise UserError(
            "bundle", f"'{bundle}' is not a bundle", "a .csb file or a bundle directory (cscompile build)"
        )
    if use_ray:
        from cscompile.serve.ray_app import run

        run(Path(bundle), host, port, replicas=replicas or 1, threads=threads, engine=engine, model_name=model_name,
            max_running=max_running, max_queue=max_queue, max_tokens=max_tokens,
            max_prompt_tokens=max_prompt_tokens)  # fmt: skip
        return
    serve(Path(bundle), host, port, model_name=model_name, max_running=max_running, max_queue=max_queue,
          max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, drain_timeout=drain_timeout,
          threads=threads, engine=engine, log_level=log_level)  # fmt: skip
