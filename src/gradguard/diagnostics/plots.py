"""PNG plots of gradient-health records (drawn by ``gradguard.viz.training``; no global backend is changed).

Each function takes the records of ``GradientMonitor.records`` or ``load_gradflow(path)`` and a file path,
so reports can draw them long after training. This module hands ``viz`` what diagnostics knows: the layers'
depth order and the dead / saturated thresholds of ``health``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..viz import training
from .health import DEAD_FRACTION, SATURATED_FRACTION, layer_order


def plot_gradient_flow(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Gradient L2 norm (bars) and max |g| (line) per layer over depth, log scale, median over samples."""
    records = list(records)
    return training.plot_gradient_flow(records, layer_order(records), path)


def plot_norm_heatmap(records: Iterable[dict], path: str | os.PathLike, key: str = "grad_norm") -> Path:
    """Heat map of log10(``key``) per layer (rows, input at top) and sampled step (columns)."""
    records = list(records)
    return training.plot_norm_heatmap(records, layer_order(records), path, key)


def plot_activation_health(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Dead-ReLU and saturated sigmoid/tanh fraction per layer (median over samples) with the thresholds."""
    records = list(records)
    return training.plot_activation_health(records, layer_order(records), path, DEAD_FRACTION, SATURATED_FRACTION)


def plot_all(records: Iterable[dict], out_dir: str | os.PathLike) -> list[Path]:
    """Write gradient_flow.png, grad_norm_heatmap.png and activation_health.png into ``out_dir``."""
    records = list(records)
    return training.plot_all(records, layer_order(records), out_dir, DEAD_FRACTION, SATURATED_FRACTION)
