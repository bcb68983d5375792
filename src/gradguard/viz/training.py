"""Training figures: loss and accuracy per epoch, gradient flow of several runs side by side (PNG bytes), and the
gradient-health plots of one run's records over depth (gradient flow, norm heat map, activation health; PNG files).

The health plots take the layers' depth order and the dead / saturated thresholds as arguments: they are
diagnostics' numbers (``gradguard.diagnostics.health``), and ``gradguard.diagnostics.plots`` passes them in, so
``viz`` imports nothing above ``errors``.
"""
from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from ._figure import colour, figure, png_bytes, save, style


# ------------------------------------------------------------------------------------------------ report figures
def training_curves(history: Sequence[Mapping[str, object]], title: str,
                    colours: Mapping[str, str] | None = None) -> bytes:
    """Loss (left) and accuracy (right) per epoch from metrics.jsonl records."""
    epochs = [int(epoch) if isinstance(epoch := r.get("epoch"), (int, float)) else i + 1 for i, r in enumerate(history)]
    keys = [k for k in dict.fromkeys(k for r in history for k in r) if k != "epoch"]
    numeric = [k for k in keys if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                      for r in history if r.get(k) is not None)
               and any(r.get(k) is not None for r in history)]
    loss_keys = [k for k in numeric if "loss" in k or "objective" in k]
    acc_keys = [k for k in numeric if "acc" in k]
    fig = figure((9.6, 3.4))
    left, right = fig.subplots(1, 2)
    for index, key in enumerate(loss_keys):
        left.plot(*_series(epochs, history, key), marker="o", color=colour(colours, key, index), label=key)
    for index, key in enumerate(acc_keys):
        right.plot(*_series(epochs, history, key), marker="o", color=colour(colours, key, index), label=key)
    style(left, f"{title}: loss", "epoch", "loss")
    style(right, f"{title}: accuracy", "epoch", "accuracy")
    right.set_ylim(-0.02, 1.02)
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (left, right):
        if ax.lines:
            ax.legend(frameon=False, fontsize=8)
    return png_bytes(fig)


def gradient_flow(runs: Mapping[str, Mapping[str, Sequence[float]]], metric: str,
                  colours: Mapping[str, str] | None = None) -> bytes:
    """Per-layer gradient size (log scale) for several runs side by side: the vanishing-gradient picture.

    ``runs[label] = {layer_name: [value at each sampled step]}``; the left panel shows each layer's mean over
    training (input layer first), the right panel the first layer's value over the sampled steps.

    The layer axis counts the monitored layers (those with parameters) 1, 2, ... in forward order, so an MLP with 8
    hidden layers shows 1-9 (8 hidden + output), not the positions of its modules in an ``nn.Sequential`` (1, 3,
    ..., 17 when activations sit between them); the module names, which the findings use, stand under the numbers
    when every run shares them.
    """
    fig = figure((10.4, 3.8))
    left, right = fig.subplots(1, 2)
    longest: list[str] = []
    for index, (label, layers) in enumerate(runs.items()):
        names = list(layers)
        longest = names if len(names) > len(longest) else longest
        means = [float(np.mean(layers[n])) if len(layers[n]) else math.nan for n in names]
        left.plot(range(1, len(names) + 1), np.maximum(means, 1e-30), marker="o",
                  color=colour(colours, label, index), label=label)
        if names:
            right.plot(np.maximum(np.asarray(layers[names[0]], dtype=float), 1e-30), marker=".",
                       color=colour(colours, label, index), label=f"{label} (layer {names[0]})")
    left.set_yscale("log")
    right.set_yscale("log")
    shared = all(list(layers) == longest[:len(layers)] for layers in runs.values())
    left.set_xticks(range(1, len(longest) + 1),
                    [f"{i}\n{name}" if shared and name != str(i) else str(i) for i, name in enumerate(longest, 1)],
                    fontsize=8)
    style(left, "per layer, mean over training",
          "layer with parameters, input → output" + (" (module name below)" if shared else ""), metric)
    style(right, "first layer, over training", "sampled step", metric)
    fig.suptitle("Gradient flow", fontsize=11)
    for ax in (left, right):
        if ax.lines:
            ax.legend(frameon=False, fontsize=8)
    return png_bytes(fig)


def _series(epochs, history, key):
    pairs = [(e, r[key]) for e, r in zip(epochs, history, strict=True) if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ------------------------------------------------------------------------------------------------ one run's health
def _checked(records: Sequence[dict]) -> list[dict]:
    records = list(records)
    if not records:
        raise InputError("records: no gradient-health records to plot; train with a GradientMonitor attached first")
    return records


def _labels(records: list[dict], layers: Sequence[str]) -> list[str]:
    """Each layer's depth among the monitored layers (1, 2, ... in forward order), then its module name, with the
    module type when the name alone is a bare index: in an nn.Sequential with activations between the layers the
    names are 1, 3, 5, ..., which are module positions, not layer counts."""
    types = {r["layer"]: r.get("type") for r in records}
    return [f"{depth}: {name} {types[name]}" if name.isdigit() and types.get(name) else f"{depth}: {name}"
            for depth, name in enumerate(layers, 1)]


def _per_layer(records: list[dict], layers: Sequence[str], key: str) -> list[float | None]:
    """Median of ``key`` per layer over the samples where it is known, in the order of ``layers``."""
    values = []
    for layer in layers:
        known = [r[key] for r in records if r["layer"] == layer and r.get(key) is not None]
        values.append(statistics.median(known) if known else None)
    return values


def plot_gradient_flow(records: Sequence[dict], layers: Sequence[str], path: str | os.PathLike) -> Path:
    """Gradient L2 norm (bars) and max |g| (line) per layer over depth (``layers``, input first), log scale,
    median over samples."""
    records = _checked(records)
    norms = _per_layer(records, layers, "grad_norm")
    maxima = _per_layer(records, layers, "grad_max")
    fig = figure((max(6.0, 0.45 * len(layers) + 2), 4.0), dpi=100)
    axes = fig.add_subplot()
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
    return save(fig, path)


def plot_norm_heatmap(records: Sequence[dict], layers: Sequence[str], path: str | os.PathLike,
                      key: str = "grad_norm") -> Path:
    """Heat map of log10(``key``) per layer (rows, ``layers`` in order, input at top) and sampled step (columns)."""
    records = _checked(records)
    steps = sorted({r["step"] for r in records})
    column = {step: i for i, step in enumerate(steps)}
    row = {layer: i for i, layer in enumerate(layers)}
    grid = [[math.nan] * len(steps) for _ in layers]
    for record in records:
        value = record.get(key)
        if value is not None and value > 0:
            grid[row[record["layer"]]][column[record["step"]]] = math.log10(value)
    fig = figure((8.0, max(3.0, 0.3 * len(layers) + 1.5)), dpi=100)
    axes = fig.add_subplot()
    image = axes.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
    axes.set_yticks(range(len(layers)), _labels(records, layers), fontsize=8)
    axes.set_xlabel("training step")
    axes.set_title(f"log10 {key} per layer over time")
    fig.colorbar(image, ax=axes, label=f"log10 {key}")
    return save(fig, path)


def plot_activation_health(records: Sequence[dict], layers: Sequence[str], path: str | os.PathLike,
                           dead_fraction: float, saturated_fraction: float) -> Path:
    """Dead-ReLU and saturated sigmoid/tanh fraction per layer (median over samples) with the two thresholds
    drawn as lines."""
    records = _checked(records)
    dead = _per_layer(records, layers, "dead_fraction")
    saturated = _per_layer(records, layers, "saturated_fraction")
    fig = figure((max(6.0, 0.45 * len(layers) + 2), 4.0), dpi=100)
    axes = fig.add_subplot()
    positions = list(range(len(layers)))
    width = 0.4
    axes.bar([p - width / 2 for p in positions], [d if d is not None else 0 for d in dead], width,
             color="#c44e52", label="dead ReLU units")
    axes.bar([p + width / 2 for p in positions], [s if s is not None else 0 for s in saturated], width,
             color="#8172b3", label="saturated sigmoid/tanh outputs")
    axes.axhline(dead_fraction, color="#c44e52", linestyle="--", linewidth=1, label="dead threshold")
    axes.axhline(saturated_fraction, color="#8172b3", linestyle=":", linewidth=1, label="saturation threshold")
    if all(d is None for d in dead) and all(s is None for s in saturated):
        axes.text(0.5, 0.5, "no ReLU / sigmoid / tanh modules observed", transform=axes.transAxes, ha="center")
    axes.set_ylim(0, 1.05)
    axes.set_xticks(positions, _labels(records, layers), rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("fraction (median over sampled steps)")
    axes.set_title("Activation health")
    axes.legend(fontsize=8)
    return save(fig, path)


def plot_all(records: Sequence[dict], layers: Sequence[str], out_dir: str | os.PathLike, dead_fraction: float,
             saturated_fraction: float) -> list[Path]:
    """Write gradient_flow.png, grad_norm_heatmap.png and activation_health.png into ``out_dir``."""
    records = _checked(records)
    out_dir = Path(out_dir)
    return [plot_gradient_flow(records, layers, out_dir / "gradient_flow.png"),
            plot_norm_heatmap(records, layers, out_dir / "grad_norm_heatmap.png"),
            plot_activation_health(records, layers, out_dir / "activation_health.png", dead_fraction,
                                   saturated_fraction)]
