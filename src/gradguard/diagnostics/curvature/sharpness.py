"""Edge of stability while training: ``SharpnessTracker``, the top Hessian eigenvalue of the training batch (or
Adam's preconditioned sharpness) against the optimiser's stability threshold, for ``GradientMonitor``.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from ...checks import positive_float, positive_int
from ...core.guard import model_guard
from ...errors import ConfigError
from ...models.outputs import select_logits
from .hvp import LossFn, hessian_products, random_vector, trainable
from .spectrum import power_iteration


class SharpnessTracker:
    """The top Hessian eigenvalue of the training batch against the optimiser's stability threshold.

    Plain gradient descent on a quadratic diverges once lr·λ_max > 2; with heavy-ball momentum μ the bound is
    λ_max < (2 + 2μ)/lr, and networks trained at a fixed lr hover at that "edge of stability" (Cohen et al.
    2021). Adam steps along P⁻¹g with P = diag(√v̂ + ε), so the quantity that matters is the preconditioned
    sharpness λ_max(P⁻¹H) against (2 + 2β₁)/((1 - β₁)·lr) = 38/lr for β₁ = 0.9 (Cohen et al. 2022, "Adaptive
    gradient methods at the edge of stability"). ``ratio`` = quantity / threshold; above 1 the run is heading
    for instability. Each measurement is a few power-iteration products, warm-started from the last vector.
    """

    def __init__(self, model: nn.Module, every: int, *, optimizer: torch.optim.Optimizer | None = None,
                 lr: float | None = None, iters: int = 5, loss_fn: LossFn | None = None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.every = positive_int(every, "curvature_every")
        self.iters = positive_int(iters, "curvature_iters")
        if optimizer is None and lr is None:
            raise ConfigError("curvature_every: needs the learning rate; pass optimizer= or lr=")
        self.lr = positive_float(lr, "lr") if lr is not None else None
        self.records: list[dict] = []
        self._vector: Tensor | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def measure(self, step: int, x: Tensor, targets: Tensor | None) -> dict:
        """Measure on (x, targets); without targets the model's own predictions stand in (the Gauss-Newton part
        of the cross-entropy Hessian, which carries its top eigenvalue, does not depend on the labels)."""
        began = time.perf_counter()
        x = x.detach()
        if targets is None:
            with torch.no_grad(), model_guard(self.model, freeze=False):
                targets = select_logits(self.model(x)).argmax(1)
        lr, threshold, scale, measure = self._threshold()
        with hessian_products(self.model, x, targets.detach(), self.loss_fn, None) as products:
            matvec, size = products.operator()
            if scale is not None:
                scale = scale.to(products.device())
                plain = matvec
                matvec = lambda v: scale * plain(scale * v)  # noqa: E731  (P^-1/2 H P^-1/2)
            start = self._vector if self._vector is not None and self._vector.numel() == size else \
                random_vector(size, torch.Generator().manual_seed(step), products.device(), rademacher=False)
            value, iterations, _, self._vector = power_iteration(matvec, start, self.iters, 0.0, None, began)
        record = {"step": step, "quantity": measure, "top_eigenvalue": value, "lr": lr, "threshold": threshold,
                  "ratio": value / threshold, "iterations": iterations, "seconds": time.perf_counter() - began}
        self.records.append(record)
        return record

    def _threshold(self) -> tuple[float, float, Tensor | None, str]:
        """(lr, threshold, P^-1/2 as a flat vector or None, name of the quantity)."""
        if self.optimizer is None:
            assert self.lr is not None
            return self.lr, 2.0 / self.lr, None, "sharpness"
        group = self.optimizer.param_groups[0]
        lr = float(group["lr"])
        if isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            beta1, beta2 = group["betas"]
            scale = self._adam_scale(beta2, float(group["eps"]))
            if scale is not None:
                return lr, (2 + 2 * beta1) / ((1 - beta1) * lr), scale, "preconditioned sharpness"
        momentum = float(group.get("momentum", 0.0) or 0.0)
        return lr, (2 + 2 * momentum) / lr, None, "sharpness"

    def _adam_scale(self, beta2: float, eps: float) -> Tensor | None:
        pieces = []
        for p in trainable(self.model):
            state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            if "exp_avg_sq" not in state:
                return None  # before Adam's first step: no preconditioner yet
            steps = float(state["step"])
            denominator = (state["exp_avg_sq"] / (1 - beta2 ** steps)).sqrt() + eps
            pieces.append(denominator.detach().reshape(-1).double().rsqrt())
        return torch.cat(pieces)

    def unstable(self) -> list[dict]:
        """Records whose ratio exceeds 1 (the quantity is past the optimiser's stability threshold)."""
        return [record for record in self.records if record["ratio"] > 1]
