"""One evaluation run of a model: prompts through the decode loop plus perplexity, as a dict."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cscompile.data.prompts import Prompt, load_prompts
from cscompile.decode.generate import TextModel
from cscompile.decode.session import DecoderSession
from cscompile.errors import UserError
from cscompile.evaluation.harness import OrtSystem, PeakRSS, run_prompts, runs_to_json, summarize
from cscompile.metrics import onnx_scorer, perplexity, reference_corpus


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The widest x86 vector ISA the CPU reports (every published figure names it: the VMs vary)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    flags = next(
        (set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set()
    )
    for flag, name in (
        ("avx512_vnni", "AVX-512 VNNI"),
        ("avx512f", "AVX-512"),
        ("avx2", "AVX2"),
        ("sse4_2", "SSE4.2"),
    ):
        if flag in flags:
            return name
    return platform.machine()


def machine_info() -> dict[str, Any]:
    import onnxruntime

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.machine(),
        "processor": cpu_name(),
        "isa": cpu_isa(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }


def chat_encoder(model: TextModel) -> Callable[[Prompt], list[int]]:
    def encode(p: Prompt) -> list[int]:
        return model.tokenizer.encode(model.tokenizer.apply_chat_template(p.messages))

    return encode


def corpus_ids(model: TextModel, corpus: Path | None, max_tokens: int) -> list[int]:
    text = corpus.read_text() if corpus else reference_corpus()
    return model.tokenizer.encode(text)[:max_tokens]


def evaluate_model(
    model: TextModel,
    prompts_path: Path | None = None,
    families: list[str] | None = None,
    max_new_tokens: int = 64,
    ppl_tokens: int = 20480,
    window: int = 512,
    stride: int = 512,
    corpus: Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run the prompt set and perplexity on ``model``; returns a JSON-ready report."""
    session = model.session
    if not isinstance(session, DecoderSession):  # scoring and the threads read are ORT's
        raise UserError("eval", f"a {type(session).__name__} model", "an ONNX model (load_text_model)")
    prompts = load_prompts(prompts_path, families)
    system = OrtSystem(model)
    with PeakRSS() as rss:
        runs = run_prompts(
            system,
            prompts,
            chat_encoder(model),
            model.tokenizer.decode,
            max_new_tokens,
            progress=(lambda i, n: progress("prompts", i, n)) if progress else None,
        )
        ppl = None
        if ppl_tokens > 0:
            ids = corpus_ids(model, corpus, ppl_tokens)
            res = perplexity(
                onnx_scorer(session),
                ids,
                window,
                stride,
                progress=(lambda i, n: progress("perplexity", i, n)) if progress else None,
            )
            ppl = {
                **res.to_dict(),
                "window": window,
                "stride": stride,
                "corpus": str(corpus) if corpus else "pydoc_data.topics",
            }
    return {
        "model": str(session.path),
        "machine": machine_info(),
        "threads": session.session.get_session_options().intra_op_num_threads,
        "max_new_tokens": max_new_tokens,
        "summary": summarize(runs),
        "perplexity": ppl,
        "peak_rss_mb": rss.peak_mb,
        "runs": runs_to_json(runs),
    }


def save_report(
    report: dict[str, Any],
    out: Path,
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[Path], None] | None = None,
) -> None:
    """Write a benchmark's JSON (and its plot as ``out`` with ``.png``), then print its markdown table."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if plot is not None:
        plot(out.with_suffix(".png"))
    print(markdown(report))
