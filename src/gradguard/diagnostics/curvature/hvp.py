"""Hessian-vector products on flat vectors: the operator every parameter-space curvature estimator uses.

``hessian_products`` checks (model, x, y), puts the model in eval mode (parameters not frozen: the estimators
differentiate in them) and yields a ``HessianProducts`` whose ``operator(indices)`` is H·v for the whole
parameter Hessian or one block of it, by double backward (Pearlmutter 1994). Also the shared pieces: the loss
type and default loss, the data check, the summed loss and random probe vectors.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ...checks import positive_int
from ...core.guard import model_guard
from ...errors import InputError, ShapeError
from ...models.outputs import select_logits

LossFn = Callable[[Tensor, Tensor], Tensor]


def per_sample_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def check_data(model: nn.Module, x: Tensor, y: Tensor) -> None:
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


def summed_loss(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """Sum of per-sample losses (a 0-dim loss is read as a batch mean)."""
    values = loss_fn(select_logits(model(x)), y)  # a dict / ModelOutput with .logits: its logits
    if values.dim() == 0:
        return values * x.shape[0]
    if values.shape[0] != x.shape[0]:
        raise ShapeError(f"loss_fn: expected per-sample losses of shape ({x.shape[0]},), got {tuple(values.shape)}")
    return values.sum()


# ------------------------------------------------------------------------------------------------
# Hessian-vector products on flat vectors
# ------------------------------------------------------------------------------------------------
def trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("model: no parameter has requires_grad=True, so the parameter Hessian is empty")
    return params


def _grad(outputs: Sequence[Tensor], inputs: Sequence[Tensor], grad_outputs: Sequence[Tensor] | None = None,
          **kwargs: bool) -> list[Tensor]:
    """``torch.autograd.grad`` that reads a constant output or an unused input as a zero derivative."""
    weights: list[Tensor | None] = list(grad_outputs) if grad_outputs is not None else [None] * len(outputs)
    live = [(out, weight) for out, weight in zip(outputs, weights, strict=True) if out.requires_grad]
    if not live:
        return [torch.zeros_like(p) for p in inputs]
    return list(torch.autograd.grad([out for out, _ in live], inputs,
                                    grad_outputs=[w for _, w in live] if grad_outputs is not None else None,
                                    allow_unused=True, materialize_grads=True, **kwargs))


class HessianProducts:
    """H·v for L = mean per-sample loss over (x, y), on flat float64 vectors, for all or a block of the parameters.

    With one batch the gradient graph is built once and every product is one backward pass through it (what
    PyHessian does); with ``batch_size`` the products are summed over the batches (the exact full-data Hessian).
    Use inside ``model_guard(model, freeze=False)`` with gradients enabled.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, batch_size: int):
        self.model, self.loss_fn, self.total = model, loss_fn, x.shape[0]
        self.params = trainable(model)
        self.chunks = list(zip(x.split(batch_size), y.split(batch_size), strict=True))
        self.products = 0
        self._cached: list[Tensor] | None = None
        if len(self.chunks) == 1:
            self._cached = _grad([summed_loss(model, x, y, loss_fn) / self.total], self.params, create_graph=True)

    def groups(self) -> dict[str, list[int]]:
        """Positions of each leaf module's own trainable parameters, keyed by module name (shared ones once)."""
        position = {id(p): i for i, p in enumerate(self.params)}
        groups: dict[str, list[int]] = {}
        seen: set[int] = set()
        for name, module in self.model.named_modules():
            own = [position[id(p)] for p in module.parameters(recurse=False) if id(p) in position and id(p) not in seen]
            seen.update(id(self.params[i]) for i in own)
            if own:
                groups[name or type(module).__name__] = own
        return groups

    def operator(self, indices: list[int] | None = None) -> tuple[Callable[[Tensor], Tensor], int]:
        """(matvec, dimension) of the Hessian block of the parameters at ``indices`` (all when None)."""
        indices = list(range(len(self.params))) if indices is None else indices
        params = [self.params[i] for i in indices]
        sizes = [p.numel() for p in params]

        def matvec(flat: Tensor) -> Tensor:
            pieces = [piece.view_as(p).to(p.dtype) for piece, p in zip(flat.split(sizes), params, strict=True)]
            if self._cached is not None:
                parts = _grad([self._cached[i] for i in indices], params, pieces, retain_graph=True)
            else:
                parts = [torch.zeros_like(p) for p in params]
                for xb, yb in self.chunks:
                    grads = _grad([summed_loss(self.model, xb, yb, self.loss_fn) / self.total], params,
                                  create_graph=True)
                    for acc, part in zip(parts, _grad(grads, params, pieces), strict=True):
                        acc.add_(part)
            self.products += 1
            return torch.cat([part.detach().reshape(-1) for part in parts]).to(flat.dtype)

        return matvec, sum(sizes)

    def device(self) -> torch.device:
        return self.params[0].device


@contextlib.contextmanager
def hessian_products(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None,
              batch_size: int | None) -> Iterator[HessianProducts]:
    check_data(model, x, y)
    trainable(model)
    size = positive_int(batch_size, "batch_size") if batch_size is not None else x.shape[0]
    with model_guard(model, freeze=False), torch.enable_grad():
        yield HessianProducts(model, x, y, loss_fn or per_sample_cross_entropy, size)


def blocks(products: HessianProducts, per_layer: bool) -> dict[str, list[int] | None]:
    return dict(products.groups()) if per_layer else {"": None}


def random_vector(size: int, generator: torch.Generator, device: torch.device, *, rademacher: bool) -> Tensor:
    if rademacher:
        vector = torch.randint(0, 2, (size,), generator=generator, dtype=torch.float64) * 2 - 1
    else:
        vector = torch.randn(size, generator=generator, dtype=torch.float64)
    return vector.to(device)
