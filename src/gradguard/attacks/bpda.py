"""BPDA — Backward Pass Differentiable Approximation (Athalye, Carlini & Wagner, ICML 2018, "Obfuscated
Gradients Give a False Sense of Security", §4.1).

A defence that puts a non-differentiable (or gradient-shattering) preprocessing step g in front of a classifier f
gives an attacker zero or useless gradients. BPDA keeps g in the forward pass and differentiates a smooth stand-in
h ≈ g in the backward pass: the gradient of f(g(x)) is taken as ∇f(g(x)) · ∂h/∂x. With h the identity (the default)
this is the straight-through estimator, right whenever g(x) ≈ x (quantisation, JPEG, denoisers).

Why a custom autograd Function and not ``h(x) + (g(x) - h(x)).detach()``: that trick returns g(x) only up to float
rounding (a + (b − a) ≠ b in floating point), so a quantiser's output leaves its lattice; it also runs h in every
forward pass, even under ``torch.no_grad``. The Function returns g(x) bit for bit and runs h only when a gradient
is asked for, at the same input x.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import InputError, ModelOutputError, ShapeError

Transform = Callable[[Tensor], Tensor]


class BPDA(nn.Module):
    """``preprocess`` forward, the gradient of ``approx`` backward (Athalye et al., ICML 2018).

    ``nn.Sequential(BPDA(preprocess), model)`` is the defended model with usable gradients: every gradient attack
    and suite works on it unchanged. ``approx=None`` is the identity (straight-through: the incoming gradient passes
    as is); otherwise ``approx`` is a differentiable function (or module) whose output has the shape of
    ``preprocess``'s output, evaluated at the same input.

    Example: ``BPDA(lambda x: torch.round(x * 8) / 8)`` — 3-bit input quantisation, attacked straight through.
    """

    def __init__(self, preprocess: Transform, approx: Transform | None = None) -> None:
        super().__init__()
        if not callable(preprocess):
            raise InputError(f"preprocess: expected a callable x -> tensor, got {type(preprocess).__name__}")
        if approx is not None and not callable(approx):
            raise InputError(f"approx: expected a differentiable callable x -> tensor or None (identity), "
                             f"got {type(approx).__name__}")
        self.preprocess = preprocess
        self.approx = approx

    def forward(self, x: Tensor) -> Tensor:
        out = _Bpda.apply(x, self)
        assert isinstance(out, Tensor)
        return out

    def extra_repr(self) -> str:
        return f"preprocess={_name(self.preprocess)}, approx={_name(self.approx) if self.approx else 'identity'}"

    def _run_preprocess(self, x: Tensor) -> Tensor:
        out = self.preprocess(x)
        if not isinstance(out, Tensor):
            raise ModelOutputError(f"preprocess: expected it to return a tensor, got {type(out).__name__}")
        if self.approx is None and out.shape != x.shape:
            raise ShapeError(f"preprocess: changes the shape {tuple(x.shape)} -> {tuple(out.shape)}, so the identity "
                             "cannot stand in for it; pass approx=, a differentiable function with that output shape")
        return out

    def _approx_gradient(self, x: Tensor, grad_output: Tensor) -> Tensor:
        """The vector-Jacobian product of ``approx`` at ``x`` with ``grad_output``."""
        assert self.approx is not None
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = self.approx(leaf)
            if not isinstance(out, Tensor) or out.shape != grad_output.shape:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ShapeError(f"approx: returns {shape} but preprocess returns {tuple(grad_output.shape)}; "
                                 "the approximation must have the preprocessing's output shape")
            if not out.requires_grad:
                return torch.zeros_like(x)  # approx is constant in x: no gradient flows
            (grad,) = torch.autograd.grad(out, leaf, grad_output.to(out.dtype), allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad


class _Bpda(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, owner: BPDA) -> Tensor:
        ctx.owner = owner
        if owner.approx is not None:
            ctx.save_for_backward(x)
        return owner._run_preprocess(x)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        owner: BPDA = ctx.owner
        if owner.approx is None:
            return grad_output, None
        (x,) = ctx.saved_tensors
        return owner._approx_gradient(x, grad_output), None


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__
