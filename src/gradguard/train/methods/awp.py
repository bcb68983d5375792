"""Adversarial weight perturbation (AWP, Wu, Xia & Wang 2020), the ``awp_gamma`` option of PGD-AT, TRADES and MART.

It lives apart from those methods because it is one algorithm on the *weights*: it differentiates the method's
loss with respect to the parameters (``torch.autograd.grad``), which the input-gradient primitive does not do.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ...checks import positive_float, positive_int
from ...errors import ConfigError
from .base import Forward, Objective, TrainingMethod


class AdversarialWeightPerturbation:
    """Adversarial weight perturbation (AWP; Wu, Xia & Wang, NeurIPS 2020), layer-wise relative.

    For every weight tensor w_l with more than one dimension (biases and normalisation parameters are left alone,
    as in the paper's code) it finds v_l with ‖v_l‖ ≤ γ·‖w_l‖ that increases the method's own adversarial loss:
    ``steps`` ascent steps v_l ← Π(v_l + η·‖w_l‖·g_l/‖g_l‖), g_l = ∂loss/∂w_l at w + v, η = ``step_size``
    (default γ, so one step lands on the sphere exactly as the paper's one-step setting). The training loss is
    then evaluated at w + v and its gradient applied to w: the paper perturbs, back-propagates, steps and
    subtracts v again; here the forward runs on w + v through ``torch.func.functional_call``, so the stored
    weights never change at all and the optimiser step starts from exactly w. The ascent runs on a copy of the
    buffers, so BatchNorm statistics are updated only by the training forward.
    """

    def __init__(self, gamma: float, *, step_size: float | None = None, steps: int = 1) -> None:
        self.gamma = awp_radius(gamma)
        self.given_step_size = None if step_size is None else positive_float(step_size, "awp_step_size")
        self.steps = positive_int(steps, "awp_steps")

    @property
    def step_size(self) -> float:
        """η: the given one, or γ (one step then lands on the sphere ‖v_l‖ = γ‖w_l‖)."""
        return self.gamma if self.given_step_size is None else self.given_step_size

    def offsets(self, module: nn.Module, objective: Objective) -> dict[int, Tensor]:
        """v per perturbed parameter (keyed by ``id(parameter)``), maximising ``objective(forward)``."""
        weights = {name: p for name, p in module.named_parameters() if p.requires_grad and p.dim() > 1}
        radius = {name: p.detach().norm() for name, p in weights.items()}
        offset = {name: torch.zeros_like(p) for name, p in weights.items()}
        for _ in range(self.steps):
            leaves = {name: (p.detach() + offset[name]).requires_grad_(True) for name, p in weights.items()}
            # the buffers are copies, so the ascent's forwards leave BatchNorm statistics alone
            substitutes = {**{name: b.clone() for name, b in module.named_buffers()}, **leaves}
            with torch.enable_grad():
                loss = objective(functools.partial(_forward_with, module, substitutes))
                grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for name, grad in zip(leaves, grads, strict=True):
                if grad is None or not bool(grad.norm() > 0):
                    continue
                step = offset[name] + self.step_size * radius[name] * grad / grad.norm()
                limit = self.gamma * radius[name]
                offset[name] = step * torch.clamp(limit / step.norm().clamp_min(1e-30), max=1.0)
        return {id(weights[name]): value.detach() for name, value in offset.items()}

    def forward(self, model: nn.Module, attack_model: nn.Module, objective: Objective) -> Forward:
        """A forward through ``model`` at the perturbed weights w + v (gradients flow to w)."""
        offsets = self.offsets(attack_model, objective)

        def perturbed(inputs: Tensor) -> Tensor:
            moved = {name: p + offsets[id(p)] for name, p in model.named_parameters() if id(p) in offsets}
            return functional_call(model, moved, (inputs,))

        return perturbed

    def config(self) -> dict[str, Any]:
        return {"awp_gamma": self.gamma, "awp_step_size": self.given_step_size, "awp_steps": self.steps}


def _forward_with(module: nn.Module, substitutes: dict[str, Tensor], inputs: Tensor) -> Tensor:
    return functional_call(module, substitutes, (inputs,))


def awp_radius(gamma: Any) -> float:
    """γ, the AWP radius relative to each layer's weight norm: a finite number in [0, 1) (0 = off)."""
    value = positive_float(gamma, "awp_gamma", allow_zero=True)
    if value >= 1:
        raise ConfigError(f"awp_gamma: expected a number in [0, 1) (the radius relative to each layer's weight norm; "
                          f"the paper uses 5e-3), got {gamma!r}")
    return value


class WeightPerturbationOption(TrainingMethod):
    """Methods that take ``awp_gamma`` (> 0: train at adversarially perturbed weights; 0: off, bit for bit the
    plain method), ``awp_step_size`` (η, default γ) and ``awp_steps`` (1)."""

    def _init_awp(self, gamma: float, step_size: float | None, steps: int) -> None:
        self.awp = AdversarialWeightPerturbation(gamma, step_size=step_size, steps=steps)

    def awp_state(self) -> dict[str, Any]:
        return self.awp.config()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        awp = {key: state.pop(key) for key in ("awp_gamma", "awp_step_size", "awp_steps") if key in state}
        super().load_state_dict(state)
        if awp:
            self._init_awp(awp.get("awp_gamma", self.awp.gamma), awp.get("awp_step_size", self.awp.given_step_size),
                           awp.get("awp_steps", self.awp.steps))

    def loss_forward(self, model: nn.Module, attack_model: nn.Module, objective: Objective) -> Forward:
        """``model`` itself, or with AWP on the forward at the weights that maximise ``objective``."""
        if self.awp.gamma == 0:
            return model
        return self.awp.forward(model, attack_model, objective)
