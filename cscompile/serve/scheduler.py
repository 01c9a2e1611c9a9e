"""One engine thread that interleaves the running sequences token by token, and a bounded queue.

The engine runs one sequence per step (no batching yet): each turn of the loop admits waiting
sequences up to ``max_running``, then advances every running sequence by one token
(``next()`` on its :meth:`~cscompile.runtime.TextModel.stream`; the first call is its prefill).
Every sequence owns its KV cache, RNG and detokenizer, so its tokens are exactly those it would
get alone. Tokens are handed to the asyncio event loop with ``call_soon_threadsafe``.

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

from cscompile.runtime import GenerationConfig, GenerationStats, TokenEvent


class Streamer(Protocol):
    def stream(
        self,
        prompt: str | list[int],
        config: GenerationConfig | None = None,
        chat: bool = False,
        stats: GenerationStats | None = None,
    ) -> Iterator[TokenEvent]: ...


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
            for seq in turn:
                self._step(seq)

    def _finish(self, seq: Sequence, kind: str, value: Any) -> None:
        """Free the sequence's slot and KV cache, then tell its consumer."""
        seq.finished = True
        if seq._it is not None:
            close = getattr(seq._it, "close", None)
            if close is not None:
                close()  # the generator's frame, KV cache included, is dropped
            seq._it = None
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
        if ev.token_id >= 0:
            now = time.perf_counter()
            if seq._last is None:
                self.hooks.first_token(now - seq.arrived)
            else:
                self.hooks.inter_token(now - seq._last)
            seq._last = now
            self.hooks.token()
        seq._put("token", ev)
