"""What this machine can run, probed without importing heavy packages unless they are there."""

from __future__ import annotations


def gpu_problem() -> str | None:
    """Why this machine cannot build or run TensorRT engines, or None when it can."""
    import importlib.util

    missing = [m for m in ("tensorrt", "torch") if importlib.util.find_spec(m) is None]
    if missing:
        many = len(missing) > 1
        return f"the Python package{'s' if many else ''} {' and '.join(missing)} {'are' if many else 'is'} not installed"
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU visible to torch {torch.__version__}"
    return None
