"""Argument checks every layer shares: inputs inside a threat model's box, labels, positive numbers.

They sit below models, attacks, evaluation and training (layer L1), so none of those imports another just to
check an argument. Each raises a ``GradguardError`` whose one line names the argument and the fix.
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor

from .errors import BoundsError, ConfigError, InputError, ShapeError

BOUNDS_TOLERANCE = 1e-6


class Threat(Protocol):
    """What ``check_inputs`` needs of a ``ThreatModel`` (a protocol, so this layer does not import threat.py)."""

    @property
    def bounds(self) -> tuple[float, float]: ...

    def check_against(self, x: Tensor) -> None: ...


def check_inputs(x: Any, threat: Threat, argument: str = "x") -> Tensor:
    """A finite floating (batch, ...) tensor inside the threat model's bounds, for which the threat's eps is not
    larger than the box (``ThreatModel.check_against``: an eps in the wrong units is refused here, before work)."""
    if not isinstance(x, Tensor):
        raise InputError(f"{argument}: expected a torch.Tensor, got {type(x).__name__}; use torch.as_tensor(...)")
    if not x.is_floating_point():
        raise InputError(
            f"{argument}: expected a floating-point tensor, got {x.dtype}; convert with {argument}.float() "
            "(and scale to the bounds, e.g. / 255)"
        )
    if x.dim() < 2:
        raise ShapeError(f"{argument}: expected shape (batch, ...) with at least 2 dims, got {tuple(x.shape)}; "
                         f"add a batch dimension with {argument}.unsqueeze(0)")
    threat.check_against(x)
    x = x.detach()
    if x.numel() == 0:
        return x
    lo, hi = threat.bounds
    smallest, largest = (float(v) for v in torch.aminmax(x))  # one pass; NaN and inf propagate into these
    if not (math.isfinite(smallest) and math.isfinite(largest)):
        raise BoundsError(f"{argument}: contains NaN or inf; clean the data before attacking")
    if smallest < lo - BOUNDS_TOLERANCE or largest > hi + BOUNDS_TOLERANCE:
        raise BoundsError(
            f"{argument}: values span [{smallest:.4g}, {largest:.4g}] but the threat model's bounds are "
            f"{threat.bounds}; scale the data into the bounds (normalisation belongs inside the model: Normalized)"
        )
    return x if lo <= smallest and largest <= hi else x.clamp(lo, hi)  # clamp only float dust at the edges


def as_labels(y: Any, batch: int, argument: str = "y") -> Tensor:
    """A (batch,) int64 label tensor."""
    if not isinstance(y, Tensor):
        raise InputError(f"{argument}: expected a torch.Tensor of class indices, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(f"{argument}: expected integer class indices, got {y.dtype}; convert with {argument}.long()")
    if y.dim() != 1 or y.shape[0] != batch:
        raise ShapeError(
            f"{argument}: expected shape ({batch},) — one label per input — got {tuple(y.shape)}"
        )
    return y.detach().long()


def check_labels(y: Tensor, num_classes: int, argument: str = "y") -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(
            f"{argument}: labels must lie in [0, {num_classes - 1}] for a model with {num_classes} classes, "
            f"got values in [{int(y.min())}, {int(y.max())}]"
        )


def positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{argument}: expected an integer >= 1, got {value!r}")
    return value


def positive_float(value: Any, argument: str, allow_zero: bool = False, hint: str = "") -> float:
    """``value`` as a finite float > 0 (>= 0 with ``allow_zero``); ``hint`` says in the error what it means."""
    bound = ">= 0" if allow_zero else "> 0"
    meaning = f" ({hint})" if hint else ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{argument}: expected a finite number {bound}{meaning}, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ConfigError(f"{argument}: expected a finite number {bound}{meaning}, got {value!r}")
    return number
