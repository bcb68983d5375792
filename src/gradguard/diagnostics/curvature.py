"""Second-order diagnostics: the loss Hessian's top eigenvalue and input-space curvature.

- ``top_hessian_eigenvalue``: power iteration on Hessian-vector products H·v = ∇_θ(∇_θ L · v) (double
  backward, Pearlmutter 1994), the method of PyHessian (Yao et al. 2020). Sharp minima (large λ_max) go with
  poor generalisation and a small stable learning rate (SGD diverges beyond lr ≈ 2/λ_max).
- ``input_curvature``: curvature of each sample's loss along its own input gradient, ĝᵀ H_x ĝ with
  ĝ = g/‖g‖, by a central finite difference of gradients (Moosavi-Dezfooli et al. 2019, CURE) or an exact
  double-backward HVP. Adversarial training lowers it; a large value means the loss bends sharply and
  linear attacks (FGSM) underestimate it.

Both leave the model as they found it: they run in eval mode (BatchNorm statistics are not updated) and
restore each module's mode, take gradients with ``torch.autograd.grad`` only (``.grad`` is never touched) and
never change ``requires_grad``.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..attacks.base import positive_float, positive_int
from ..errors import ConfigError, InputError, ShapeError

LossFn = Callable[[Tensor, Tensor], Tensor]


def per_sample_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


@dataclass
class EigenEstimate:
    """Result of power iteration: the eigenvalue estimate and how it was reached."""

    value: float
    iterations: int
    converged: bool
    elapsed_s: float


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration (no BatchNorm updates, no dropout noise); each module's mode restored."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _check_data(model: nn.Module, x: Tensor, y: Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise InputError(f"x: expected a floating-point torch.Tensor of inputs, got {type(x).__name__}"
                         + (f" of {x.dtype}" if isinstance(x, Tensor) else ""))
    if x.dim() < 1 or x.shape[0] == 0:
        raise ShapeError(f"x: expected a non-empty batch (batch, ...), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InputError("x: contains NaN or inf; clean the inputs first")
    if not isinstance(y, Tensor) or y.dim() < 1 or y.shape[0] != x.shape[0]:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ShapeError(f"y: expected a tensor with one target per input ({x.shape[0]}, ...), got {shape}")


def _summed_loss(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """Sum of per-sample losses (a 0-dim loss is read as a batch mean)."""
    values = loss_fn(model(x), y)
    if values.dim() == 0:
        return values * x.shape[0]
    if values.shape[0] != x.shape[0]:
        raise ShapeError(f"loss_fn: expected per-sample losses of shape ({x.shape[0]},), got {tuple(values.shape)}")
    return values.sum()


def _total(terms: Iterable[Tensor]) -> Tensor:
    """Sum of one or more tensors, added left to right (as ``sum`` does, but typed as a Tensor)."""
    iterator = iter(terms)
    total = next(iterator)
    for term in iterator:
        total = total + term
    return total


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return _total((u * v).sum() for u, v in zip(a, b, strict=True))


def _normalise(vectors: list[Tensor]) -> tuple[list[Tensor], float]:
    norm = float(torch.sqrt(_total((v.double() ** 2).sum() for v in vectors)))
    if norm == 0 or not math.isfinite(norm):
        return vectors, norm
    return [v / norm for v in vectors], norm


def hessian_power_iteration(model: nn.Module, x: Tensor, y: Tensor, *, loss_fn: LossFn | None = None,
                            iters: int = 20, tol: float = 1e-4, time_limit: float | None = None,
                            batch_size: int | None = None, seed: int = 0) -> EigenEstimate:
    """Eigenvalue of largest magnitude of ∇²_θ L, L = mean per-sample loss over (x, y), by power iteration.

    Parameters are those with ``requires_grad=True``. ``batch_size`` splits (x, y) so memory stays bounded;
    the Hessian-vector products are summed over the batches (exactly the full-data Hessian). Stops after
    ``iters`` products, when the Rayleigh quotient changes by at most ``tol`` (relative; ``tol=0`` runs all
    ``iters``), or once ``time_limit`` seconds have passed (then ``converged`` is False).
    """
    _check_data(model, x, y)
    iters = positive_int(iters, "iters")
    tol = positive_float(tol, "tol", allow_zero=True)
    if time_limit is not None:
        time_limit = positive_float(time_limit, "time_limit")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("model: no parameter has requires_grad=True, so the parameter Hessian is empty")
    loss_fn = loss_fn or per_sample_cross_entropy
    batch_size = positive_int(batch_size, "batch_size") if batch_size is not None else x.shape[0]
    chunks = list(zip(x.split(batch_size), y.split(batch_size), strict=True))
    total = x.shape[0]
    began = time.perf_counter()
    with _eval_mode(model), torch.enable_grad():
        cached = None
        if len(chunks) == 1:  # one batch: build the gradient graph once and reuse it for every product
            cached = torch.autograd.grad(_summed_loss(model, x, y, loss_fn) / total, params, create_graph=True)

        def hvp(vector: list[Tensor]) -> list[Tensor]:
            if cached is not None:
                return list(torch.autograd.grad(cached, params, grad_outputs=vector, retain_graph=True))
            result = [torch.zeros_like(p) for p in params]
            for xb, yb in chunks:
                grads = torch.autograd.grad(_summed_loss(model, xb, yb, loss_fn) / total, params, create_graph=True)
                for acc, part in zip(result, torch.autograd.grad(grads, params, grad_outputs=vector), strict=True):
                    acc.add_(part)
            return result

        generator = torch.Generator(device="cpu").manual_seed(seed)
        vector, _ = _normalise([torch.randn(p.shape, generator=generator).to(p) for p in params])
        value, converged, iteration = 0.0, False, 0
        for iteration in range(1, iters + 1):
            product = [h.detach() for h in hvp(vector)]
            previous, value = value, float(_dot(vector, product))
            vector, norm = _normalise(product)
            if norm == 0:  # the Hessian annihilates the vector: a zero eigenvalue, nothing left to iterate
                converged = True
                break
            if tol > 0 and iteration > 1 and abs(value - previous) <= tol * max(abs(value), 1e-12):
                converged = True
                break
            if time_limit is not None and time.perf_counter() - began > time_limit:
                break
    return EigenEstimate(value, iteration, converged, time.perf_counter() - began)


def top_hessian_eigenvalue(model: nn.Module, x: Tensor, y: Tensor, *, iters: int = 20, tol: float = 1e-4,
                           loss_fn: LossFn | None = None, time_limit: float | None = None,
                           batch_size: int | None = None, seed: int = 0) -> float:
    """Top (largest-magnitude) eigenvalue of the loss Hessian w.r.t. the trainable parameters.

    Power iteration on double-backward Hessian-vector products (PyHessian, Yao et al. 2020); defaults
    iters=20, tol=1e-4; ``loss_fn(logits, y)`` returns per-sample losses (default: cross-entropy).
    See ``hessian_power_iteration`` for batching, the time limit and convergence details.
    """
    return hessian_power_iteration(model, x, y, loss_fn=loss_fn, iters=iters, tol=tol, time_limit=time_limit,
                                   batch_size=batch_size, seed=seed).value


def input_curvature(model: nn.Module, x: Tensor, y: Tensor, *, h: float = 1e-3, method: str = "finite-difference",
                    loss_fn: LossFn | None = None, batch_size: int | None = None) -> Tensor:
    """Per-sample curvature of the loss along its input gradient: ĝᵀ ∇²_x ℓ ĝ, ĝ = g/‖g‖, shape (batch,).

    ``method="finite-difference"`` (default, as in CURE, Moosavi-Dezfooli et al. 2019) uses
    (∇ℓ(x + hĝ) - ∇ℓ(x - hĝ))·ĝ / 2h, which also sees the kinks of ReLU networks at scale ``h``;
    ``method="hvp"`` is the exact double-backward value at x. A sample whose gradient is zero has no
    direction and gets 0. Parameters get no gradient; their ``requires_grad`` flags are left alone.
    """
    _check_data(model, x, y)
    h = positive_float(h, "h")
    if method not in ("finite-difference", "hvp"):
        raise ConfigError(f"method: expected 'finite-difference' or 'hvp', got {method!r}")
    loss_fn = loss_fn or per_sample_cross_entropy
    batch_size = positive_int(batch_size, "batch_size") if batch_size is not None else x.shape[0]
    parts = []
    with _eval_mode(model), torch.enable_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            parts.append(_input_curvature_batch(model, xb.detach(), yb, h, method, loss_fn))
    return torch.cat(parts)


def _input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn,
                    create_graph: bool = False) -> tuple[Tensor, Tensor]:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(_summed_loss(model, x, y, loss_fn), x, create_graph=create_graph)
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
