"""One engine thread that interleaves the running sequences token by token, and a bounded queue.

Each turn of the loop admits waiting sequences up to ``max_running``, then advances every running
sequence by one token. An engine that batches (the native one: ``batch_limit`` > 1) advances them
all in one call per turn (continuous batching: sequences join and leave between steps); a newly
admitted sequence's prompt is prefilled in its own calls, ``prefill_chunk`` tokens per turn, so
the running streams keep going while a long prompt goes in. Other engines step one sequence per
call (``next()`` on its :meth:`~cscompile.runtime.TextModel.stream`; the first call is its
prefill). Every sequence owns its KV cache, RNG and detokenizer, so its tokens are exactly those
it would get alone. Tokens are handed to the asyncio event loop with ``call_soon_threadsafe``.

Cancelling a sequence (client gone, shutdown) is seen between two tokens: its stream is closed,
which drops its KV cache, and its slot goes to the next waiting sequence. Pure Python and
asyncio: no web framework here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from cscompile.runtime import Generation, GenerationConfig, GenerationStats, TokenEvent


class Streamer(Protocol):
    def stream(
        self,
        prompt: str | list[int],
        config: GenerationConfig | None = None,
        chat: bool = False,
        stats: GenerationStats | None = None,
    ) -> Iterator[TokenEvent]: ...


class Batcher(Streamer, Protocol):
    """A model whose engine advances several generations in one call (TextModel, BundleModel)."""

    @property
    def batch_limit(self) -> int: ...

    @property
    def prefill_chunk(self) -> int | None: ...

    def begin(self, prompt: str | list[int], config: GenerationConfig | None = None, chat: bool = False,
              stats: GenerationStats | None = None) -> Generation: ...  # fmt: skip

    def step_batch(self, gens: list[Generation]) -> list[list[TokenEvent]]: ...


def batch_limit(model: Any) -> int:
    """How many sequences one engine call of ``model`` advances (1: one at a time)."""
    if not all(callable(getattr(model, name, None)) for name in ("begin", "step_batch")):
        return 1
    n = getattr(model, "batch_limit", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


class QueueFull(Exception):
    """Every running slot and every queue place is taken."""


class NotAccepting(Exception):
    """The scheduler is shutting down (draining) or closed."""


@dataclass
class Hooks:
    """Callbacks from the engine thread (metrics); all optional."""

    first_token: Callable[[float], None] = lambda seconds: None  # arrival -> first token
    inter_token: Callable[[float], None] = lambda seconds: None  # between two tokens of a sequence
    token: Callable[[], None] = lambda: None


@dataclass(eq=False)
class Sequence:
    """One request's generation: token ids in, :class:`TokenEvent` s out on the event loop."""

    ids: list[int]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    stats: GenerationStats = field(default_factory=GenerationStats)
    arrived: float = field(default_factory=time.perf_counter)
    _events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _it: Iterator[TokenEvent] | None = None
    _gen: Generation | None = None  # batched engines: the generation, stepped by the scheduler
    _last: float | None = None
    finished: bool = False

    def cancel(self) -> None:
        """Stop this sequence at its next token boundary (or before it starts)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone
            self._cancel.set()

    async def events(self) -> AsyncIterator[TokenEvent]:
        """The sequence's tokens; leaving the loop early (or being cancelled) cancels the sequence."""
        try:
            while True:
                kind, value = await self._events.get()
                if kind == "token":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            if not self.finished:
                self.cancel()


class Scheduler:
    """Runs sequences of ``model`` on one engine thread, ``max_running`` interleaved, ``max_queue`` waiting."""

    def __init__(self, model: Streamer, max_running: int = 4, max_queue: int = 16, hooks: Hooks | None = None) -> None:  # fmt: skip
        if max_running < 1 or max_queue < 0:
            raise ValueError(f"max_running {max_running} must be >= 1 and max_queue {max_queue} >= 0")
        self.model = model
        self.max_running = max_running
        self.max_queue = max_queue
        self.hooks = hooks or Hooks()
        #: sequences one engine call advances (1: one call per sequence and token)
        self.batch = batch_limit(model)
        chunk = getattr(model, "prefill_chunk", None) if self.batch > 1 else None
        self.prefill_chunk: int | None = chunk if isinstance(chunk, int) and chunk > 0 else None
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._cv = threading.Condition()
        self._accepting = True
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="cscompile-engine", daemon=True)
        self._thread.start()

    # -- state (read from any thread) ------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return sum(not seq.cancelled for seq in list(self._waiting))

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def batched(self) -> bool:
        """Whether running sequences share one engine call per token (continuous batching)."""
        return self.batch > 1

    def describe(self) -> str:
        """How sequences are scheduled, in words (the server's ``/v1/models``)."""
        if not self.batched:
            return "one engine; running sequences interleaved token by token, one sequence per step (no batching)"
        chunk = f"in chunks of {self.prefill_chunk} tokens" if self.prefill_chunk else "whole"
        return (f"one engine; running sequences batched: one decode call per token for all of them (up to "
                f"{self.batch} per call), joining and leaving between steps; prompts prefilled in their own "
                f"calls, {chunk}, between steps")  # fmt: skip

    # -- the event loop's side ---------------------------------------------------------------
    def submit(self, ids: list[int], config: GenerationConfig) -> Sequence:
        """Queue a generation (call from the event loop). Raises QueueFull or NotAccepting."""
        seq = Sequence(list(ids), config, asyncio.get_running_loop())
        with self._cv:
            if not self._accepting:
                raise NotAccepting()
            self._purge()
            # the engine admits between tokens, so a sequence waits briefly even when a slot is free
            if len(self._waiting) + len(self._running) >= self.max_running + self.max_queue:
                raise QueueFull()
            self._waiting.append(seq)
            self._cv.notify()
        return seq

    def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting; wait until every queued and running sequence has finished. True if all did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._accepting = False
            while self._waiting or self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop accepting, cancel what is left, and stop the engine thread."""
        with self._cv:
            self._accepting = False
            for seq in [*self._waiting, *self._running]:
                seq.cancel()
            self._stopped = True
            self._cv.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _purge(self) -> None:
        """Drop waiting sequences whose client left (holding ``_cv``): they never held a cache."""
        if any(seq.cancelled for seq in self._waiting):
            for seq in [s for s in self._waiting if s.cancelled]:
                seq.finished = True
                seq._put("done", seq.stats)
            self._waiting = deque(s for s in self._waiting if not s.cancelled)
            self._cv.notify_all()

    # -- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stopped and not self._running and not self._waiting:
                    return
                self._purge()
                while self._waiting and len(self._running) < self.max_running:
                    self._running.append(self._waiting.popleft())
                turn = list(self._running)
            if self.batched:
                self._turn(turn)
            else:
                for seq in turn:
                    self._step(seq)
                del seq
            del turn  # not held while the thread waits: a finished sequence is freed with its request

    def _finish(self, seq: Sequence, kind: str, value: Any) -> None:
        """Free the sequence's slot and KV cache, then tell its consumer."""
        seq.finished = True
        if seq._it is not None:
            close = getattr(seq._it, "close", None)
            if close is not None:
                close()  # the generator's frame, KV cache included, is dropped
            seq._it = None
        seq._gen = None  # its KV cache goes with it
        with self._cv:
            self._running.remove(seq)
            self._cv.notify_all()
        seq._put(kind, value)

    def _step(self, seq: Sequence) -> None:
        """Advance ``seq`` by one token, or finish it (done, failed or cancelled)."""
        try:
            if seq.cancelled:
                return self._finish(seq, "done", seq.stats)
            if seq._it is None:
                seq._it = self.model.stream(seq.ids, seq.config, stats=seq.stats)
            ev = next(seq._it)
        except StopIteration:
            return self._finish(seq, "done", seq.stats)
        except Exception as exc:  # the request fails, the server goes on
            return self._finish(seq, "error", exc)
        self._emit(seq, ev)

    def _emit(self, seq: Sequence, ev: TokenEvent) -> None:
        if ev.token_id >= 0:
            now = time.perf_counter()
            if seq._last is None:
                self.hooks.first_token(now - seq.arrived)
            else:
                self.hooks.inter_token(now - seq._last)
            seq._last = now
            self.hooks.token()
        seq._put("token", ev)

    def _emit_all(self, seq: Sequence, events: list[TokenEvent]) -> None:
        """Hand ``events`` to the consumer; finish the sequence when its generation ended."""
        for ev in events:
            self._emit(seq, ev)
        if seq._gen is not None and seq._gen.done:
            self._finish(seq, "done", seq.stats)

    def _turn(self, turn: list[Sequence]) -> None:
        """A batched engine's turn: a prefill chunk for each sequence still prefilling (each its own
        call), then one decode step for every sequence that waits for one, in one call.
        """
        model: Batcher = self.model  # type: ignore[assignment]  # batch_limit() checked the methods
        ready: list[Sequence] = []
        for seq in turn:
            try:
                if seq.cancelled:
                    self._finish(seq, "done", seq.stats)
                    continue
                if seq._gen is None:
                    seq._gen = model.begin(seq.ids, seq.config, stats=seq.stats)
                if not seq._gen.prefilled:
                    self._emit_all(seq, seq._gen.prefill(self.prefill_chunk))
            except Exception as exc:  # the request fails, the server goes on
                self._finish(seq, "error", exc)
                continue
            if seq._gen is not None and seq._gen.token is not None:
                ready.append(seq)
        for i in range(0, len(ready), self.batch):
            group = ready[i : i + self.batch]
            gens = [seq._gen for seq in group]
            try:
                events = model.step_batch(gens)  # type: ignore[arg-type]  # each was checked above
            except Exception as exc:  # the step failed: so do the requests in it
                for seq in group:
                    self._finish(seq, "error", exc)
                continue
            for seq, evs in zip(group, events):
                self._emit_all(seq, evs)
