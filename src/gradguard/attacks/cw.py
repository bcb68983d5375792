"""CW-L2 — the Carlini & Wagner L2 attack (IEEE S&P 2017, "Towards evaluating the robustness of neural networks")."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import positive_float, positive_int
from ..errors import ConfigError
from ..threat import ThreatModel
from .base import Attack, Iterate, expand_mask

NO_UPPER_BOUND = 1e10
ATANH_SHRINK = 1 - 1e-4  # keeps atanh finite (and gradients far from denormal) for pixels at the bounds


class CW(Attack):
    """Carlini & Wagner's L2 attack: minimise ‖δ‖₂² + c·max(κ − margin, 0) over a tanh-space variable with Adam,
    and binary-search the constant c per sample.

    The margin is max_{i≠y} z_i − z_y (untargeted) or z_t − max_{i≠t} z_i (targeted), so success means
    margin >= κ. Defaults: 9 binary-search steps, 100 Adam steps each (lr = 0.01), c starts at 1e-2, κ = 0
    (the paper's reference code uses c = 1e-3 with up to 10 000 steps; a larger start suits the shorter run).
    Each binary-search step starts afresh from x, as in the paper; a run aborts early once its loss stalls.

    CW is a minimal-perturbation attack and ignores ``eps`` while it searches: it returns the smallest successful
    perturbation it found (the last iterate where it found none), then projected into the threat's L2 ball and
    bounds. A point found beyond eps is pulled back onto the ball and may stop fooling the model: the base
    re-evaluates success honestly at the returned point. L2 threat models only.
    """

    name = "cw"
    supported_norms = ("l2",)

    def __init__(self, model: nn.Module, threat: ThreatModel, *, steps: int = 100, binary_search_steps: int = 9,
                 initial_const: float = 1e-2, confidence: float = 0.0, lr: float = 0.01, abort_early: bool = True,
                 **kwargs) -> None:
        if "loss" in kwargs:
            raise ConfigError("loss: CW always uses the Carlini-Wagner margin; pass confidence= to change it")
        super().__init__(model, threat, loss="margin", **kwargs)
        self.steps = positive_int(steps, "steps")
        self.binary_search_steps = positive_int(binary_search_steps, "binary_search_steps")
        self.initial_const = positive_float(initial_const, "initial_const")
        self.confidence = positive_float(confidence, "confidence", allow_zero=True)
        self.lr = positive_float(lr, "lr")
        self.abort_early = bool(abort_early)

    def _perturb(self, x: Tensor, labels: Tensor) -> Iterate:
        n = x.shape[0]
        lower = torch.zeros(n, device=x.device, dtype=x.dtype)
        upper = torch.full((n,), NO_UPPER_BOUND, device=x.device, dtype=x.dtype)
        const = torch.full((n,), self.initial_const, device=x.device, dtype=x.dtype)
        best_distance = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
        best_x = x.clone()
        w_clean = self._to_tanh_space(x)
        for _ in range(self.binary_search_steps):
            found_any, last_x = self._minimise(x, labels, w_clean, const, best_distance, best_x)
            best_x = torch.where(expand_mask(best_distance == float("inf"), x), last_x, best_x)
            # Found: the constant can shrink. Not found: grow it (x10 until an upper bound exists, then bisect).
            upper = torch.where(found_any, torch.minimum(upper, const), upper)
            lower = torch.where(found_any, lower, torch.maximum(lower, const))
            bounded = upper < NO_UPPER_BOUND
            const = torch.where(bounded, (lower + upper) / 2, const * 10)
        x_adv = self.threat.project(best_x, x)
        logits, objective = self._evaluate(x_adv, labels)
        return Iterate(x_adv, logits, objective)

    def _minimise(self, x: Tensor, labels: Tensor, w_clean: Tensor, const: Tensor, best_distance: Tensor,
                  best_x: Tensor) -> tuple[Tensor, Tensor]:
        """Adam on w for one value of c per sample; updates ``best_distance``/``best_x`` in place."""
        w = w_clean.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([w], lr=self.lr)
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        previous_loss = float("inf")
        check_every = max(1, self.steps // 10)
        x_adv = self._from_tanh_space(w.detach())
        for step in range(self.steps):
            x_adv = self._from_tanh_space(w.detach())
            grad_margin, logits, margin_value = self._gradient(x_adv, labels)
            delta = x_adv - x
            distance = delta.flatten(1).pow(2).sum(dim=1)
            hinge = (self.confidence - margin_value).clamp_min(0)
            success = self._succeeded(logits, labels) & (margin_value >= self.confidence)
            closer = success & (distance < best_distance)
            best_distance.copy_(torch.where(closer, distance, best_distance))
            best_x.copy_(torch.where(expand_mask(closer, x), x_adv, best_x))
            found |= success
            # d/dx of ‖δ‖² + c·max(κ − margin, 0), then the chain rule through x = lo + (hi − lo)(tanh w + 1)/2.
            active = (hinge > 0).to(x.dtype)
            grad_x = 2 * delta - expand_mask(const * active, x) * grad_margin
            with torch.no_grad():
                w.grad = grad_x * self._tanh_derivative(w)
            optimiser.step()
            if self.abort_early and step % check_every == 0:
                loss = float((distance + const * hinge).sum())
                if loss > previous_loss * 0.9999:
                    break
                previous_loss = loss
        return found, x_adv

    def _to_tanh_space(self, x: Tensor) -> Tensor:
        lo, hi = self.threat.bounds
        return torch.atanh(((x - lo) / (hi - lo) * 2 - 1) * ATANH_SHRINK)

    def _from_tanh_space(self, w: Tensor) -> Tensor:
        lo, hi = self.threat.bounds
        return ((torch.tanh(w) + 1) / 2 * (hi - lo) + lo).clamp(lo, hi)

    def _tanh_derivative(self, w: Tensor) -> Tensor:
        lo, hi = self.threat.bounds
        return (1 - torch.tanh(w.detach()) ** 2) / 2 * (hi - lo)

    def __repr__(self) -> str:
        return (f"CW(threat={self.threat!r}, steps={self.steps}, binary_search_steps={self.binary_search_steps}, "
                f"confidence={self.confidence}, targeted={self.targeted})")
