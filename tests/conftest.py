"""Shared fixtures: tiny models built once per session, the real SmolLM2 for the integration tier."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_dir(name) -> Path``: a tiny model (fetched-model layout), built once per session."""
    from cscompile.models.tiny import build_tiny

    built: dict[str, Path] = {}

    def get(name: str = "llama-2l") -> Path:
        if name not in built:
            built[name] = build_tiny(name, tmp_path_factory.mktemp(name.replace("-", "_")))
        return built[name]

    return get


@pytest.fixture(scope="session")
def small_calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped prompt set's short families (code and math: 20 prompts, about 1,000 tiny-model
    tokens) as a ``.jsonl``: motif and Pareto builds calibrate on it in seconds (the whole set, with
    its long retrieval prompts, is 24,000 tokens: a banked motif build took 22 s of CPU on it, an
    ONNX Runtime Pareto build 36 s)."""
    import json

    from cscompile.data.prompts import load_prompts

    rows = [
        {"family": p.family, "id": p.id, "messages": p.messages} for p in load_prompts(None, ["code", "math"])
    ]
    path = tmp_path_factory.mktemp("calib") / "short.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from cscompile.runtime import load_text_model

    return load_text_model(tiny_dir("llama-2l"), threads=1)


@pytest.fixture(scope="session")
def smollm2():
    """The real model, fetched and exported into the cache on first use (about a minute)."""
    from cscompile.models.zoo import fetch

    return fetch("smollm2", progress=lambda m: None)
