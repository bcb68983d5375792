"""Input-space curvature: per sample, the loss's curvature along its own input gradient (CURE's quantity), by a
finite difference of input gradients or an exact double-backward product, and its distribution over a dataset.

The input gradients come from the one primitive, ``core.gradient.input_gradient`` (``create_graph=True`` for the
double-backward product); the model is in eval mode without frozen parameters (``core.guard.model_guard``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from ...checks import positive_float, positive_int
from ...core.gradient import input_gradient
from ...core.guard import model_guard
from ...errors import ConfigError, InputError, ShapeError
from .hvp import LossFn, check_data, per_sample_cross_entropy


def input_curvature(model: nn.Module, x: Tensor, y: Tensor, *, h: float = 1e-3, method: str = "finite-difference",
                    loss_fn: LossFn | None = None, batch_size: int | None = None) -> Tensor:
    """Per-sample curvature of the loss along its input gradient: ĝᵀ ∇²_x ℓ ĝ, ĝ = g/‖g‖, shape (batch,).

    ``method="finite-difference"`` (default, as in CURE, Moosavi-Dezfooli et al. 2019) uses
    (∇ℓ(x + hĝ) - ∇ℓ(x - hĝ))·ĝ / 2h, which also sees the kinks of ReLU networks at scale ``h``;
    ``method="hvp"`` is the exact double-backward value at x. A sample whose gradient is zero has no
    direction and gets 0. Parameters get no gradient; their ``requires_grad`` flags are left alone.
    """
    check_data(model, x, y)
    h = positive_float(h, "h")
    if method not in ("finite-difference", "hvp"):
        raise ConfigError(f"method: expected 'finite-difference' or 'hvp', got {method!r}")
    loss_fn = loss_fn or per_sample_cross_entropy
    batch_size = positive_int(batch_size, "batch_size") if batch_size is not None else x.shape[0]
    parts = []
    with model_guard(model, freeze=False), torch.enable_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            parts.append(_input_curvature_batch(model, xb.detach(), yb, h, method, loss_fn))
    return torch.cat(parts)


def _input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn,
                    create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """(∇ₓ of the summed loss, the leaf ``x`` to differentiate it again in) through the core ``input_gradient``."""
    batch = x.shape[0]

    def objective(logits: Tensor, targets: Tensor, targeted: bool) -> Tensor:
        values = loss_fn(logits, targets)
        if values.dim() == 0:  # a batch mean, as in summed_loss
            return values * batch
        if values.shape[0] != batch:
            raise ShapeError(f"loss_fn: expected per-sample losses of shape ({batch},), got {tuple(values.shape)}")
        return values

    x = x.detach().requires_grad_(True)
    grad, _, _ = input_gradient(model, x, y, objective, False, create_graph=create_graph, checked=False)
    return grad, x


def _input_curvature_batch(model: nn.Module, x: Tensor, y: Tensor, h: float, method: str, loss_fn: LossFn) -> Tensor:
    # Samples are independent in eval mode, so the gradient of the summed loss holds each sample's own
    # gradient, and a per-sample direction gives each sample's own curvature.
    if method == "hvp":
        grad, leaf = _input_gradient(model, x, y, loss_fn, create_graph=True)
        flat = grad.flatten(1)
        norms = flat.norm(dim=1)
        direction = (flat / norms.clamp_min(1e-30).unsqueeze(1)).detach()
        (product,) = torch.autograd.grad((flat * direction).sum(), leaf)
        curvature = (product.flatten(1) * direction).sum(1)
    else:
        grad, _ = _input_gradient(model, x, y, loss_fn)
        flat = grad.flatten(1)
        norms = flat.norm(dim=1)
        direction = flat / norms.clamp_min(1e-30).unsqueeze(1)
        step = (h * direction).view_as(x)
        ahead, _ = _input_gradient(model, x + step, y, loss_fn)
        behind, _ = _input_gradient(model, x - step, y, loss_fn)
        curvature = ((ahead - behind).flatten(1) * direction).sum(1) / (2 * h)
    return torch.where(norms > 0, curvature, torch.zeros_like(curvature)).detach()


@dataclass
class InputCurvatureSummary:
    """Per-sample input curvature over a dataset (``values``, in data order) and its distribution."""

    values: Tensor
    mean: float
    quantiles: dict[str, float]
    elapsed_s: float

    def to_dict(self) -> dict:
        return {"n_samples": int(self.values.numel()), "mean": self.mean, "quantiles": self.quantiles,
                "elapsed_s": self.elapsed_s}


def input_curvature_distribution(model: nn.Module, data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]], *,
                                 batch_size: int = 256, h: float = 1e-3, method: str = "finite-difference",
                                 loss_fn: LossFn | None = None,
                                 quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> InputCurvatureSummary:
    """``input_curvature`` of every sample of a dataset, batch by batch, with its mean and quantiles.

    ``data`` is a pair of tensors (x, y) or an iterable of (x, y) batches (e.g. a DataLoader; batches stream,
    only the per-sample values are kept). A robust model has a narrow distribution near 0; a long right tail
    marks the samples where linear attacks (FGSM) underestimate the loss.
    """
    batch_size = positive_int(batch_size, "batch_size")
    levels = [float(q) for q in quantiles]
    if not all(0 <= q <= 1 for q in levels):
        raise ConfigError(f"quantiles: expected numbers in [0, 1], got {list(quantiles)!r}")
    began = time.perf_counter()
    batches: Iterable[tuple[Tensor, Tensor]]
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor) and isinstance(data[1], Tensor):
        batches = zip(data[0].split(batch_size), data[1].split(batch_size), strict=True)
    else:
        batches = data  # an iterable of (x, y) batches
    parts = [input_curvature(model, xb, yb, h=h, method=method, loss_fn=loss_fn).cpu() for xb, yb in batches]
    if not parts:
        raise InputError("data: no batches; pass (x, y) tensors or an iterable of (x, y) batches")
    values = torch.cat(parts).double()
    points = torch.quantile(values, torch.tensor(levels, dtype=torch.float64)).tolist() if levels else []
    named = {f"q{round(q * 100):02d}": value for q, value in zip(levels, points, strict=True)}
    return InputCurvatureSummary(values, float(values.mean()), named, time.perf_counter() - began)
