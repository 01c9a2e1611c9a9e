"""Run prompts through a generating system and measure it: prefill, decode, tokens/s, peak RSS.

A *system* is anything with ``generate_ids(prompt_ids, max_new_tokens) -> (ids, stats)``:
the ONNX Runtime :class:`~cscompile.runtime.TextModel` (through :class:`OrtSystem`), the
PyTorch reference, and later bundles and peers. All are measured by the same code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from cscompile.data.prompts import Prompt
from cscompile.decode.generate import GenerationConfig, GenerationStats, TextModel


class System(Protocol):
    name: str

    def generate_ids(
        self, prompt_ids: list[int], max_new_tokens: int
    ) -> tuple[list[int], GenerationStats]: ...


class OrtSystem:
    """Greedy generation through the dense ONNX Runtime decode loop (EOS ignored: fixed length)."""

    def __init__(self, model: TextModel, name: str = "cscompile dense (ORT)") -> None:
        self.model = model
        self.name = name

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], GenerationStats]:
        stats = GenerationStats()
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop_at_eos=False)
        ids = [ev.token_id for ev in self.model.stream(prompt_ids, cfg, stats=stats) if ev.token_id >= 0]
        return ids, stats


class PeakRSS:
    """Samples this process's resident set size in a thread; ``peak_mb`` after exit."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


@dataclass
class PromptRun:
    system: str
    id: str
    family: str
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    decode_ms_median: float
    decode_ms_p90: float
    tokens_per_s: float
    answer_found: bool | None
    text: str


def run_prompts(
    system: System,
    prompts: list[Prompt],
    encode: Callable[[Prompt], list[int]],
    decode: Callable[[list[int]], str],
    max_new_tokens: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[PromptRun]:
    runs = []
    for i, p in enumerate(prompts):
        ids = encode(p)
        out, st = system.generate_ids(ids, max_new_tokens)
        text = decode(out)
        found = None if p.answer is None else p.answer.lower() in text.lower()
        runs.append(
            PromptRun(
                system=system.name,
                id=p.id,
                family=p.family,
                prompt_tokens=len(ids),
                new_tokens=len(out),
                prefill_ms=st.prefill_ms,
                decode_ms_median=st.decode_ms_median,
                decode_ms_p90=st.decode_ms_p90,
                tokens_per_s=st.tokens_per_s,
                answer_found=found,
                text=text,
            )
        )
        if progress:
            progress(i + 1, len(prompts))
    return runs


def summarize(runs: list[PromptRun]) -> dict[str, Any]:
    """Per-family and overall medians (decode ms/token pooled over prompts)."""

    def agg(rs: list[PromptRun]) -> dict[str, Any]:
        med = [r.decode_ms_median for r in rs if np.isfinite(r.decode_ms_median)]
        found = [r.answer_found for r in rs if r.answer_found is not None]
        return {
            "prompts": len(rs),
            "prompt_tokens_median": float(np.median([r.prompt_tokens for r in rs])),
            "prefill_ms_median": float(np.median([r.prefill_ms for r in rs])),
            "decode_ms_median": float(np.median(med)) if med else float("nan"),
            "decode_ms_p90": float(np.percentile([r.decode_ms_p90 for r in rs], 90)) if med else float("nan"),
            "tokens_per_s": 1000.0 / float(np.median(med)) if med else float("nan"),
            "retrieval_accuracy": float(np.mean(found)) if found else None,
        }

    families = sorted({r.family for r in runs})
    return {"overall": agg(runs), "families": {f: agg([r for r in runs if r.family == f]) for f in families}}


def runs_to_json(runs: list[PromptRun]) -> list[dict[str, Any]]:
    return [asdict(r) for r in runs]
