"""The randomized-smoothing figure: certified accuracy against L2 radius (PNG bytes)."""
from __future__ import annotations

from typing import Mapping, Sequence

from ._figure import colour, figure, png_bytes, style


def certified_accuracy(curves: Mapping[str, Mapping[str, Sequence[float]]], sigma: float | None = None,
                       colours: Mapping[str, str] | None = None) -> bytes:
    """Certified accuracy of the *smoothed* classifier against L2 radius, one step line per model
    (``curves[label] = {"radius": [...], "certified_accuracy": [...]}``)."""
    fig = figure((6.4, 4.0))
    ax = fig.subplots()
    for index, (label, curve) in enumerate(curves.items()):
        ax.step(curve["radius"], curve["certified_accuracy"], where="post", color=colour(colours, label, index),
                label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    noise = f" (σ = {sigma:g})" if sigma is not None else ""
    style(ax, f"Certified accuracy of the smoothed classifier{noise}", "L2 radius", "certified accuracy")
    ax.legend(frameon=False)
    return png_bytes(fig)
