"""Robustness figures: accuracy against eps, accuracy per attack and per class, adversarial example grids, and the
robust-accuracy curve of ``RobustnessCurve.plot``.

Each takes plain numbers (dicts, lists, arrays read from a run directory) and returns PNG bytes (``curve`` writes
its file), so evaluation and report draw the same way without importing matplotlib themselves.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ._figure import PALETTE, colour, figure, png_bytes, save, style


def accuracy_vs_eps(curves: Mapping[str, Mapping[str, Sequence[float]]], norm: str = "linf",
                    colours: Mapping[str, str] | None = None) -> bytes:
    """Robust accuracy against eps, one line per model (``curves[label] = {"eps": [...], "robust_accuracy": [...]}``)."""
    fig = figure((6.4, 4.0))
    ax = fig.subplots()
    for index, (label, curve) in enumerate(curves.items()):
        ax.plot(curve["eps"], curve["robust_accuracy"], marker="o", color=colour(colours, label, index),
                label=label)
    ax.set_ylim(-0.02, 1.02)
    style(ax, "Robust accuracy vs perturbation budget", f"eps ({norm})", "robust accuracy")
    ax.legend(frameon=False)
    return png_bytes(fig)


def per_attack_bars(table: Mapping[str, Mapping[str, float]], colours: Mapping[str, str] | None = None) -> bytes:
    """Grouped bars: accuracy per attack (columns) for each model (``table[model][attack] = accuracy``)."""
    attacks = list(dict.fromkeys(a for row in table.values() for a in row))
    fig = figure((max(6.4, 1.1 * len(attacks) * max(1, len(table))), 4.0))
    ax = fig.subplots()
    width = 0.8 / max(1, len(table))
    for index, (label, row) in enumerate(table.items()):
        xs = np.arange(len(attacks)) + (index - (len(table) - 1) / 2) * width
        values = [row.get(a, math.nan) for a in attacks]
        bars = ax.bar(xs, values, width=width, color=colour(colours, label, index), label=label)
        for bar, value in zip(bars, values, strict=True):
            if not math.isnan(value):
                ax.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.2f}", ha="center", fontsize=8)
    ax.set_xticks(np.arange(len(attacks)), attacks)
    ax.set_ylim(0, 1.08)
    style(ax, "Accuracy under each attack", "", "accuracy")
    ax.legend(frameon=False, loc="upper right")
    return png_bytes(fig)


def per_class_bars(per_class: Mapping[str, Mapping[str, float]], title: str) -> bytes:
    """Clean and robust accuracy per class (``per_class[name] = {"clean": a, "robust": b}``)."""
    names = list(per_class)
    fig = figure((max(6.4, 0.6 * len(names)), 3.6))
    ax = fig.subplots()
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, [per_class[n].get("clean", math.nan) for n in names], 0.4, color=PALETTE[0], label="clean")
    ax.bar(xs + 0.2, [per_class[n].get("robust", math.nan) for n in names], 0.4, color=PALETTE[1], label="robust")
    ax.set_xticks(xs, names, rotation=30 if max(map(len, names), default=0) > 3 else 0, ha="right" if max(map(len, names), default=0) > 3 else "center")
    ax.set_ylim(0, 1.05)
    style(ax, title, "class", "accuracy")
    ax.legend(frameon=False, ncol=2, loc="lower left", bbox_to_anchor=(0.0, 1.06))
    return png_bytes(fig)


def example_grid(x: np.ndarray, x_adv: np.ndarray, y: np.ndarray, pred: np.ndarray, pred_adv: np.ndarray,
                 classes: Sequence[str], title: str) -> bytes:
    """Rows: clean image (true label / prediction), adversarial image (prediction), perturbation (amplified)."""
    n = len(x)
    fig = figure((1.25 * n, 4.3))
    axes = fig.subplots(3, n, squeeze=False)
    delta = x_adv - x
    scale = float(np.abs(delta).max()) or 1.0
    for column in range(n):
        images = (_hwc(x[column]), _hwc(x_adv[column]), _hwc(delta[column]).mean(axis=-1))
        for row, image in enumerate(images):
            ax = axes[row][column]
            if row == 2:
                ax.imshow(image, cmap="RdBu_r", vmin=-scale, vmax=scale, interpolation="nearest")
            else:
                ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
        ok = pred[column] == y[column]
        flipped = pred_adv[column] != y[column]
        axes[0][column].set_title(f"y={_name(classes, y[column])}\np={_name(classes, pred[column])}", fontsize=7,
                                  color="black" if ok else "#d1242f")
        axes[1][column].set_title(f"p={_name(classes, pred_adv[column])}", fontsize=7,
                                  color="#d1242f" if flipped else "#1a7f37")
    for row, label in enumerate(("clean", "adversarial", f"δ (±{scale:.2g})")):
        axes[row][0].set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return png_bytes(fig)


def curve(eps: Sequence[float], robust_accuracy: Sequence[float], clean_accuracy: float, norm: str,
          suite: Sequence[str], path: str | os.PathLike) -> Path:
    """Write robust accuracy vs eps (and the clean accuracy line) to ``path`` (its suffix picks the format);
    returns the path. The figure of ``RobustnessCurve.plot``."""
    fig = figure((5, 3.5), dpi=120)
    axes = fig.subplots()
    axes.plot(eps, [100 * a for a in robust_accuracy], marker="o", label="robust (worst case)")
    axes.axhline(100 * clean_accuracy, color="grey", linestyle="--", linewidth=1, label="clean")
    axes.set_xlabel(f"eps ({norm})")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title(f"suite: {' → '.join(suite)}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return save(fig, path, format=None)


def _hwc(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=float)
    if image.ndim == 2:
        return image[..., None]
    return np.moveaxis(image, 0, -1)


def _name(classes: Sequence[str], index) -> str:
    index = int(index)
    name = classes[index] if 0 <= index < len(classes) else str(index)
    return name if len(name) <= 10 else name[:9] + "…"
