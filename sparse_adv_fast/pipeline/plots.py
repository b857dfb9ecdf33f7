"""The plots' canvas and atomic PNG save (matplotlib's Agg canvas: no display, no pyplot
state); the study's figures are drawn in ``study_report``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checkpoint import write_atomic


def _figure() -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    # Atomically: a killed run never leaves half a PNG.
    write_atomic(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight"))
