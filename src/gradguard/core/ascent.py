"""The one projected-ascent loop, ``projected_ascent``: PGD (with BIM and MI-FGSM), TRADES' inner maximisation and
the masking checklist's loss-rises probe all climb their objective through it.

Each step is: the gradient at the current point (a caller's callable around ``core.gradient.input_gradient``),
an optional per-step record that may drop rows (early stop), the direction (the gradient, or a caller's rule such
as MI-FGSM's momentum), the threat model's steepest-ascent step and its projection onto the eps-ball ∩ box. The
start point is the caller's: each draws it from its own random stream (an attack's seeded generator, training's
per-sample generators), so the loop itself draws no random numbers. What to keep — the last iterate (TRADES, the
probe) or the per-sample best (PGD's ``BestIterate``, fed by ``on_step``) — is the caller's too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

import torch
from torch import Tensor

from ..threat import ThreatModel
from .gradient import Objective, input_gradient

# gradient(x_adv, labels) -> (d objective / d x_adv, logits, per-sample objective)
Gradient = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
# direction(grad, state) -> the direction to step along; state holds per-row tensors across steps
Direction = Callable[[Tensor, Dict[str, Tensor]], Tensor]
# on_step(x_adv, logits, objective, labels, index) -> None (go on with every row) or a mask of the rows to keep
OnStep = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor | None], Tensor | None]


@dataclass
class AscentPath:
    """Where the ascent ended: the last iterate of the rows still climbing.

    ``index`` holds those rows' positions in the batch the loop was given (None: every row); ``labels`` are their
    labels. ``stopped`` is True when ``on_step`` dropped every row, and then ``x_adv`` has no rows.
    """

    x_adv: Tensor
    labels: Tensor
    index: Tensor | None
    stopped: bool = False


def objective_gradient(model: Callable[[Tensor], Any], objective: Objective, targeted: bool = False) -> Gradient:
    """The ``Gradient`` of ``objective`` through the one input-gradient primitive (full precision, no EOT)."""
    def gradient(x_adv: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return input_gradient(model, x_adv, labels, objective, targeted)
    return gradient


def projected_ascent(gradient: Gradient, threat: ThreatModel, x: Tensor, labels: Tensor, start: Tensor, *,
                     steps: int, step_size: float | Tensor, direction: Direction | None = None,
                     on_step: OnStep | None = None) -> AscentPath:
    """``steps`` steps of projected steepest ascent from ``start`` in ``threat``'s ball around ``x``.

    Per step: ``gradient(x_adv, labels)``; then ``on_step`` (if given) sees the point, its logits and objective,
    and may return a mask of the rows to keep climbing (the others leave the loop; ``index`` tells the caller
    which rows are left); then ``direction(grad, state)`` (default: the gradient) and
    ``x_adv ← project(x_adv + ascent_step(direction, step_size, x_adv), x)``. No gradient is taken at the last
    iterate: a caller that scores it does so on the returned path.
    """
    x_adv, index = start, None
    state: Dict[str, Tensor] = {}
    for _ in range(steps):
        grad, logits, objective = gradient(x_adv, labels)
        if on_step is not None:
            keep = on_step(x_adv, logits, objective, labels, index)
            if keep is not None:
                if not bool(keep.any()):  # every row left: nothing to step
                    empty = torch.zeros(0, dtype=torch.long, device=x_adv.device)
                    return AscentPath(x_adv[:0], labels[:0], empty, stopped=True)
                index = keep.nonzero().squeeze(1) if index is None else index[keep]
                x, x_adv, labels, grad = x[keep], x_adv[keep], labels[keep], grad[keep]
                state = {key: value[keep] for key, value in state.items()}
        step = grad if direction is None else direction(grad, state)
        x_adv = threat.project(x_adv + threat.ascent_step(step, step_size, x_adv), x)
    return AscentPath(x_adv, labels, index)
