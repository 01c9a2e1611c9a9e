"""Run a bundle: ``cscompile.runtime.load(path)`` -> :class:`BundleModel`.

The bundle is opened with :func:`cscompile.bundle.open_bundle` (manifest, requirements, every
file's hash, ONNX headers) before anything in it is used, and stays open while the model
lives: for a ``.csb`` archive the verified copy is a private temporary directory that
:meth:`BundleModel.close` (or the context manager) removes.

Thread safety: :meth:`BundleModel.generate` and :meth:`BundleModel.stream` may be called from
many threads at once. Every call owns its KV cache, RNG, detokenizer and IOBinding; the ORT
session and the tokenizer are shared read-only.

>>> from cscompile import runtime
>>> with runtime.load("smollm2.csb") as model:  # doctest: +SKIP
...     print(model.generate("Hello", runtime.GenerationConfig(max_new_tokens=8)).text)
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cscompile.decode.generate import (
    Generation,
    GenerationConfig,
    GenerationResult,
    GenerationStats,
    TextModel,
    TokenEvent,
    aiterate,
)
from cscompile.errors import UserError

if TYPE_CHECKING:
    from cscompile.bundle import Bundle, Engine
    from cscompile.exits.classifier import Classification, Classifier
    from cscompile.prompt import CompressedPrompt, PromptBudget, PromptCompressor
    from cscompile.prompt.allocate import CostModel, QualityGrid


def is_bundle(path: Path | str) -> bool:
    """True for a ``.csb`` file, or a directory whose ``manifest.json`` declares the bundle format
    (or that has a ``manifest.json`` and no ``model.onnx``, so a damaged bundle is reported as one).

    A cheap look, not a check: :func:`load` verifies everything. Model cache directories also
    have a ``manifest.json`` (a different format), so the format field is read.
    """
    import json

    from cscompile.bundle.format import ARCHIVE_SUFFIX, FORMAT, MAX_MANIFEST_BYTES

    p = Path(path).expanduser()
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return False
    if stat.S_ISREG(st.st_mode):
        return p.name.endswith(ARCHIVE_SUFFIX)
    if not stat.S_ISDIR(st.st_mode):
        return False
    if not (p / "manifest.json").exists():
        return False
    if not (p / "model.onnx").exists():
        return True
    try:
        with open(p / "manifest.json", "rb") as f:
            manifest = json.loads(f.read(MAX_MANIFEST_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


class BundleModel:
    """A loaded bundle: its dense engine as a :class:`TextModel`, plus the bundle's metadata."""

    def __init__(self, bundle: Bundle, model: TextModel, engine: Engine, threads: int | None = None) -> None:
        self._bundle = bundle
        self._model: TextModel | None = model
        self.engine = engine
        self._threads = threads
        self._compressor: PromptCompressor | None = None
        self._classifier: Classifier | None = None
        #: what the last compressed generation kept (``prompt_budget=``); per-model, not per-thread
        self.last_compression: CompressedPrompt | None = None
        self._costs: CostModel | None = None
        self._grids: dict[str, QualityGrid] = {}
        #: a directory bundle is read in place (weights memory-mapped): what its files were at load
        self._stamps = None if bundle.archive else _stamps(bundle)

    def check_unchanged(self) -> None:
        """Refuse to run a directory bundle whose files changed on disk since it was loaded.

        Called at the start of every generation: a bundle rewritten under a running process would
        mix old and new weights silently. An archive (``.csb``) runs from a private extracted copy
        and needs no check — the form to serve from.
        """
        if self._stamps is None:
            return
        now = _stamps(self._bundle)
        changed = sorted(rel for rel, st in self._stamps.items() if now.get(rel) != st)
        if changed:
            from cscompile.bundle import BundleError

            raise BundleError(
                f"bundle {self._bundle.source}",
                f"{changed[0]}{f' and {len(changed) - 1} more files' if len(changed) > 1 else ''} changed on disk since it was loaded",
                "an unchanged bundle: load it again (or serve from a .csb archive, which runs from a private copy)",
            )

    # -- metadata -----------------------------------------------------------------------
    @property
    def session(self) -> Any:
        """The running session (a DecoderSession, or the motif runtime's SwitchingSession)."""
        if self._model is None:
            raise ValueError("the bundle model is closed")
        return self._model.session

    @property
    def manifest(self) -> dict[str, Any]:
        return self._bundle.manifest

    @property
    def content_hash(self) -> str:
        return self._bundle.content_hash

    @property
    def engines(self) -> tuple[Engine, ...]:
        """Every engine the bundle lists (only :attr:`engine` is loaded)."""
        return self._bundle.engines

    @property
    def path(self) -> Path:
        return self._bundle.source

    @property
    def bundle(self) -> Bundle:
        return self._bundle

    @property
    def build_info(self) -> dict[str, Any]:
        """The ``build.json`` section (empty if the bundle has none)."""
        return _build_info(self._bundle)

    @property
    def text_model(self) -> TextModel:
        if self._model is None:
            raise ValueError(f"bundle model {self.path} is closed")
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self.text_model.tokenizer

    @property
    def context_length(self) -> int | None:
        return self.text_model.context_length

    @property
    def closed(self) -> bool:
        return self._model is None

    # -- classification ------------------------------------------------------------------------
    @property
    def classifier(self) -> Classifier:
        """The bundle's early-exit classifier (built with ``cscompile build --task classify``)."""
        if self._classifier is None:
            from cscompile.bundle import BundleError
            from cscompile.exits.classifier import load_classifier

            clf = load_classifier(self._bundle, self.tokenizer, self._threads, self.context_length)
            if clf is None:
                raise BundleError(
                    f"bundle {self.path}",
                    "has no classifier",
                    "a bundle built with `cscompile build --task classify --labels ... --train ...`",
                )
            self._classifier = clf
        return self._classifier

    def classify(self, text: str, policy: str = "2d") -> Classification:
        """Label ``text`` with early exits (:mod:`cscompile.exits.classifier`): ``policy`` ``2d``
        (default), ``layer``, ``sentence`` or ``full``. Empty or oversize text is a one-line error;
        a text unlike the training texts is answered by the full model and flagged
        (``in_distribution=False``).
        """
        return self.classifier.classify(text, policy)

    # -- prompt compression ------------------------------------------------------------------
    @property
    def compressor(self) -> PromptCompressor:
        """The bundle's prompt compressor (built with ``cscompile build --prompt-scorer``)."""
        if self._compressor is None:
            from cscompile.bundle import BundleError
            from cscompile.prompt import PromptCompressor
            from cscompile.prompt.calibrate import load_scorer

            scorer = load_scorer(self._bundle, self._threads)
            if scorer is None:
                raise BundleError(
                    f"bundle {self.path}",
                    "has no prompt scorer, so it cannot compress prompts",
                    "a bundle built with `cscompile build --prompt-scorer`",
                )
            self._compressor = PromptCompressor(self.tokenizer, scorer)
        return self._compressor

    def compress(self, prompt: str | list[int], budget: PromptBudget, *, question: str | None = None,
                 instruction: str = "", chat: bool = True, new_tokens: int = 128) -> CompressedPrompt:  # fmt: skip
        """Compress ``prompt`` to ``budget`` (see :mod:`cscompile.prompt.compress`).

        Without ``question``, the prompt's last paragraph is the question and the rest is the
        context; with it, ``prompt`` is all context. The question and ``instruction`` are kept.
        A latency budget (``PromptBudget(latency_ms=...)``) picks, among the ratios predicted to
        finish within it decoding ``new_tokens`` (the worst case), the one closest to the full
        prompt by the calibrated KL — in practice the least compression that fits.
        """
        from cscompile.prompt import split_prompt

        if not isinstance(prompt, str):
            raise UserError("prompt", "is token ids", "text (compression works on text)")
        budget.validate()
        context, q = (prompt, question) if question is not None else split_prompt(prompt)
        if budget.latency_ms is None:
            return self.compressor.compress(context, q, budget, instruction=instruction, chat=chat)
        return self._compress_within(context, q, budget, instruction, chat, new_tokens)

    def _compress_within(self, context: str, question: str, budget: PromptBudget, instruction: str, chat: bool,
                         new_tokens: int) -> CompressedPrompt:  # fmt: skip
        """A latency budget: the ratio from the bundle's grid and this machine's costs."""
        import dataclasses

        import numpy as np

        from cscompile.prompt import CompressedPrompt, layout
        from cscompile.prompt.allocate import allocate

        assert budget.latency_ms is not None
        grid = self._grid(budget.order)
        costs = self.latency_costs()
        lay = layout(self.tokenizer, context, question, instruction, chat, budget.keep)
        n_prot = int(lay.protected.sum())
        # faithful: the least compression predicted to fit (the calibration task is not the user's)
        choice = allocate(
            "prompt-only", budget.latency_ms, costs, grid, len(lay.ids), n_prot, new_tokens, "faithful"
        )
        note = (
            f"latency budget {budget.latency_ms:g} ms: kept ratio {choice.ratio:g}, predicted "
            f"{choice.predicted_ms:.0f} ms with {new_tokens} new tokens (calibrated KL to the full prompt "
            f"{grid.kl[(choice.ratio, 'dense')]:.2f})"
        )
        notes = [note, *choice.notes]
        if choice.ratio >= 1.0:
            n = len(lay.ids)
            return CompressedPrompt(lay.ids, np.ones(n, bool), n, lay.n_context, lay.n_context, not choice.notes,
                                    0.0, lay.text, notes)  # fmt: skip
        c = self.compressor.compress(context, question, dataclasses.replace(budget, latency_ms=None, ratio=choice.ratio),
                                     instruction=instruction, chat=chat)  # fmt: skip
        c.notes[:0] = notes
        c.budget_met = c.budget_met and not choice.notes
        return c

    def _grid(self, order: str) -> QualityGrid:
        """The build's quality grid for ``order``, read and checked once per model."""
        from cscompile.bundle import BundleError
        from cscompile.prompt.allocate import QualityGrid

        if order in self._grids:
            return self._grids[order]

        doc = (
            self._bundle.read_json(self._bundle.sections["prompt"])
            if "prompt" in self._bundle.sections
            else {}
        )
        grid: Any = doc
        for key in ("grid", "orders", order):  # any shape but nested objects reads as "no grid"
            grid = grid.get(key) if isinstance(grid, dict) else None
        if grid is None:
            raise BundleError(
                f"bundle {self.path}",
                "has no calibrated prompt grid for a latency budget",
                "a bundle built with `cscompile build --prompt-scorer` (this version)",
            )
        # the grid was calibrated on the dense engine; the native one runs the same weights
        if self.engine.kind not in ("dense", "native") or "search" in self.engine.params:
            raise UserError(
                "--latency-budget",
                f"with engine {self.engine.name}",
                "the bundle's dense or native engine (the weights the grid was calibrated with)",
            )
        self._grids[order] = QualityGrid.from_dict(grid, f"bundle {self.path}: prompt grid")
        return self._grids[order]

    def latency_costs(self) -> CostModel:
        """Costs of the loaded engine and the scorer on this machine.

        Measured once (about 5 s on SmolLM2), then cached under ``$CSCOMPILE_CACHE/costs`` by
        bundle, engine, threads and CPU.
        """
        import hashlib
        import json
        import os
        import platform

        from cscompile.cache import atomic_write_json, cache_root
        from cscompile.prompt.allocate import CostModel, measure_costs

        if self._costs is not None:
            return self._costs
        threads = self._threads or os.cpu_count() or 1
        cpu = hashlib.sha256(
            f"{platform.processor()}|{platform.machine()}|{os.cpu_count()}".encode()
        ).hexdigest()[:12]
        path = cache_root() / "costs" / f"{self.content_hash[:16]}-{self.engine.name}-t{threads}-{cpu}.json"
        try:
            self._costs = CostModel.from_dict(json.loads(path.read_text()))
            return self._costs
        except (OSError, ValueError, UserError):
            pass
        costs = measure_costs(
            {"dense": self.text_model}, self.compressor.scorer, lengths=(128, 512, 1024), reps=2
        )
        try:
            atomic_write_json(path, costs.to_dict())
        except OSError:
            pass  # a read-only cache: measure again next time
        self._costs = costs
        return costs

    def _prepare(self, prompt: str | list[int], chat: bool, prompt_budget: PromptBudget | None,
                 question: str | None, instruction: str, stats: GenerationStats,
                 new_tokens: int) -> str | list[int]:  # fmt: skip
        self.check_unchanged()
        if prompt_budget is None:
            if question is not None or instruction:
                raise UserError("question/instruction", "given without a prompt budget", "prompt_budget=")
            return prompt
        c = self.compress(prompt, prompt_budget, question=question, instruction=instruction, chat=chat,
                          new_tokens=new_tokens)  # fmt: skip
        stats.prompt_tokens_original = c.original_tokens
        stats.compress_ms = c.scorer_ms
        self.last_compression = c
        return c.ids

    # -- generation (delegates to TextModel) ---------------------------------------------
    def stream(
        self,
        prompt: str | list[int],
        config: GenerationConfig | None = None,
        chat: bool = False,
        stats: GenerationStats | None = None,
        *,
        prompt_budget: PromptBudget | None = None,
        question: str | None = None,
        instruction: str = "",
    ) -> Iterator[TokenEvent]:
        """Yield tokens as they are generated (see :meth:`TextModel.stream`).

        ``prompt_budget`` compresses the prompt first (:meth:`compress`); ``stats`` then
        reports the tokens removed and the scorer's time, and :attr:`last_compression` holds
        what was kept.
        """
        st = stats if stats is not None else GenerationStats()
        cfg = config or GenerationConfig()
        ready = self._prepare(prompt, chat, prompt_budget, question, instruction, st, cfg.max_new_tokens)
        return self.text_model.stream(ready, cfg, chat=chat, stats=st)

    def begin(
        self,
        prompt: str | list[int],
        config: GenerationConfig | None = None,
        chat: bool = False,
        stats: GenerationStats | None = None,
    ) -> Generation:
        """A generation stepped from outside (see :meth:`TextModel.begin`; a server's scheduler)."""
        st = stats if stats is not None else GenerationStats()
        cfg = config or GenerationConfig()
        ready = self._prepare(prompt, chat, None, None, "", st, cfg.max_new_tokens)
        return self.text_model.begin(ready, cfg, chat=chat, stats=st)

    @property
    def batch_limit(self) -> int:
        """See :attr:`TextModel.batch_limit`."""
        return self.text_model.batch_limit

    @property
    def prefill_chunk(self) -> int | None:
        """See :attr:`TextModel.prefill_chunk`."""
        return self.text_model.prefill_chunk

    def step_batch(self, gens: list[Generation]) -> list[list[TokenEvent]]:
        """See :meth:`TextModel.step_batch`."""
        return self.text_model.step_batch(gens)

    def astream(
        self,
        prompt: str | list[int],
        config: GenerationConfig | None = None,
        chat: bool = False,
        stats: GenerationStats | None = None,
        *,
        prompt_budget: PromptBudget | None = None,
        question: str | None = None,
        instruction: str = "",
    ) -> AsyncIterator[TokenEvent]:
        """:meth:`stream` for asyncio services: the decode loop (and any prompt compression) runs in
        a worker thread and hands tokens to the event loop; ``aclose()`` (or dropping the iterator),
        or cancelling the consuming task, stops it between tokens and frees the sequence's KV cache.

        >>> async for ev in model.astream("Hi", GenerationConfig(max_new_tokens=8)):  # doctest: +SKIP
        ...     print(ev.text, end="")
        """
        return aiterate(
            lambda: self.stream(
                prompt,
                config,
                chat,
                stats,
                prompt_budget=prompt_budget,
                question=question,
                instruction=instruction,
            )
        )

    def generate(
        self,
        prompt: str | list[int],
        config: GenerationConfig | None = None,
        chat: bool = False,
        *,
        prompt_budget: PromptBudget | None = None,
        question: str | None = None,
        instruction: str = "",
    ) -> GenerationResult:
        """Generate the whole answer (see :meth:`TextModel.generate` and :meth:`stream`)."""
        st = GenerationStats()
        cfg = config or GenerationConfig()
        ready = self._prepare(prompt, chat, prompt_budget, question, instruction, st, cfg.max_new_tokens)
        res = self.text_model.generate(ready, cfg, chat=chat)
        res.stats.prompt_tokens_original = st.prompt_tokens_original
        res.stats.compress_ms = st.compress_ms
        return res

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release the session, then the bundle (an archive's extracted files are removed)."""
        self._model = None
        self._bundle.close()

    def __enter__(self) -> BundleModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"engine {self.engine.name}"
        return f"BundleModel({str(self.path)!r}, {state}, content {self.content_hash[:16]})"


def _stamps(bundle: Bundle) -> dict[str, tuple[int, int, int, int] | None]:
    """``{file: (device, inode, size, mtime_ns)}`` of every listed file (None: missing)."""
    out: dict[str, tuple[int, int, int, int] | None] = {}
    for rel in bundle.files:
        try:
            st = os.stat(bundle.root / rel)
            out[rel] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            out[rel] = None
    return out


def _build_info(bundle: Bundle) -> dict[str, Any]:
    return bundle.read_json(bundle.sections["build"]) if "build" in bundle.sections else {}


def _context_length(bundle: Bundle) -> int | None:
    from cscompile.bundle import BundleError
    from cscompile.limits import INT32_MAX, is_int32

    if "config.json" not in bundle.files:
        return None
    cfg = bundle.read_json("config.json")
    value = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
    if value is not None and not is_int32(value):
        raise BundleError(
            f"bundle {bundle.source}: config.json",
            f"has max_position_embeddings {value!r}",
            f"an integer in [1, {INT32_MAX}] (or none)",
        )
    return value


def _native_default(bundle: Any) -> bool:
    """Whether the bundle's native engine may be the default here (else: the dense one, with a warning)."""
    import warnings

    from cscompile.native.engine import unavailable

    why = unavailable()
    if why is not None:
        warnings.warn(
            f"bundle {bundle.source}: running the dense engine, not the native one: {why}", stacklevel=3
        )
    return why is None


#: ``load(path, engine=MOTIFS)`` runs the switching runtime over every motif engine of the bundle
MOTIFS = "motifs"


#: the LM head choices of :func:`load` (``--head``)
HEADS = ("auto", "full", "sensed")


def load(
    path: Path | str,
    threads: int | None = None,
    *,
    engine: str | None = None,
    spinning: bool = True,
    slo_ms_per_token: float | None = None,
    max_ppl_increase: float | None = None,
    head: str = "auto",
) -> BundleModel:
    """Open and verify the bundle at ``path`` (directory or ``.csb``) and load its default engine.

    ``engine`` names the engine to run (default: the ``native`` one when the bundle has it — the
    source model's exact grid in one C step — else the first ``dense`` one). ``threads`` is the
    intra-op thread count (default ``$CSCOMPILE_THREADS`` or all cores); ``spinning=False``
    when several models take turns in one process. ``slo_ms_per_token`` / ``max_ppl_increase``
    pick a point of the bundle's Pareto front (``cscompile build --pareto``): the best quality
    within the latency target, or the fastest within the quality bound; none meeting them is a
    one-line error naming the nearest feasible point. ``head`` (native engine): ``auto`` greedy steps
    use the bundle's sensed vocabulary head when it has one (sampling: the full head), ``full``
    never, ``sensed`` requires it and samples from it too (approximately). Raises a one-line
    :class:`~cscompile.bundle.BundleError` for anything wrong with the bundle.
    """
    from cscompile.bundle import BundleError, open_bundle
    from cscompile.decode.session import resolve_threads
    from cscompile.decode.tokenizer import Tokenizer
    from cscompile.runtime.engines import LoadRequest, load_session

    if threads is not None:
        resolve_threads(threads)  # refused before the bundle is opened
    if head not in HEADS:
        raise UserError("head", repr(head), f"one of {', '.join(HEADS)}")
    bundle = open_bundle(Path(path).expanduser())
    try:
        front: Any = None  # the pareto section, read once when a front point is involved
        if slo_ms_per_token is not None or max_ppl_increase is not None:
            if engine is not None:
                raise UserError(
                    "--engine", f"'{engine}' together with a latency or quality target", "one of them"
                )
            from cscompile.runtime.front import select_engine

            front = bundle.read_json(bundle.sections["pareto"]) if "pareto" in bundle.sections else None
            engine = select_engine(
                bundle.manifest,
                slo_ms_per_token,
                max_ppl_increase,
                front if isinstance(front, dict) else None,
            )
        switch = (
            [e for e in bundle.engines if e.kind == "native" and "switch" in e.params]
            if engine == MOTIFS
            else []
        )
        if switch and not any(e.kind == "motif" for e in bundle.engines):
            chosen = switch[0]  # the native front's switching runtime, its gentlest point
        elif engine == MOTIFS:
            motif_engines = [e for e in bundle.engines if e.kind == "motif"]
            if not motif_engines:
                raise BundleError(
                    f"bundle {bundle.source}",
                    "has no motif engines",
                    "a bundle built with `cscompile build --motifs`",
                )
            chosen = motif_engines[0]
        elif engine is None and any(e.kind == "native" for e in bundle.engines) and _native_default(bundle):
            # the default when present: the exact source grid at 2x llama.cpp's decode (BENCHMARKS.md)
            chosen = next(e for e in bundle.engines if e.kind == "native" and "search" not in e.params)
        elif engine is None:
            dense = [e for e in bundle.engines if e.kind == "dense"]
            if not dense:
                raise BundleError(
                    f"bundle {bundle.source}",
                    f"has no dense engine (engines: {[e.name for e in bundle.engines]})",
                    "a bundle written by cscompile build",
                )
            chosen = dense[0]
        else:
            chosen = bundle.engine(engine)
        tok_dir = bundle.tokenizer_dir
        if tok_dir is None:
            raise BundleError(
                f"bundle {bundle.source}", "has no tokenizer", "a bundle built with a tokenizer"
            )
        if bundle.manifest["requires"]["target"] == "trt" and (
            engine in (None, MOTIFS) or chosen.kind == "trt"
        ):
            chosen = next(e for e in bundle.engines if e.kind == "trt")
        request = LoadRequest(
            bundle=bundle,
            engine=chosen,
            threads=threads,
            spinning=spinning,
            switching=engine == MOTIFS,
            explicit=engine is not None,
            front=front if isinstance(front, dict) else None,
            context_length=_context_length(bundle),
            head=head,
        )
        session = load_session(request)
        model = TextModel(session, Tokenizer(tok_dir), context_length=_context_length(bundle))
        return BundleModel(bundle, model, chosen, threads)
    except BaseException:
        bundle.close()
        raise
