"""Plot helpers shared by the benchmark tools (matplotlib, headless)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display on these machines)."""
    try:
        import matplotlib
    except ImportError:
        from cscompile.errors import UserError

        raise UserError("plots", "matplotlib is not installed", "pip install 'cscompile[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def replot(json_path: Path, plot: Callable[[list[dict], Path], None]) -> None:
    """Redraw a benchmark's PNG from its saved JSON (``results`` rows) without rerunning it."""
    plot(json.loads(Path(json_path).read_text())["results"], Path(json_path).with_suffix(".png"))
