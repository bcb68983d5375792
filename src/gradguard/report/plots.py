"""Report figures as PNG bytes (matplotlib figures on their own Agg canvas: no display, no network, no pyplot).

Each function takes plain data read from a run directory (dicts, lists, arrays) and returns PNG bytes, so
plots can be embedded inline in report.html (base64) and also written to plots/*.png.
"""
from __future__ import annotations

import io
import math
from typing import Iterable, Mapping, Sequence

import numpy as np

PALETTE = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7ea4", "#57606a"]


def series_colours(names: Iterable[str]) -> dict[str, str]:
    """One fixed colour per series name (a model, a run, a metric), in first-seen order. A report passes the same
    mapping to every plot, so a series keeps its colour from plot to plot, whichever series a plot leaves out."""
    return {name: PALETTE[index % len(PALETTE)] for index, name in enumerate(dict.fromkeys(names))}


def _colour(colours: Mapping[str, str] | None, name: str, index: int) -> str:
    return (colours or {}).get(name) or PALETTE[index % len(PALETTE)]


def _figure(figsize: tuple[float, float]):
    """A matplotlib Figure on its own Agg canvas: no pyplot state and no global backend, so drawing a report in a
    notebook leaves the user's plotting backend and open figures as they were."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def accuracy_vs_eps(curves: Mapping[str, Mapping[str, Sequence[float]]], norm: str = "linf",
                    colours: Mapping[str, str] | None = None) -> bytes:
    """Robust accuracy against eps, one line per model (``curves[label] = {"eps": [...], "robust_accuracy": [...]}``)."""
    fig = _figure((6.4, 4.0))
    ax = fig.subplots()
    for index, (label, curve) in enumerate(curves.items()):
        ax.plot(curve["eps"], curve["robust_accuracy"], marker="o", color=_colour(colours, label, index),
                label=label)
    ax.set_ylim(-0.02, 1.02)
    _style(ax, "Robust accuracy vs perturbation budget", f"eps ({norm})", "robust accuracy")
    ax.legend(frameon=False)
    return _png(fig)


def per_attack_bars(table: Mapping[str, Mapping[str, float]], colours: Mapping[str, str] | None = None) -> bytes:
    """Grouped bars: accuracy per attack (columns) for each model (``table[model][attack] = accuracy``)."""
    attacks = list(dict.fromkeys(a for row in table.values() for a in row))
    fig = _figure((max(6.4, 1.1 * len(attacks) * max(1, len(table))), 4.0))
    ax = fig.subplots()
    width = 0.8 / max(1, len(table))
    for index, (label, row) in enumerate(table.items()):
        xs = np.arange(len(attacks)) + (index - (len(table) - 1) / 2) * width
        values = [row.get(a, math.nan) for a in attacks]
        bars = ax.bar(xs, values, width=width, color=_colour(colours, label, index), label=label)
        for bar, value in zip(bars, values, strict=True):
            if not math.isnan(value):
                ax.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.2f}", ha="center", fontsize=8)
    ax.set_xticks(np.arange(len(attacks)), attacks)
    ax.set_ylim(0, 1.08)
    _style(ax, "Accuracy under each attack", "", "accuracy")
    ax.legend(frameon=False, loc="upper right")
    return _png(fig)


def per_class_bars(per_class: Mapping[str, Mapping[str, float]], title: str) -> bytes:
    """Clean and robust accuracy per class (``per_class[name] = {"clean": a, "robust": b}``)."""
    names = list(per_class)
    fig = _figure((max(6.4, 0.6 * len(names)), 3.6))
    ax = fig.subplots()
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, [per_class[n].get("clean", math.nan) for n in names], 0.4, color=PALETTE[0], label="clean")
    ax.bar(xs + 0.2, [per_class[n].get("robust", math.nan) for n in names], 0.4, color=PALETTE[1], label="robust")
    ax.set_xticks(xs, names, rotation=30 if max(map(len, names), default=0) > 3 else 0, ha="right" if max(map(len, names), default=0) > 3 else "center")
    ax.set_ylim(0, 1.05)
    _style(ax, title, "class", "accuracy")
    ax.legend(frameon=False, ncol=2, loc="lower left", bbox_to_anchor=(0.0, 1.06))
    return _png(fig)


def example_grid(x: np.ndarray, x_adv: np.ndarray, y: np.ndarray, pred: np.ndarray, pred_adv: np.ndarray,
                 classes: Sequence[str], title: str) -> bytes:
    """Rows: clean image (true label / prediction), adversarial image (prediction), perturbation (amplified)."""
    n = len(x)
    fig = _figure((1.25 * n, 4.3))
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
    return _png(fig)


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
    fig = _figure((9.6, 3.4))
    left, right = fig.subplots(1, 2)
    for index, key in enumerate(loss_keys):
        left.plot(*_series(epochs, history, key), marker="o", color=_colour(colours, key, index), label=key)
    for index, key in enumerate(acc_keys):
        right.plot(*_series(epochs, history, key), marker="o", color=_colour(colours, key, index), label=key)
    _style(left, f"{title}: loss", "epoch", "loss")
    _style(right, f"{title}: accuracy", "epoch", "accuracy")
    right.set_ylim(-0.02, 1.02)
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (left, right):
        if ax.lines:
            ax.legend(frameon=False, fontsize=8)
    return _png(fig)


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
    fig = _figure((10.4, 3.8))
    left, right = fig.subplots(1, 2)
    longest: list[str] = []
    for index, (label, layers) in enumerate(runs.items()):
        names = list(layers)
        longest = names if len(names) > len(longest) else longest
        means = [float(np.mean(layers[n])) if len(layers[n]) else math.nan for n in names]
        left.plot(range(1, len(names) + 1), np.maximum(means, 1e-30), marker="o",
                  color=_colour(colours, label, index), label=label)
        if names:
            right.plot(np.maximum(np.asarray(layers[names[0]], dtype=float), 1e-30), marker=".",
                       color=_colour(colours, label, index), label=f"{label} (layer {names[0]})")
    left.set_yscale("log")
    right.set_yscale("log")
    shared = all(list(layers) == longest[:len(layers)] for layers in runs.values())
    left.set_xticks(range(1, len(longest) + 1),
                    [f"{i}\n{name}" if shared and name != str(i) else str(i) for i, name in enumerate(longest, 1)],
                    fontsize=8)
    _style(left, "per layer, mean over training",
           "layer with parameters, input → output" + (" (module name below)" if shared else ""), metric)
    _style(right, "first layer, over training", "sampled step", metric)
    fig.suptitle("Gradient flow", fontsize=11)
    for ax in (left, right):
        if ax.lines:
            ax.legend(frameon=False, fontsize=8)
    return _png(fig)


def _series(epochs, history, key):
    pairs = [(e, r[key]) for e, r in zip(epochs, history, strict=True) if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _hwc(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=float)
    if image.ndim == 2:
        return image[..., None]
    return np.moveaxis(image, 0, -1)


def _name(classes: Sequence[str], index) -> str:
    index = int(index)
    name = classes[index] if 0 <= index < len(classes) else str(index)
    return name if len(name) <= 10 else name[:9] + "…"


def certified_accuracy(curves: Mapping[str, Mapping[str, Sequence[float]]], sigma: float | None = None,
                       colours: Mapping[str, str] | None = None) -> bytes:
    """Certified accuracy of the *smoothed* classifier against L2 radius, one step line per model
    (``curves[label] = {"radius": [...], "certified_accuracy": [...]}``)."""
    fig = _figure((6.4, 4.0))
    ax = fig.subplots()
    for index, (label, curve) in enumerate(curves.items()):
        ax.step(curve["radius"], curve["certified_accuracy"], where="post", color=_colour(colours, label, index),
                label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    noise = f" (σ = {sigma:g})" if sigma is not None else ""
    _style(ax, f"Certified accuracy of the smoothed classifier{noise}", "L2 radius", "certified accuracy")
    ax.legend(frameon=False)
    return _png(fig)


def hessian_density(grid: Sequence[float], density: Sequence[float], top: Sequence[float] = ()) -> bytes:
    """Eigenvalue density of the loss Hessian (stochastic Lanczos quadrature), log scale, top eigenvalues marked."""
    fig = _figure((6.4, 3.6))
    ax = fig.subplots()
    values = np.maximum(np.asarray(density, dtype=float), 1e-12)
    ax.semilogy(grid, values, color=PALETTE[0])
    for value in top:
        ax.axvline(value, color=PALETTE[1], alpha=0.4, lw=1)
    _style(ax, "Hessian eigenvalue density (SLQ)", "eigenvalue", "density")
    return _png(fig)


def input_curvature_histogram(values: Sequence[float], quantiles: Mapping[str, float]) -> bytes:
    """Histogram of per-sample input curvature ĝᵀ∇²ℓĝ, with the median and the 95th percentile marked."""
    fig = _figure((6.4, 3.6))
    ax = fig.subplots()
    ax.hist(np.asarray(values, dtype=float), bins=min(40, max(5, len(values) // 5)), color=PALETTE[0], alpha=0.8)
    for key, color in (("q50", PALETTE[2]), ("q95", PALETTE[1])):
        if key in quantiles:
            ax.axvline(quantiles[key], color=color, lw=1.5, label=f"{key} = {quantiles[key]:.3g}")
    _style(ax, "Input-space curvature per sample", "curvature along the input gradient", "samples")
    ax.legend(frameon=False)
    return _png(fig)
