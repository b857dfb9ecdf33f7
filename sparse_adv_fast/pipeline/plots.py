"""PNG plots of the demo's results (matplotlib's Agg canvas: no display, no pyplot state)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..checkpoint import write_atomic

PLOTS = ("accuracy_vs_sparsity.png", "radius_vs_sparsity.png")


def _figure() -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    # Atomically: a killed run never leaves half a PNG.
    write_atomic(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight"))


def _series(rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    imp = [r for r in rows if r["model"] == "dense" or r["model"].startswith("imp_")]
    other = [r for r in rows if r not in imp]
    return sorted(imp, key=lambda r: r["sparsity"]), other


def accuracy_plot(results: dict[str, Any], path: Path) -> None:
    """Clean and worst-case robust accuracy vs sparsity (IMP line, IWI models as markers)."""
    fig = _figure()
    ax = fig.add_subplot()
    imp, other = _series(results["rows"])
    xs = [100 * r["sparsity"] for r in imp]
    ax.plot(xs, [100 * r["clean"] for r in imp], "o-", color="C0", label="IMP clean")
    ax.plot(xs, [100 * r["worst_case"] for r in imp], "s-", color="C1",
            label="IMP robust (worst case)")
    for i, r in enumerate(other):
        x = 100 * r["sparsity"]
        ax.scatter([x], [100 * r["clean"]], marker="^", color=f"C{i + 2}",
                   label=f"{r['label']} clean")
        ax.scatter([x], [100 * r["worst_case"]], marker="v", color=f"C{i + 2}",
                   label=f"{r['label']} robust")
    ax.set_xlabel("sparsity (% zero weights)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"accuracy vs sparsity (robust: L-inf eps {results['eps']:g})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def radius_plot(results: dict[str, Any], path: Path) -> None:
    """Median first-order robustness radius vs sparsity."""
    fig = _figure()
    ax = fig.add_subplot()
    imp, other = _series(results["rows"])
    pts = [r for r in imp if r["first_order_radius_median"] is not None]
    ax.plot([100 * r["sparsity"] for r in pts], [r["first_order_radius_median"] for r in pts],
            "o-", color="C0", label="IMP tickets")
    for i, r in enumerate(other):
        if r["first_order_radius_median"] is not None:
            ax.scatter([100 * r["sparsity"]], [r["first_order_radius_median"]], marker="^",
                       color=f"C{i + 2}", label=r["label"])
    ax.set_xlabel("sparsity (% zero weights)")
    ax.set_ylabel("first-order radius (median margin / ||grad||_1)")
    ax.set_title("first-order robustness radius vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def write_all(results: dict[str, Any], out: str | os.PathLike[str]) -> list[Path]:
    """Write both plots into ``out``; returns their paths."""
    out = Path(out)
    paths = [out / p for p in PLOTS]
    accuracy_plot(results, paths[0])
    radius_plot(results, paths[1])
    return paths
