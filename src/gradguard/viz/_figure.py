"""The shared figure plumbing of ``viz``: a matplotlib Figure on its own Agg canvas, PNG bytes, the axes style and
the series colours.

Object-oriented matplotlib only (no pyplot, no ``matplotlib.use``), so drawing a plot in a notebook leaves the
user's plotting backend and open figures as they were. matplotlib is imported inside the functions: importing
gradguard does not import it.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Mapping

PALETTE = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7ea4", "#57606a"]


def series_colours(names: Iterable[str]) -> dict[str, str]:
    """One fixed colour per series name (a model, a run, a metric), in first-seen order. A report passes the same
    mapping to every plot, so a series keeps its colour from plot to plot, whichever series a plot leaves out."""
    return {name: PALETTE[index % len(PALETTE)] for index, name in enumerate(dict.fromkeys(names))}


def colour(colours: Mapping[str, str] | None, name: str, index: int) -> str:
    """The series' colour from ``colours``, else the palette's ``index``-th."""
    return (colours or {}).get(name) or PALETTE[index % len(PALETTE)]


def figure(figsize: tuple[float, float], dpi: float | None = None):
    """A matplotlib Figure on its own Agg canvas: no pyplot state and no global backend, so drawing a report in a
    notebook leaves the user's plotting backend and open figures as they were (``dpi=None``: matplotlib's default)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (100 dpi, tight bounding box), for inline embedding and plots/*.png."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def save(fig, path: str | os.PathLike, format: str | None = "png") -> Path:
    """Lay the figure out tightly and write it to ``path`` (its folder made); ``format=None`` follows the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format=format)
    return path


def style(ax, title: str, xlabel: str, ylabel: str) -> None:
    """The report's axes style: title, labels, a light grid, no top or right spine."""
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
