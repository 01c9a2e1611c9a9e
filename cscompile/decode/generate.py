"""The decode loop: prefill, decode one token, sample, stream.

Small typed functions so the hot path is easy to find, profile and replace (gpt-fast style).
A :class:`TextModel` is thread-safe: all per-generation state (KV cache, RNG, stop-string
buffer) lives in the call, and ORT sessions may be run from many threads at once.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from cscompile.decode.session import DecoderSession, KVState, Session
from cscompile.decode.tokenizer import IncrementalDecoder, Tokenizer
from cscompile.errors import UserError
from cscompile.model_config import read_context_length


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. ``temperature == 0`` is greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def validate(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        def is_real(v: object) -> bool:
            return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise UserError("max_new_tokens", repr(self.max_new_tokens), "an integer >= 0")
        if not is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError("temperature", repr(self.temperature), "a finite number >= 0 (0 means greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise UserError("top_k", repr(self.top_k), "an integer >= 0 (0 means off)")
        if not is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:  # nan fails the comparison too
            raise UserError("top_p", repr(self.top_p), "a number in (0, 1]")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise UserError("seed", repr(self.seed), "an integer >= 0 (or none)")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError("stop", repr(self.stop)[:120], "a list of non-empty stop strings")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)  # one entry per decode step
    stop_reason: str = ""
    #: prompt compression (``prompt_budget=``): tokens before it, and the scorer's time
    prompt_tokens_original: int = 0
    compress_ms: float = 0.0
    #: greedy steps decided by a sensed vocabulary head, and those that fell back to the full head
    head_steps: int = 0
    head_fallbacks: int = 0

    @property
    def prompt_tokens_removed(self) -> int:
        return max(0, self.prompt_tokens_original - self.prompt_tokens) if self.prompt_tokens_original else 0

    @property
    def ttft_ms(self) -> float:
        return self.compress_ms + self.prefill_ms

    @property
    def decode_ms_median(self) -> float:
        return float(np.median(self.decode_ms)) if self.decode_ms else float("nan")

    @property
    def decode_ms_p90(self) -> float:
        return float(np.percentile(self.decode_ms, 90)) if self.decode_ms else float("nan")

    @property
    def tokens_per_s(self) -> float:
        total = sum(self.decode_ms)
        return 1000.0 * len(self.decode_ms) / total if total > 0 else float("nan")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats


@dataclass(frozen=True)
class TokenEvent:
    """One streamed step: the new token and the text it made final (may be empty)."""

    token_id: int
    text: str


def sample(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> int:
    """Pick the next token from ``logits [V]``."""
    if cfg.temperature <= 0.0:
        return int(np.argmax(logits))
    # shifted before the division: a tiny temperature (1e-310) sends the others to -inf, not nan
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):
        z = (z - z.max()) / cfg.temperature
    if cfg.top_k and cfg.top_k < z.shape[0]:
        kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # the smallest prefix whose mass reaches top_p (1e-9 absorbs rounding in the cumsum)
        keep = order[: int(np.searchsorted(cum, cfg.top_p - 1e-9) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.shape[0], p=p))


T = TypeVar("T")


async def aiterate(make: Callable[[], Iterator[T]], name: str = "cscompile-decode") -> AsyncIterator[T]:
    """Run the blocking iterator ``make()`` in a worker thread; yield its items on the event loop.

    Closing the async iterator (``aclose()``, or dropping it: asyncio then closes it; or
    cancelling the task that awaits it) stops the worker between two items and closes the blocking iterator, which
    releases what it holds (a generation's KV cache). Exceptions, ``UserError`` included, are
    raised in the consumer.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
    stop = threading.Event()

    def put(kind: str, value: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()

    def work() -> None:
        it: Iterator[T] | None = None
        try:
            it = make()
            for item in it:
                put("item", item)
                if stop.is_set():  # checked before the next (blocking) step
                    break
        except BaseException as exc:
            put("error", exc)
        else:
            put("done", None)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    threading.Thread(target=work, name=name, daemon=True).start()
    try:
        while True:
            kind, value = await queue.get()
            if kind == "item":
                yield value  # type: ignore[misc]
            elif kind == "error":
                assert isinstance(value, BaseException)
                raise value
            else:
                return
    finally:
        stop.set()


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still start a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class TextModel:
    """A decoder session plus its tokenizer: the dense embedded runtime."""

    def __init__(self, session: Session, tokenizer: Tokenizer, context_length: int | None = None) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.context_length = context_length

    # -- the hot path ---------------------------------------------------------------
    def _last_logits(self, ids: np.ndarray, state: KVState) -> np.ndarray:
        """Run ``ids [1, S]`` after ``state``; the last position's logits ``[V]``."""
        return self.session.forward_last(ids, state)  # [V]: engines may skip the other positions' head

    def prefill(self, ids: list[int], state: KVState) -> np.ndarray:
        """Run the prompt; returns the last position's logits ``[V]``."""
        return self._last_logits(np.array([ids], np.int64), state)

    def decode_one_token(self, token: int, state: KVState) -> np.ndarray:
        return self._last_logits(np.array([[token]], np.int64), state)

    # -- API --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Token ids the engine takes: ``[0, vocab_size)`` (the model's, else the tokenizer's)."""
        return int(getattr(self.session, "vocab_size", None) or self.tokenizer.vocab_size)

    def encode_prompt(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        """A str is tokenized (with the chat template when ``chat``); a list of ids is checked:
        every engine refuses an id outside the vocabulary alike (none wraps or reads zeros).
        """
        if isinstance(prompt, str):
            if not chat:  # raw: BOS as the tokenizer's config says
                return self.tokenizer.encode_raw(prompt)
            # the template writes its own BOS, if the model wants one
            return self.tokenizer.encode(
                self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            )
        if not isinstance(prompt, Sequence | np.ndarray) or isinstance(prompt, bytes | bytearray):
            raise UserError("prompt", f"a {type(prompt).__name__}", "a str, or a list of token ids")
        raw: list[object] = (
            list(np.asarray(prompt).reshape(-1)) if isinstance(prompt, np.ndarray) else list(prompt)
        )
        vocab = self.vocab_size
        ids: list[int] = []
        for t in raw:
            if isinstance(t, bool) or not isinstance(t, int | np.integer) or not 0 <= t < vocab:
                raise UserError("prompt", f"token id {t!r}", f"integer ids in [0, {vocab})")
            ids.append(int(t))
        return ids

    def check_context(self, n_prompt: int, max_new_tokens: int) -> None:
        if n_prompt == 0:
            raise UserError("prompt", "is empty (0 tokens)", "at least one token")
        if self.context_length is not None and n_prompt + max_new_tokens > self.context_length:
            raise UserError(
                "prompt",
                f"{n_prompt} tokens + {max_new_tokens} new tokens exceed the context of {self.context_length}",
                f"prompt + max_new_tokens <= {self.context_length} (shorten the prompt or lower max_new_tokens)",
            )

    def begin(
        self,
        prompt: str | list[int],
        config: GenerationConfig | None = None,
        chat: bool = False,
        stats: GenerationStats | None = None,
    ) -> Generation:
        """A generation stepped from outside (see :class:`Generation`): checked as :meth:`stream`
        checks it, with its own KV cache; nothing has run yet.
        """
        return Generation(self, prompt, config, chat, stats)

    def stream(
        self,
        prompt: str | list[int],
        config: GenerationConfig | None = None,
        chat: bool = False,
        stats: GenerationStats | None = None,
    ) -> Iterator[TokenEvent]:
        """Yield tokens as they are generated; text is released once no stop string can still match."""
        gen = self.begin(prompt, config, chat, stats)
        yield from gen.prefill()
        step = self._single_step(gen.config)
        while gen.token is not None:
            yield from step(gen)

    def _single_step(self, cfg: GenerationConfig) -> Callable[[Generation], list[TokenEvent]]:
        """The decode step of one generation with ``cfg`` alone: feed its token, take the next."""
        # greedy on an engine with a sensed vocabulary head: the step returns the token, not logits
        greedy = getattr(self.session, "greedy_step", None) if cfg.temperature <= 0 else None
        sampled = None  # sampling through the sensed head, when the caller asked for it (--head sensed)
        if getattr(self.session, "sensed", None) is None:
            greedy = None
        elif cfg.temperature > 0 and getattr(self.session, "sensed_sampling", False):
            sampled = getattr(self.session, "sensed_logits", None)

        def step(gen: Generation) -> list[TokenEvent]:
            assert gen.token is not None
            t1 = time.perf_counter()
            if greedy is not None:
                nxt = int(greedy(gen.token, gen.state))
                gen.stats.decode_ms.append((time.perf_counter() - t1) * 1e3)
                return gen.take_token(nxt)
            if sampled is not None:
                logits = sampled(gen.token, gen.state)
            else:
                logits = self.decode_one_token(gen.token, gen.state)
            gen.stats.decode_ms.append((time.perf_counter() - t1) * 1e3)
            return gen.take(logits)

        return step

    # -- several sequences in one engine call (continuous batching) -------------------------
    @property
    def batch_limit(self) -> int:
        """Generations :meth:`step_batch` advances in one engine call (1: the engine steps one
        sequence at a time; the native engine batches, docs/design.md "Serving").
        """
        n = getattr(self.session, "max_batch", 1)
        ok = hasattr(self.session, "forward_batch") and isinstance(n, int) and not isinstance(n, bool)
        return max(1, n) if ok else 1

    @property
    def prefill_chunk(self) -> int | None:
        """Prompt tokens per prefill call that give the numbers of one call (None: whole prompts)."""
        n = getattr(self.session, "prefill_chunk", None)
        return n if isinstance(n, int) and n > 0 else None

    def step_batch(self, gens: list[Generation]) -> list[list[TokenEvent]]:
        """Feed every generation's next token (:attr:`Generation.token`) in one engine call; each
        one's events. Sampling, stop strings and detokenizing stay per generation, so each one's
        tokens are those it gets alone (the engine's rows equal its single steps). With a sensed
        vocabulary head, the greedy generations' rows end with it (``forward_batch_sensed``: the
        token each gets alone), the others with the full head. A batch of one is the solo step
        (:meth:`stream`'s own call), so a lone stream pays nothing for batching.
        """
        if (
            not gens
            or (len(gens) > 1 and len(gens) > self.batch_limit)  # (the limit is a C call: not per lone step)
            or any(g.token is None or g.model is not self for g in gens)
        ):
            raise UserError(
                "step_batch", f"{len(gens)} generations", f"1 to {self.batch_limit} waiting for a step"
            )
        if len(gens) == 1:
            g = gens[0]
            if g.solo_step is None:
                g.solo_step = self._single_step(g.config)
            return [g.solo_step(g)]
        tokens, states = [g.token for g in gens], [g.state for g in gens]
        greedy = [g.config.temperature <= 0 for g in gens]
        sensed = getattr(self.session, "forward_batch_sensed", None)
        if getattr(self.session, "sensed", None) is None or not any(greedy):
            sensed = None
        t1 = time.perf_counter()
        if sensed is not None:
            logits, chosen = sensed(tokens, states, greedy)
        else:
            logits, chosen = self.session.forward_batch(tokens, states), None  # type: ignore[attr-defined]
        ms = (time.perf_counter() - t1) * 1e3
        out = []
        for b, (g, row) in enumerate(zip(gens, logits)):
            g.stats.decode_ms.append(ms)
            out.append(g.take_token(chosen[b]) if chosen is not None and greedy[b] else g.take(row))
        return out

    def astream(
        self,
        prompt: str | list[int],
        config: GenerationConfig | None = None,
        chat: bool = False,
        stats: GenerationStats | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """:meth:`stream` for asyncio: the decode loop runs in a worker thread (see :func:`aiterate`);
        closing the iterator or cancelling its task stops generation between tokens.
        """
        return aiterate(lambda: self.stream(prompt, config, chat=chat, stats=stats))

    def generate(
        self, prompt: str | list[int], config: GenerationConfig | None = None, chat: bool = False
    ) -> GenerationResult:
        stats = GenerationStats()
        pieces, tokens = [], []
        for ev in self.stream(prompt, config, chat=chat, stats=stats):
            pieces.append(ev.text)
            if ev.token_id >= 0:
                tokens.append(ev.token_id)
        return GenerationResult(text="".join(pieces), token_ids=tokens, stats=stats)


class Generation:
    """One sequence's generation stepped from outside: :meth:`TextModel.stream`'s loop with the
    engine's decode call left to the caller, so a scheduler can advance many sequences in one
    batched call (:meth:`TextModel.step_batch`). Sampling (its own RNG), EOS, stop strings and
    detokenizing live here, per sequence.

    :meth:`prefill` until :attr:`prefilled` (the call that completes the prompt returns the
    first token's events), then while :attr:`token` is not None: feed it to the engine and give
    the logits to :meth:`take`.
    """

    def __init__(
        self,
        model: TextModel,
        prompt: str | list[int],
        config: GenerationConfig | None = None,
        chat: bool = False,
        stats: GenerationStats | None = None,
    ) -> None:
        cfg = config or GenerationConfig()
        cfg.validate()
        ids = model.encode_prompt(prompt, chat)
        model.check_context(len(ids), cfg.max_new_tokens)
        self.model, self.config, self.ids = model, cfg, ids
        self.stats = stats if stats is not None else GenerationStats()
        self.stats.prompt_tokens = len(ids)
        self.stats.prefill_ms = 0.0
        self._rng = np.random.default_rng(cfg.seed)
        self.state = model.session.new_state(batch=1)
        self.fed = 0  # prompt tokens in the cache
        self.out: list[int] = []
        self._detok = IncrementalDecoder(model.tokenizer)
        self._emitted = 0
        #: the token to feed the engine next (None: prefilling, or finished)
        self.token: int | None = None
        self.done = False
        #: its decode step alone (:meth:`TextModel._single_step`), made on first use
        self.solo_step: Callable[[Generation], list[TokenEvent]] | None = None

    @property
    def prefilled(self) -> bool:
        return self.fed == len(self.ids)

    def prefill(self, chunk: int | None = None) -> list[TokenEvent]:
        """Feed the next ``chunk`` prompt tokens (None: the rest); once the prompt is in, the
        first token is chosen and its events returned.
        """
        if self.prefilled:
            raise UserError("prefill", "a prompt already fed", "a generation that is still prefilling")
        n = len(self.ids) - self.fed if chunk is None else min(chunk, len(self.ids) - self.fed)
        t0 = time.perf_counter()
        logits = self.model.prefill(self.ids[self.fed : self.fed + n], self.state)
        self.stats.prefill_ms += (time.perf_counter() - t0) * 1e3
        self.fed += n
        if not self.prefilled:
            return []
        return self.take(logits) if self.config.max_new_tokens > 0 else self._end("length")

    def take(self, logits: np.ndarray) -> list[TokenEvent]:
        """The logits after the last token fed: the next token sampled, its events."""
        return self.take_token(sample(logits, self.config, self._rng))

    def take_token(self, tok: int) -> list[TokenEvent]:
        """The next token (chosen by the engine: a sensed head's greedy step); its events."""
        cfg = self.config
        if cfg.stop_at_eos and tok in self.model.tokenizer.eos_token_ids:
            return self._end("eos")
        self.out.append(tok)
        settled = self._detok.push(tok)  # complete characters only
        if cfg.stop:
            hit = min((i for i in (settled.find(s) for s in cfg.stop) if i >= 0), default=-1)
            if hit >= 0:
                ev = TokenEvent(tok, settled[self._emitted : hit])
                self._emitted = hit
                return [ev, *self._end("stop")]
        safe = len(settled) - _held_back(settled, cfg.stop)
        ev = TokenEvent(tok, settled[self._emitted : safe] if safe > self._emitted else "")
        self._emitted = max(self._emitted, safe)
        if len(self.out) == cfg.max_new_tokens:
            return [ev, *self._end("length")]
        self.token = tok
        return [ev]

    def _end(self, reason: str) -> list[TokenEvent]:
        self.done, self.token = True, None
        events = []
        if reason != "stop":
            rest = self._detok.flush()
            if self._emitted < len(rest):
                events.append(TokenEvent(-1, rest[self._emitted :]))
        self.stats.new_tokens = len(self.out)
        self.stats.stop_reason = reason
        self.stats.head_steps = int(getattr(self.state, "head_steps", 0))
        self.stats.head_fallbacks = int(getattr(self.state, "head_fallbacks", 0))
        return events


def model_paths(model: Path | str) -> tuple[Path, Path]:
    """``(model.onnx, tokenizer directory)`` of a model directory or of an ``.onnx`` file's folder."""
    path = Path(model)
    onnx_path = path if path.suffix == ".onnx" else path / "model.onnx"
    base = onnx_path.parent
    return onnx_path, base / "tokenizer" if (base / "tokenizer").is_dir() else base


def load_text_model(model_dir: Path | str, threads: int | None = None) -> TextModel:
    """Load ``model_dir`` (``model.onnx`` + ``tokenizer/`` or ``tokenizer.json`` + optional ``config.json``).

    A path to an ``.onnx`` file is accepted too; its tokenizer is looked for beside it.
    """
    onnx_path, tok_dir = model_paths(model_dir)
    if not onnx_path.exists():
        raise UserError(
            "model",
            f"no model.onnx at {model_dir}",
            "a model directory (from `cscompile model fetch`) or an .onnx file",
        )
    session = DecoderSession(onnx_path, threads=threads)
    return TextModel(session, Tokenizer(tok_dir), context_length=read_context_length(onnx_path.parent))
