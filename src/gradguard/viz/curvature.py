"""Curvature figures: the Hessian eigenvalue density and the per-sample input-curvature histogram (PNG bytes)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ._figure import PALETTE, figure, png_bytes, style


def hessian_density(grid: Sequence[float], density: Sequence[float], top: Sequence[float] = ()) -> bytes:
    """Eigenvalue density of the loss Hessian (stochastic Lanczos quadrature), log scale, top eigenvalues marked."""
    fig = figure((6.4, 3.6))
    ax = fig.subplots()
    values = np.maximum(np.asarray(density, dtype=float), 1e-12)
    ax.semilogy(grid, values, color=PALETTE[0])
    for value in top:
        ax.axvline(value, color=PALETTE[1], alpha=0.4, lw=1)
    style(ax, "Hessian eigenvalue density (SLQ)", "eigenvalue", "density")
    return png_bytes(fig)


def input_curvature_histogram(values: Sequence[float], quantiles: Mapping[str, float]) -> bytes:
    """Histogram of per-sample input curvature ĝᵀ∇²ℓĝ, with the median and the 95th percentile marked."""
    fig = figure((6.4, 3.6))
    ax = fig.subplots()
    ax.hist(np.asarray(values, dtype=float), bins=min(40, max(5, len(values) // 5)), color=PALETTE[0], alpha=0.8)
    for key, color in (("q50", PALETTE[2]), ("q95", PALETTE[1])):
        if key in quantiles:
            ax.axvline(quantiles[key], color=color, lw=1.5, label=f"{key} = {quantiles[key]:.3g}")
    style(ax, "Input-space curvature per sample", "curvature along the input gradient", "samples")
    ax.legend(frameon=False)
    return png_bytes(fig)
