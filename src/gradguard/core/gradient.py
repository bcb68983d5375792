"""The one input-gradient primitive, ``input_gradient``, and the ``Objective`` type it ascends.

Moved here from ``attacks/base.py`` (which re-exports both) so that attacks, evaluation signals, the masking
checks, the curvature estimators and the gradient regularisers of training all take input gradients the same
way: ``torch.autograd.grad`` w.r.t. the input only, never accumulated into parameters, with the same mixed
precision (fp16 loss scaling with a full-precision fallback), Expectation over Transformation and, with
``create_graph=True``, a gradient that can be differentiated again (double backpropagation).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..runtime.precision import FP16_LOSS_SCALE, autocast, upcast_logits
from .logits import check_logits, select_logits

# objective(logits, labels, targeted) -> (batch,) values to MAXIMISE (the attack losses of attacks/losses.py).
Objective = Callable[[Tensor, Tensor, bool], Tensor]


def input_gradient(model: Callable[[Tensor], Any], x: Tensor, labels: Tensor, objective: Objective, targeted: bool,
                   amp: torch.dtype | None = None, eot_samples: int = 1, *, create_graph: bool = False,
                   checked: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The one gradient primitive: (d objective / d x, logits, per-sample objective) in one pass.

    Gradients are taken w.r.t. the input only (``torch.autograd.grad``), never accumulated into parameters.
    With ``amp`` (torch.bfloat16 or torch.float16) the model's forward and backward run under autocast; the
    logits are cast up to float32 before the objective, and the gradient comes back in ``x``'s dtype. fp16 scales
    the loss against gradient underflow and falls back to full precision if the scaled gradient overflows.

    ``eot_samples=k`` > 1 is Expectation over Transformation (Athalye et al., ICML 2018) for randomised models:
    k passes, each with the model's own fresh randomness, and the mean of their gradients, logits and objectives
    (the gradient of the mean objective, i.e. a k-sample estimate of the expected objective's gradient).

    ``create_graph=True`` is double backpropagation: the gradient keeps its graph and the logits and objective
    come back attached, so a penalty on the gradient can be differentiated in the parameters, or the gradient
    again in ``x`` — for that the gradient is taken w.r.t. ``x`` itself when ``x`` requires grad (else w.r.t. a
    detached copy, as always without ``create_graph``).

    ``checked=False`` hands the model's output to ``objective`` through ``select_logits`` only, without
    ``check_logits``'s (batch, classes) and finiteness checks: for user losses on outputs that need not be class
    logits (the curvature estimators' ``loss_fn``).
    """
    if eot_samples > 1:
        return _eot_gradient(model, x, labels, objective, targeted, amp, eot_samples, create_graph, checked)
    keep = create_graph and x.requires_grad  # differentiate the gradient again w.r.t. the caller's own x
    if amp is None:
        with torch.enable_grad():
            x = x if keep else x.detach().requires_grad_(True)
            output = model(x)
            logits = check_logits(output, x.shape[0]) if checked else select_logits(output)
            values = objective(logits, labels, targeted)
            (grad,) = torch.autograd.grad(values.sum(), x, create_graph=create_graph)
        return (grad, logits, values) if create_graph else (grad, logits.detach(), values.detach())
    scale = FP16_LOSS_SCALE if amp == torch.float16 else 1.0
    with torch.enable_grad():
        x_leaf = x if keep else x.detach().requires_grad_(True)
        with autocast(x.device, amp):
            output = model(x_leaf)
        logits = upcast_logits(check_logits(output, x.shape[0], amp=amp) if checked else select_logits(output))
        values = objective(logits, labels, targeted)
        (grad,) = torch.autograd.grad(values.sum() * scale if scale != 1.0 else values.sum(), x_leaf,
                                      create_graph=create_graph)
    if scale != 1.0:
        grad = grad / scale
        if not bool(torch.isfinite(grad).all()):
            full_grad, _, _ = input_gradient(model, x, labels, objective, targeted, amp=None,
                                             create_graph=create_graph, checked=checked)
            grad = full_grad
    return (grad, logits, values) if create_graph else (grad, logits.detach(), values.detach())


def _eot_gradient(model: Callable[[Tensor], Any], x: Tensor, labels: Tensor, objective: Objective, targeted: bool,
                  amp: torch.dtype | None, k: int, create_graph: bool = False,
                  checked: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The mean of ``k`` single-pass gradients, logits and objectives.

    One pass at a time, not one k-fold batch: a model that draws one transformation per batch (a random resize,
    a random crop) must get k independent draws, and memory stays that of a single pass.
    """
    grad, logits, values = input_gradient(model, x, labels, objective, targeted, amp, create_graph=create_graph,
                                          checked=checked)
    for _ in range(k - 1):
        more = input_gradient(model, x, labels, objective, targeted, amp, create_graph=create_graph, checked=checked)
        grad, logits, values = grad + more[0], logits + more[1], values + more[2]
    return grad / k, logits / k, values / k
