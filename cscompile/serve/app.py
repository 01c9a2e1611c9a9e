"""The ASGI app: OpenAI-compatible completions and chat over a bundle, health, metrics, a chat page.

``create_app(path_or_model)`` returns a Starlette app. Given a path, the bundle is loaded in a
worker thread after startup, and every API call answers 503 until it is ready. Requests are
checked (:mod:`cscompile.serve.protocol`), tokenized, then queued on the
:class:`~cscompile.serve.scheduler.Scheduler`, which runs them on one engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from cscompile.errors import UserError
from cscompile.runtime import GenerationConfig
from cscompile.serve.metrics import ServerMetrics
from cscompile.serve.protocol import (
    CHAT_KEYS,
    COMPLETION_KEYS,
    APIError,
    Job,
    Limits,
    chat_text,
    check_keys,
    check_model,
    finish_reason,
    new_tokens,
    prompt_ids,
    sampling,
    stream_flags,
)
from cscompile.serve.scheduler import NotAccepting, QueueFull, Scheduler, Sequence

log = logging.getLogger("cscompile.serve")
#: a text no token makes (NULs): where a streamed event's text goes in its encoded frame
_MARK = "\x00cscompile-text\x00"
#: response ids need to be unique, not secret: a PRNG seeded once (uuid4 reads os.urandom per
#: request, which took ~0.7 ms a call on the shared VM this was profiled on)
_ids = random.Random()


def _request_id() -> str:
    return f"{_ids.getrandbits(128):032x}"


class ServerState:
    """The model, its scheduler and metrics; ``model is None`` while loading (or after a failed load)."""

    def __init__(self, model_id: str, limits: Limits, max_running: int, max_queue: int) -> None:
        self.model_id = model_id
        self.limits = limits
        self.max_running = max_running
        self.max_queue = max_queue
        self.model: Any = None
        self.scheduler: Scheduler | None = None
        self.load_error: BaseException | None = None
        self.metrics = ServerMetrics()
        self.created = int(time.time())

    def attach(self, model: Any) -> None:
        self.model = model
        self.scheduler = Scheduler(model, self.max_running, self.max_queue, self.metrics.hooks())
        self.metrics.watch(self.scheduler)

    @property
    def context_length(self) -> int | None:
        return getattr(self.model, "context_length", None)

    def ready(self) -> Scheduler:
        """The scheduler, or the 503 that says why there is none."""
        if self.load_error is not None:
            raise APIError(503, f"The model failed to load: {self.load_error}", type="server_error",
                           code="model_load_failed")  # fmt: skip
        if self.scheduler is None:
            raise APIError(503, "The model is loading; retry shortly.", type="server_error", code="loading",
                           headers={"Retry-After": "1"})  # fmt: skip
        if not self.scheduler.accepting:
            raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
        return self.scheduler


def _model_id(source: Any) -> str:
    if isinstance(source, (str, Path)):
        name = Path(source).expanduser().name
        return name.removesuffix(".csb") or "model"
    path = getattr(source, "path", None)
    return _model_id(path) if path is not None else "model"


def create_app(
    model_or_bundle_path: Any,
    *,
    model_name: str | None = None,
    max_running: int = 4,
    max_queue: int = 16,
    max_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
    threads: int | None = None,
    engine: str | None = None,
    drain_timeout: float | None = 30.0,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> Any:
    """An OpenAI-compatible ASGI app serving a bundle (a path, loaded after startup) or a loaded model.

    ``max_running`` sequences are generated at once (interleaved per token), ``max_queue`` more
    wait; beyond that a request gets 429 with ``Retry-After``. ``max_tokens`` and
    ``max_prompt_tokens`` bound every request. On shutdown, running and queued requests are
    given ``drain_timeout`` seconds to finish. ``on_load_failure`` is called (from the event
    loop) if loading the bundle fails, e.g. to stop the server.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    if max_running < 1:
        raise UserError("--max-running", str(max_running), "an integer >= 1")
    if max_queue < 0:
        raise UserError("--max-queue", str(max_queue), "an integer >= 0")
    loads = isinstance(model_or_bundle_path, (str, Path))
    state = ServerState(
        model_name or _model_id(model_or_bundle_path),
        Limits(max_tokens, max_prompt_tokens),
        max_running,
        max_queue,
    )
    if not loads:
        state.attach(model_or_bundle_path)

    class _ClosingStream(StreamingResponse):
        """Closes its body iterator however the response ends, so a vanished client's sequence is cancelled."""

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()

    def error_response(exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def counted(endpoint: str, fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:  # fmt: skip
        async def handler(request: Request) -> Response:
            try:
                response = await fn(request)
            except APIError as exc:
                response = error_response(exc)
            state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
            return response

        return handler

    async def read_body(request: Request, keys: set[str]) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "The request body is not valid JSON.") from None
        body = check_keys(body, keys)
        check_model(body, state.model_id)
        return body

    def job(body: dict[str, Any], ids: list[int], token_keys: tuple[str, ...], default: int | None) -> Job:
        n = new_tokens(body, token_keys, len(ids), state.context_length, state.limits, default)
        stream, include_usage = stream_flags(body)
        cfg = GenerationConfig(max_new_tokens=n, **sampling(body))
        try:
            cfg.validate()
        except UserError as exc:
            raise APIError(400, str(exc), param=exc.subject) from None
        return Job(ids, cfg, stream, include_usage)

    def submit(sched: Scheduler, j: Job) -> Sequence:
        try:
            seq = sched.submit(j.ids, j.config)
        except QueueFull:
            raise APIError(429, f"The server is at capacity ({sched.max_running} running, {sched.max_queue} "
                           "queued); retry later.", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None  # fmt: skip
        except NotAccepting:
            raise APIError(
                503, "The server is shutting down.", type="server_error", code="shutting_down"
            ) from None
        state.metrics.prompt_tokens.inc(len(j.ids))
        return seq

    async def collect(request: Request, seq: Sequence) -> str:
        """The whole answer; a client that disconnects first cancels its sequence."""

        async def gather() -> str:
            return "".join([ev.text async for ev in seq.events()])

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                seq.cancel()
        if not work.done():
            raise APIError(499, "The client closed the request.", type="client_closed")
        try:
            return work.result()
        except UserError as exc:
            raise APIError(400, str(exc), param=exc.subject) from None
        except Exception as exc:
            log.exception("generation failed")
            raise APIError(
                500, f"Generation failed: {type(exc).__name__}: {exc}", type="server_error"
            ) from None

    def usage(j: Job, seq: Sequence) -> dict[str, int]:
        out = seq.stats.new_tokens
        return {"prompt_tokens": len(j.ids), "completion_tokens": out, "total_tokens": len(j.ids) + out}

    def fingerprint() -> str | None:
        h = getattr(state.model, "content_hash", None)
        return f"cscompile-{h[:16]}" if isinstance(h, str) else None

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def text_events(chunk: Callable[[str | None, str | None], dict[str, Any]]) -> Callable[[str], str]:
        """The SSE event of a text piece, as ``sse(chunk(text, None))`` spells it, by filling the
        piece into the event's text once encoded (per token, only the piece is JSON-encoded).
        """
        quoted = json.dumps(_MARK, ensure_ascii=False)
        head, sep, tail = sse(chunk(_MARK, None)).partition(quoted)
        if not sep or quoted in tail:  # cannot happen for the shapes above; keep the slow path
            return lambda text: sse(chunk(text, None))
        return lambda text: head + json.dumps(text, ensure_ascii=False) + tail

    async def stream_events(
        j: Job, seq: Sequence, chunk: Callable[[str | None, str | None], dict[str, Any]], base: dict[str, Any],
        first: dict[str, Any] | None,
    ) -> AsyncIterator[str]:  # fmt: skip
        piece = text_events(chunk)
        try:
            if first is not None:
                yield sse(first)
            async for ev in seq.events():
                if ev.text:
                    yield piece(ev.text)
            yield sse(chunk(None, finish_reason(seq.stats.stop_reason)))
            if j.include_usage:
                yield sse({**base, "choices": [], "usage": usage(j, seq)})
            yield "data: [DONE]\n\n"
        except Exception as exc:  # the status line is gone: an error event in OpenAI's shape
            err = APIError(400, str(exc), param=exc.subject) if isinstance(exc, UserError) else None
            if err is None:
                log.exception("generation failed")
                err = APIError(500, f"Generation failed: {type(exc).__name__}: {exc}", type="server_error")
            yield sse(err.body())
        finally:
            seq.cancel()  # no-op once finished; else the client left: free the slot

    # -- endpoints -------------------------------------------------------------------------------
    async def completions(request: Request) -> Response:
        sched = state.ready()
        body = await read_body(request, COMPLETION_KEYS)
        if "prompt" not in body:
            raise APIError(400, "'prompt' is required.", param="prompt")
        j = job(body, prompt_ids(body["prompt"], state.model.tokenizer), ("max_tokens",), 16)
        seq = submit(sched, j)
        rid, created = f"cmpl-{_request_id()}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": state.model_id,
                "system_fingerprint": fingerprint()}  # fmt: skip

        def chunk(text: str | None, reason: str | None) -> dict[str, Any]:
            return {
                **base,
                "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}],
            }

        if j.stream:
            return _ClosingStream(stream_events(j, seq, chunk, base, None), media_type="text/event-stream")
        text = await collect(request, seq)
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason(seq.stats.stop_reason),
        }
        return JSONResponse({**base, "choices": [choice], "usage": usage(j, seq)})

    async def chat_completions(request: Request) -> Response:
        sched = state.ready()
        body = await read_body(request, CHAT_KEYS)
        tok = state.model.tokenizer
        ids = tok.encode(chat_text(body.get("messages"), tok))
        j = job(body, ids, ("max_completion_tokens", "max_tokens"), None)
        seq = submit(sched, j)
        rid, created = f"chatcmpl-{_request_id()}", int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                "system_fingerprint": fingerprint()}  # fmt: skip

        def chunk(text: str | None, reason: str | None) -> dict[str, Any]:
            delta = {"content": text} if text is not None else {}
            return {
                **base,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
            }

        if j.stream:
            first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}  # fmt: skip
            return _ClosingStream(stream_events(j, seq, chunk, base, first), media_type="text/event-stream")
        text = await collect(request, seq)
        message = {"role": "assistant", "content": text}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason(seq.stats.stop_reason),
        }
        return JSONResponse(
            {**base, "object": "chat.completion", "choices": [choice], "usage": usage(j, seq)}
        )

    async def models(request: Request) -> Response:
        sched = state.ready()
        eng = getattr(state.model, "engine", None)
        card = {
            "id": state.model_id,
            "object": "model",
            "created": state.created,
            "owned_by": "cscompile",
            "engine": getattr(eng, "name", None),
            "context_length": state.context_length,
            "max_running_sequences": state.max_running,
            "max_queued_sequences": state.max_queue,
            # how sequences share the engine (docs/design.md "Serving"): batched decode steps or not
            "scheduling": sched.describe(),
            "batched_decode": sched.batched,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        try:
            state.ready()
        except APIError as exc:
            return JSONResponse(
                {"status": exc.code, "message": exc.message}, status_code=503, headers=exc.headers
            )
        sched = state.scheduler
        batched = sched is not None and sched.batched
        return JSONResponse({"status": "ok", "model": state.model_id, "batched_decode": batched})

    async def metrics(request: Request) -> Response:
        data, content_type = state.metrics.render()
        return Response(data, media_type=content_type)

    async def index(request: Request) -> Response:
        from importlib.resources import files

        return HTMLResponse((files("cscompile.serve") / "static" / "index.html").read_text(encoding="utf-8"))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(
            APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind)
        )

    # -- lifetime ---------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        loading: asyncio.Task[Any] | None = None
        if loads:
            from cscompile.runtime import load

            async def load_model() -> None:
                try:
                    model = await asyncio.to_thread(load, model_or_bundle_path, threads, engine=engine)
                except Exception as exc:
                    state.load_error = exc
                    if on_load_failure is not None:
                        on_load_failure(exc)
                    else:
                        log.error("loading %s failed: %s", model_or_bundle_path, exc)
                    return
                state.attach(model)
                log.info("serving %s as '%s'", model_or_bundle_path, state.model_id)

            loading = asyncio.ensure_future(load_model())
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                await loading  # a load cannot be interrupted midway; let it finish, then release it
            if state.scheduler is not None:
                drained = await asyncio.to_thread(state.scheduler.drain, drain_timeout)
                if not drained:
                    log.warning("shutdown: cancelled requests still running after %s s", drain_timeout)
                state.scheduler.close()
            if loads and state.model is not None:
                state.model.close()

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", counted("models", models)),
        Route("/v1/completions", counted("completions", completions), methods=["POST"]),
        Route("/v1/chat/completions", counted("chat_completions", chat_completions), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.server = state
    return app


def serve(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          drain_timeout: float | None = 30.0, **options: Any) -> None:  # fmt: skip
    """Serve ``bundle`` with uvicorn until interrupted (SIGINT/SIGTERM drain running requests first).

    ``options`` go to :func:`create_app`. A bundle that fails to load stops the server and is
    raised as its one-line error.
    """
    from cscompile.errors import require

    uvicorn = require("uvicorn", "serve", "cscompile serve")
    failure: list[BaseException] = []
    server: Any = None

    def stop(exc: BaseException) -> None:
        failure.append(exc)
        server.should_exit = True

    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:  # bound here, so a taken port is one line (uvicorn would exit with its own log)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError("--host/--port", f"{host}:{port} cannot be bound ({exc.strerror or exc})",
                        "a free port on an address of this machine") from None  # fmt: skip
    app = create_app(bundle, drain_timeout=drain_timeout, on_load_failure=stop, **options)
    graceful = None if drain_timeout is None else max(1, round(drain_timeout))
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful
    )
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    logging.getLogger("uvicorn.error").info(  # uvicorn's logger: configured by uvicorn.Config
        "serving %s at http://%s:%d (OpenAI API under /v1, chat page at /)",
        bundle,
        shown,
        sock.getsockname()[1],
    )
    with sock:
        server.run(sockets=[sock])
    if failure:
        raise failure[0]
