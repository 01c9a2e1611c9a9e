"""The 2D early-exit runtime: read sentence by sentence, go deeper only when needed.

A text is split into sentences. For each new sentence the layer blocks run in order; after
block k the exit adapter at depth k reads the pooled hidden state of *everything read so far*
at that depth and gives class probabilities. Two thresholds decide:

- ``tau`` (layer-wise): confident enough at depth k → stop going deeper for this sentence;
- ``sigma`` (sentence-wise): confident enough → answer now, do not read further sentences.

After the last sentence the answer is the first depth reaching ``tau`` (or the deepest).
A block that is reached for the first time after earlier sentences stopped shallower first
catches up on their tokens (their hidden states were kept), so every block's KV cache always
covers a prefix of the text. ``tau=None`` never exits between layers; ``sigma=None`` reads
every sentence: the four policies of the harness are the four combinations.

Because the probabilities after sentence j at depth k do not depend on the path taken (catch-up
makes block k see exactly the tokens read so far), one full trace per text gives every
policy's answer and cost: :func:`simulate` is what threshold calibration uses, and
:meth:`ExitStack.classify` (the real incremental run) is tested to agree with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cscompile.exits.adapters import Adapter, normalize_rows


@dataclass
class _State:
    ids: list[int] = field(default_factory=list)
    done: list[int] = field(default_factory=list)  # tokens each block has processed
    past: list[dict[str, np.ndarray]] = field(default_factory=list)
    hidden: list[np.ndarray] = field(default_factory=list)  # per block: [done, H] output rows
    sums: list[np.ndarray] = field(default_factory=list)  # per block: sum of normalized rows
    layer_tokens: int = 0
    calls: int = 0


@dataclass
class Outcome:
    label: int
    confidence: float
    depth: int  # exit block index (0-based)
    sentences: int  # sentences read
    layer_tokens: int  # Σ tokens × layers computed
    calls: int = 0  # block sessions run
    tokens: int = 0  # tokens read
    ms: float = 0.0
    probabilities: np.ndarray | None = None
    in_distribution: bool = True


class ExitStack:
    """Layer-range sessions (:mod:`cscompile.exits.ranges`) and one adapter per block boundary."""

    def __init__(
        self, paths: list[Path], cuts: list[int], adapters: list[Adapter], threads: int | None = None
    ) -> None:
        from cscompile.decode.session import open_onnx_session

        if len(paths) != len(cuts) - 1 or len(adapters) not in (0, len(paths)):
            raise ValueError("one session and one adapter per block")
        self.cuts, self.adapters = cuts, adapters
        # no spinning: the blocks take turns, and a finished block's spinning workers would steal
        # the cores from the next one (measured 6 ms per call instead of 0.5, BENCHMARKS.md)
        self.sessions = [open_onnx_session(p, threads, spinning=False) for p in paths]
        self._past_names = [
            [i.name for i in s.get_inputs() if i.name.startswith("past_key_values")] for s in self.sessions
        ]
        shapes = self.sessions[0].get_inputs()
        kv = next(i for i in shapes if i.name.startswith("past_key_values"))
        self._kv_shape = (1, int(kv.shape[1]), 0, int(kv.shape[3]))
        # each block's outputs after hidden_out, as the cache inputs they feed next time
        self._next_past = [
            [o.name.replace("present.", "past_key_values.") for o in s.get_outputs()[1:]]
            for s in self.sessions
        ]
        # unfused attention reads positions (fused attention derives them from the mask)
        self._positions = [any(i.name == "position_ids" for i in s.get_inputs()) for s in self.sessions]

    @property
    def blocks(self) -> int:
        return len(self.sessions)

    def _new_state(self) -> _State:
        n = self.blocks
        st = _State(done=[0] * n, hidden=[np.zeros((0, 0), np.float32)] * n)
        st.past = [
            {name: np.zeros(self._kv_shape, np.float32) for name in names} for names in self._past_names
        ]
        st.sums = [np.zeros(0) for _ in range(n)]
        return st

    def _advance(self, st: _State, k: int) -> None:
        """Run block ``k`` on every token block ``k − 1`` (or the reader) has and it has not."""
        target = len(st.ids) if k == 0 else st.done[k - 1]
        new = target - st.done[k]
        if new <= 0:
            return
        sess = self.sessions[k]
        feed: dict[str, Any] = {"attention_mask": np.ones((1, target), np.int64), **st.past[k]}
        if k == 0:
            feed["input_ids"] = np.array([st.ids[st.done[0] : target]], np.int64)
        else:
            feed["hidden_in"] = st.hidden[k - 1][None, st.done[k] : target]
        if self._positions[k]:
            feed["position_ids"] = np.arange(st.done[k], target, dtype=np.int64)[None]
        outs = sess.run(None, feed)
        h = outs[0][0]
        st.past[k].update(zip(self._next_past[k], outs[1:]))
        st.hidden[k] = h if st.done[k] == 0 else np.concatenate([st.hidden[k], h])
        rows = normalize_rows(h)
        st.sums[k] = rows.sum(0) if st.sums[k].size == 0 else st.sums[k] + rows.sum(0)
        st.done[k] = target
        st.layer_tokens += new * (self.cuts[k + 1] - self.cuts[k])
        st.calls += 1

    def _proba(self, st: _State, k: int, adapters: list[Adapter] | None = None) -> np.ndarray:
        return (adapters or self.adapters)[k].proba(st.sums[k] / st.done[k])

    def classify(self, sentences: list[list[int]], tau: float | None, sigma: float | None,
                 check: Any = None, adapters: list[Adapter] | None = None) -> Outcome:  # fmt: skip
        """The incremental run (see the module docstring); ``sentences`` are token ids per sentence.

        ``check(pooled)`` sees the pooled state at the first exit after the first sentence; True
        (an outlier) stops at once with ``in_distribution=False``. ``adapters`` replaces the
        stack's own for this call.
        """
        t0 = time.perf_counter()
        st = self._new_state()
        p, depth = np.zeros(1), 0
        for j, sent in enumerate(sentences):
            st.ids.extend(sent)
            for k in range(self.blocks):
                self._advance(st, k)
                p, depth = self._proba(st, k, adapters), k
                if j == 0 and k == 0 and check is not None and check(st.sums[0] / st.done[0]):
                    ms = (time.perf_counter() - t0) * 1e3
                    return Outcome(int(p.argmax()), float(p.max()), 0, 1, st.layer_tokens, st.calls,
                                   len(st.ids), ms, p, in_distribution=False)  # fmt: skip
                if tau is not None and p.max() >= tau:
                    break
            last = j == len(sentences) - 1
            if last or (sigma is not None and p.max() >= sigma):
                ms = (time.perf_counter() - t0) * 1e3
                return Outcome(int(p.argmax()), float(p.max()), depth, j + 1, st.layer_tokens, st.calls,
                               len(st.ids), ms, p)  # fmt: skip
        raise ValueError("no sentences")

    def features(self, sentences: list[list[int]]) -> np.ndarray:
        """Pooled features ``[sentences, blocks, H]`` after each sentence: every sentence through
        every block (adapter training data; :meth:`trace` applies the adapters to them).
        """
        st = self._new_state()
        rows = []
        for sent in sentences:
            st.ids.extend(sent)
            for k in range(self.blocks):
                self._advance(st, k)
            rows.append([st.sums[k] / st.done[k] for k in range(self.blocks)])
        return np.asarray(rows)

    def trace(
        self, sentences: list[list[int]], adapters: list[Adapter] | None = None
    ) -> tuple[np.ndarray, list[int]]:
        """Probabilities ``[sentences, blocks, K]`` after each sentence at each depth (one full run)."""
        return apply_adapters(self.features(sentences), adapters or self.adapters), [
            len(s) for s in sentences
        ]


def apply_adapters(features: np.ndarray, adapters: list[Adapter]) -> np.ndarray:
    """Pooled features ``[sentences, blocks, H]`` → probabilities ``[sentences, blocks, K]``."""
    return np.stack([a.proba(features[:, k]) for k, a in enumerate(adapters)], axis=1)


def simulate(probs: np.ndarray, tokens: list[int], cuts: list[int], tau: float | None,
             sigma: float | None) -> Outcome:  # fmt: skip
    """The outcome and cost of a policy from a trace (exactly what :meth:`ExitStack.classify` does)."""
    n_sent, n_blocks, _ = probs.shape
    layers = np.diff(cuts)
    reached = [0] * n_blocks  # tokens each block has processed
    read = calls = 0
    for j in range(n_sent):
        read += tokens[j]
        for k in range(n_blocks):
            reached[k] = read  # catch-up: block k processes everything read so far
            calls += 1
            p, depth = probs[j, k], k
            if tau is not None and p.max() >= tau:
                break
        if j == n_sent - 1 or (sigma is not None and p.max() >= sigma):
            cost = int(sum(r * int(n) for r, n in zip(reached, layers)))
            return Outcome(int(p.argmax()), float(p.max()), depth, j + 1, cost, calls, read, probabilities=p)
    raise ValueError("no sentences")
