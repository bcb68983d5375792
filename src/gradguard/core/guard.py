"""The one model guard: eval mode (and, by default, frozen parameters) for a block, restored exactly afterwards.

Attacks, evaluation and the input-gradient regularisers guard with frozen parameters; the curvature estimators
need the parameters' gradients and guard with ``freeze=False``. One function, so both restore the same way.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def model_guard(model: nn.Module, freeze: bool = True) -> Iterator[nn.Module]:
    """Eval mode and, with ``freeze`` (the default), frozen parameters for the duration; exact restore afterwards,
    also on error (every module's ``training`` flag, every parameter's ``requires_grad``).

    Freezing parameters is not only hygiene: autograd then keeps no activations for weight gradients,
    which saves memory in every attack. ``freeze=False`` leaves the ``requires_grad`` flags alone (the curvature
    estimators differentiate in the parameters). ``.grad`` fields are never touched.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()] if freeze else []
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)
