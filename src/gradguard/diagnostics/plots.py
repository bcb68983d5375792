"""PNG plots of gradient-health records (matplotlib's Agg canvas; no global backend is changed).

Each function takes the records of ``GradientMonitor.records`` or ``load_gradflow(path)`` and a file path,
so reports can draw them long after training.
"""
from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Iterable

from ..errors import InputError
from .health import DEAD_FRACTION, SATURATED_FRACTION, layer_order


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _checked(records: Iterable[dict]) -> list[dict]:
    records = list(records)
    if not records:
        raise InputError("records: no gradient-health records to plot; train with a GradientMonitor attached first")
    return records


def _labels(records: list[dict], layers: list[str]) -> list[str]:
    """Each layer's depth among the monitored layers (1, 2, ... in forward order), then its module name, with the
    module type when the name alone is a bare index: in an nn.Sequential with activations between the layers the
    names are 1, 3, 5, ..., which are module positions, not layer counts."""
    types = {r["layer"]: r.get("type") for r in records}
    return [f"{depth}: {name} {types[name]}" if name.isdigit() and types.get(name) else f"{depth}: {name}"
            for depth, name in enumerate(layers, 1)]


def _per_layer(records: list[dict], key: str) -> tuple[list[str], list[float | None]]:
    """Median of ``key`` per layer over the samples where it is known, in depth order."""
    layers = layer_order(records)
    values = []
    for layer in layers:
        known = [r[key] for r in records if r["layer"] == layer and r.get(key) is not None]
        values.append(statistics.median(known) if known else None)
    return layers, values


def plot_gradient_flow(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Gradient L2 norm (bars) and max |g| (line) per layer over depth, log scale, median over samples."""
    records = _checked(records)
    layers, norms = _per_layer(records, "grad_norm")
    _, maxima = _per_layer(records, "grad_max")
    figure = _figure(max(6.0, 0.45 * len(layers) + 2), 4.0)
    axes = figure.add_subplot()
    positions = range(len(layers))
    axes.bar(positions, [n if n and n > 0 else math.nan for n in norms], color="#4c72b0", label="‖g‖₂ per layer")
    axes.plot(positions, [m if m and m > 0 else math.nan for m in maxima], "o-", color="#dd8452", label="max |g|")
    axes.set_yscale("log")
    axes.set_xticks(list(positions), _labels(records, layers), rotation=60, ha="right", fontsize=8)
    axes.set_xlabel("layer with parameters (depth: module), input → output")
    axes.set_ylabel("gradient (median over sampled steps)")
    axes.set_title("Gradient flow")
    axes.legend(fontsize=8)
    axes.grid(True, axis="y", which="major", alpha=0.3)
    return _save(figure, path)


def plot_norm_heatmap(records: Iterable[dict], path: str | os.PathLike, key: str = "grad_norm") -> Path:
    """Heat map of log10(``key``) per layer (rows, input at top) and sampled step (columns)."""
    records = _checked(records)
    layers = layer_order(records)
    steps = sorted({r["step"] for r in records})
    column = {step: i for i, step in enumerate(steps)}
    row = {layer: i for i, layer in enumerate(layers)}
    grid = [[math.nan] * len(steps) for _ in layers]
    for record in records:
        value = record.get(key)
        if value is not None and value > 0:
            grid[row[record["layer"]]][column[record["step"]]] = math.log10(value)
    figure = _figure(8.0, max(3.0, 0.3 * len(layers) + 1.5))
    axes = figure.add_subplot()
    image = axes.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
    axes.set_yticks(range(len(layers)), _labels(records, layers), fontsize=8)
    axes.set_xlabel("training step")
    axes.set_title(f"log10 {key} per layer over time")
    figure.colorbar(image, ax=axes, label=f"log10 {key}")
    return _save(figure, path)


def plot_activation_health(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Dead-ReLU and saturated sigmoid/tanh fraction per layer (median over samples) with the thresholds."""
    records = _checked(records)
    layers, dead = _per_layer(records, "dead_fraction")
    _, saturated = _per_layer(records, "saturated_fraction")
    figure = _figure(max(6.0, 0.45 * len(layers) + 2), 4.0)
    axes = figure.add_subplot()
    positions = list(range(len(layers)))
    width = 0.4
    axes.bar([p - width / 2 for p in positions], [d if d is not None else 0 for d in dead], width,
             color="#c44e52", label="dead ReLU units")
    axes.bar([p + width / 2 for p in positions], [s if s is not None else 0 for s in saturated], width,
             color="#8172b3", label="saturated sigmoid/tanh outputs")
    axes.axhline(DEAD_FRACTION, color="#c44e52", linestyle="--", linewidth=1, label="dead threshold")
    axes.axhline(SATURATED_FRACTION, color="#8172b3", linestyle=":", linewidth=1, label="saturation threshold")
    if all(d is None for d in dead) and all(s is None for s in saturated):
        axes.text(0.5, 0.5, "no ReLU / sigmoid / tanh modules observed", transform=axes.transAxes, ha="center")
    axes.set_ylim(0, 1.05)
    axes.set_xticks(positions, _labels(records, layers), rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("fraction (median over sampled steps)")
    axes.set_title("Activation health")
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_all(records: Iterable[dict], out_dir: str | os.PathLike) -> list[Path]:
    """Write gradient_flow.png, grad_norm_heatmap.png and activation_health.png into ``out_dir``."""
    records = _checked(records)
    out_dir = Path(out_dir)
    return [plot_gradient_flow(records, out_dir / "gradient_flow.png"),
            plot_norm_heatmap(records, out_dir / "grad_norm_heatmap.png"),
            plot_activation_health(records, out_dir / "activation_health.png")]
