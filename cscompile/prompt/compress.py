"""Question-aware prompt compression within a token budget (coarse sentences, then fine words).

A prompt is ``instruction`` + ``context`` + ``question`` (joined by blank lines, then the chat
template). Only the context is compressible: the template, the instruction, the question and
every word a ``keep`` pattern matches are always kept. The scorer (:mod:`.scorer`) gives each
token the attention the question pays it; then

1. **coarse**: sentences are ranked by their mean token score and taken whole, best first,
   while they fit in ``budget × (1 + fine)`` context tokens (a sentence that does not fit is
   skipped, smaller ones may still fit);
2. **fine** (``fine > 0``): the lowest-scoring words of the kept sentences are dropped until
   the context fits the budget. Words, not sub-word tokens: SmolLM2 spells a number one digit
   per token, and a half-dropped number is a wrong number. Off by default (measured, below).

The kept tokens are the original token ids (no re-tokenization), in text order or, with
``order="relevance"``, with the kept sentences in ascending relevance so the best one sits
next to the question (LongLLMLingua reorders documents for the same reason: small models
read what is near the question). Measured on the retrieval set with three same-form
distractors: text order 83% at r=0.3, relevance order 100% at r=0.5 … 0.1; on QA the text
order did better (83% vs 75% at r=0.3), and a summary needs the text order, so text order is
the default. The serving engine sees the kept tokens at renumbered positions ``0..n-1`` (the
fused engine derives positions from lengths).

Budgets: ``ratio`` keeps that fraction of the context's tokens; ``tokens`` caps the whole
prompt. A budget below what must be kept keeps exactly the protected tokens and says so
(``budget_met = False``): a service keeps answering, the CLI prints a note.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cscompile.errors import UserError

#: the fraction of the budget the coarse stage may overshoot for the fine stage to trim. 0 (whole
#: sentences only) by measurement: on the retrieval set at r=0.3, fine 0 / 0.25 / 0.5 answered
#: 83% / 67% / 67% (``tools/bench_prompt.py --fine``, BENCHMARKS.md) — dropped words break the
#: sentences the answer is read from.
DEFAULT_FINE = 0.0

ORDERS = ("original", "relevance")

#: where a sentence ends (the prompt compressor and the classifier split text alike)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n|\n")


@dataclass(frozen=True)
class PromptBudget:
    """How much of the prompt to keep: ``ratio`` of the context or at most ``tokens`` in total."""

    ratio: float | None = None
    tokens: int | None = None
    #: end-to-end milliseconds: the runtime picks the ratio from the bundle's calibrated grid
    #: and this machine's measured costs (:meth:`BundleModel.compress`)
    latency_ms: float | None = None
    fine: float = DEFAULT_FINE
    keep: tuple[str, ...] = ()  # regular expressions; matching words are never dropped
    #: "original": kept sentences stay in text order; "relevance": most relevant last (next to the question)
    order: str = "original"

    def validate(self) -> None:
        if sum(x is not None for x in (self.ratio, self.tokens, self.latency_ms)) != 1:
            raise UserError(
                "prompt budget",
                "needs exactly one of ratio, tokens and latency",
                "--prompt-budget or --latency-budget",
            )
        if self.latency_ms is not None and not self.latency_ms > 0:
            raise UserError("--latency-budget", f"{self.latency_ms}", "a positive number of milliseconds")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise UserError("--prompt-budget", f"{self.ratio}", "a fraction in (0, 1] or a token count >= 2")
        if self.tokens is not None and (isinstance(self.tokens, bool) or self.tokens < 1):
            raise UserError("--prompt-budget", f"{self.tokens} tokens", "a positive token count")
        if self.order not in ORDERS:
            raise UserError("prompt budget order", f"'{self.order}'", f"one of {', '.join(ORDERS)}")
        if not 0.0 <= self.fine <= 1.0:
            raise UserError("prompt budget fine", f"{self.fine}", "a fraction in [0, 1]")
        for pattern in self.keep:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UserError(
                    "--keep", f"'{pattern}' is not a regular expression ({exc})", "a Python regex"
                ) from None

    @classmethod
    def parse(cls, text: str, keep: tuple[str, ...] = (), fine: float = DEFAULT_FINE,
              order: str = "original") -> PromptBudget:  # fmt: skip
        """``"0.4"`` → keep 40% of the context; ``"600"`` → at most 600 prompt tokens."""
        try:
            value = float(text)
        except ValueError:
            raise UserError("--prompt-budget", f"'{text}'", "a fraction in (0, 1] or a token count") from None
        b = (
            cls(ratio=value, keep=keep, fine=fine)
            if value <= 1.0
            else cls(tokens=int(value), keep=keep, fine=fine)
        )
        if value > 1.0 and value != int(value):
            raise UserError("--prompt-budget", f"'{text}'", "a fraction in (0, 1] or a whole token count")
        b.validate()
        return b


@dataclass
class PromptLayout:
    """A prompt's tokens and what each belongs to."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    sentence: np.ndarray  # [S] context sentence index, -1 = protected (template, instruction, question)
    word: np.ndarray  # [S] context word index, -1 = whitespace or protected
    protected: np.ndarray  # [S] bool: always kept
    query: np.ndarray  # positions whose attention scores the context (the question onwards)
    context_span: tuple[int, int]

    @property
    def n_context(self) -> int:
        return int((self.sentence >= 0).sum())


def split_prompt(prompt: str) -> tuple[str, str]:
    """``(context, question)``: the question is the prompt's last paragraph (after the last blank line)."""
    text = prompt.strip()
    parts = re.split(r"\n\s*\n", text)
    if len(parts) < 2:
        return "", text
    return "\n\n".join(parts[:-1]).strip(), parts[-1].strip()


def layout(tokenizer: Any, context: str, question: str, instruction: str = "", chat: bool = True,
           keep: tuple[str, ...] = ()) -> PromptLayout:  # fmt: skip
    """Tokenize the joined prompt and label every token (see :class:`PromptLayout`)."""
    if not (context.strip() or question.strip() or instruction.strip()):
        raise UserError("prompt", "is empty", "a context and a question")
    head = f"{instruction.strip()}\n\n" if instruction.strip() else ""
    content = head + context.strip() + (f"\n\n{question.strip()}" if question.strip() else "")
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}]) if chat else content
    base = text.index(content)
    c0 = base + len(head)
    c1 = c0 + len(context.strip())
    ids, offsets = tokenizer.encode_with_offsets(text)
    n = len(ids)
    starts = np.array([a for a, _ in offsets], np.int64)
    ends = np.array([b for _, b in offsets], np.int64)
    in_ctx = (starts >= c0) & (ends <= c1) & (ends > starts)
    # sentences and words as character spans of the context
    sent_bounds = [c0] + [c0 + m.end() for m in SENTENCE_END.finditer(text[c0:c1])]
    words = [(c0 + m.start(), c0 + m.end()) for m in re.finditer(r"\S+", text[c0:c1])]
    word_starts = np.array([a for a, _ in words], np.int64)
    sentence = np.full(n, -1, np.int64)
    word = np.full(n, -1, np.int64)
    idx = np.nonzero(in_ctx)[0]
    last_char = ends[idx] - 1
    sentence[idx] = np.searchsorted(np.array(sent_bounds), last_char, side="right") - 1
    if len(words):
        w = np.searchsorted(word_starts, last_char, side="right") - 1
        inside = (w >= 0) & (last_char < np.array([b for _, b in words])[np.maximum(w, 0)])
        word[idx] = np.where(inside, w, -1)
    protected = ~in_ctx
    for pattern in keep:
        for m in re.finditer(pattern, text[c0:c1]):
            a, b = c0 + m.start(), c0 + m.end()
            hit = in_ctx & (starts < b) & (ends > a)
            hit_words = set(word[hit][word[hit] >= 0].tolist())
            protected |= hit | (in_ctx & np.isin(word, list(hit_words)))
    # the question (and the template after it) asks; without one, the prompt's last 16 tokens do
    query = np.nonzero(starts >= c1)[0] if question.strip() else np.arange(max(0, n - 16), n)
    if query.size == 0:
        query = np.array([n - 1])
    return PromptLayout(text, ids, offsets, sentence, word, protected, query, (c0, c1))


@dataclass
class CompressedPrompt:
    """The tokens to prefill and what was removed."""

    ids: list[int]
    kept: np.ndarray  # [S] bool over the original tokens
    original_tokens: int
    context_tokens: int
    budget_tokens: int  # context tokens the budget allows
    budget_met: bool
    scorer_ms: float
    text: str = ""  # the kept tokens, decoded
    notes: list[str] = field(default_factory=list)

    @property
    def removed_tokens(self) -> int:
        return self.original_tokens - len(self.ids)

    @property
    def retention(self) -> float:
        return len(self.ids) / self.original_tokens if self.original_tokens else 1.0


def sentence_means(lay: PromptLayout, scores: np.ndarray) -> np.ndarray:
    """Mean token score of every context sentence ``[sentences]`` (a sentence with no token: 0)."""
    ctx = lay.sentence >= 0
    sums = np.bincount(lay.sentence[ctx], weights=np.asarray(scores, np.float64)[ctx])
    return np.asarray(sums / np.maximum(np.bincount(lay.sentence[ctx]), 1))


def select(lay: PromptLayout, scores: np.ndarray, budget: PromptBudget) -> tuple[np.ndarray, int, bool]:
    """The kept-token mask for ``budget`` given per-token ``scores``: (mask, context budget, met)."""
    n = len(lay.ids)
    ctx = lay.sentence >= 0
    forced = lay.protected & ctx  # keep-list words inside the context
    n_ctx = int(ctx.sum())
    if budget.ratio is not None:
        target = int(np.floor(budget.ratio * n_ctx + 1e-9))
    else:
        assert budget.tokens is not None
        target = budget.tokens - int((~ctx).sum())
    keep = lay.protected.copy()
    if target < int(forced.sum()):
        return keep, max(target, 0), False
    if target >= n_ctx:
        return np.ones(n, bool), n_ctx, True
    means = sentence_means(lay, scores)
    sent_score = {int(s): float(means[s]) for s in np.unique(lay.sentence[ctx])}
    coarse_cap = min(n_ctx, int(np.floor(target * (1.0 + budget.fine))))
    used = int(forced.sum())
    chosen = []
    for s in sorted(sent_score, key=lambda s: -sent_score[s]):
        extra = int(((lay.sentence == s) & ~forced).sum())
        if used + extra <= coarse_cap:
            chosen.append(s)
            used += extra
    keep |= np.isin(lay.sentence, chosen)
    # fine: drop the weakest unprotected words (and then loose whitespace) of kept sentences
    over = int((keep & ctx).sum()) - target
    if over > 0:
        cand = keep & ctx & ~lay.protected & (lay.word >= 0)
        words = np.unique(lay.word[cand])
        word_score = sorted((float(scores[(lay.word == w) & cand].mean()), int(w)) for w in words)
        for _, w in word_score:
            if over <= 0:
                break
            drop = cand & (lay.word == w)
            keep &= ~drop
            over -= int(drop.sum())
        if over > 0:  # whitespace tokens, weakest first
            ws = np.nonzero(keep & ctx & ~lay.protected & (lay.word < 0))[0]
            for i in ws[np.argsort(scores[ws])][:over]:
                keep[i] = False
    return keep, target, True


def reorder(lay: PromptLayout, scores: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Kept token positions with the context's sentences in ascending relevance (best last)."""
    ctx = lay.sentence >= 0
    idx = np.nonzero(ctx)[0]
    c0, c1 = (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, 0)
    kept_ctx = keep & ctx
    means = sentence_means(lay, scores)
    sents = sorted((int(s) for s in np.unique(lay.sentence[kept_ctx])), key=lambda s: (means[s], s))
    body = [np.nonzero(kept_ctx & (lay.sentence == s))[0] for s in sents]
    head = np.nonzero(keep[:c0])[0]
    tail = c1 + np.nonzero(keep[c1:])[0]
    return np.concatenate([head, *body, tail]).astype(np.int64)


class PromptCompressor:
    """A tokenizer and a :class:`~cscompile.prompt.scorer.PromptScorer`: ``compress(...)``."""

    def __init__(self, tokenizer: Any, scorer: Any) -> None:
        self.tokenizer = tokenizer
        self.scorer = scorer

    def compress(self, context: str, question: str, budget: PromptBudget, instruction: str = "",
                 chat: bool = True) -> CompressedPrompt:  # fmt: skip
        budget.validate()
        if budget.latency_ms is not None:
            raise UserError(
                "latency budget",
                "given to the bare compressor",
                "BundleModel.compress (it owns the costs and grid)",
            )
        lay = layout(self.tokenizer, context, question, instruction, chat, budget.keep)
        notes = []
        positions: np.ndarray | None = None
        if lay.n_context == 0:
            notes.append("nothing to compress: the prompt has no context before its question")
            keep, target, met, ms = np.ones(len(lay.ids), bool), 0, True, 0.0
        else:
            scores, ms = self.scorer.scores(lay.ids, lay.query)
            keep, target, met = select(lay, scores, budget)
            if budget.order == "relevance":
                positions = reorder(lay, scores, keep)
        if not met:
            notes.append(
                f"budget cannot be met: the instruction, question and kept words alone are "
                f"{int(lay.protected.sum())} tokens; kept exactly those"
            )
        if positions is None:
            positions = np.nonzero(keep)[0]
        ids = [lay.ids[i] for i in positions]
        return CompressedPrompt(
            ids=ids,
            kept=keep,
            original_tokens=len(lay.ids),
            context_tokens=lay.n_context,
            budget_tokens=target,
            budget_met=met,
            scorer_ms=ms,
            text=self.tokenizer.decode(ids, skip_special_tokens=False),
            notes=notes,
        )
