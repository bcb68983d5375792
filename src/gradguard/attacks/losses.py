"""Attack objectives. One signature: ``objective(logits, labels, targeted) -> (batch,)`` to MAXIMISE.

``labels`` are the true classes for an untargeted attack and the target classes for a targeted one, so
every attack simply ascends the objective.
"""
from __future__ import annotations

from typing import Callable, Union

import torch.nn.functional as F
from torch import Tensor

from ..core.gradient import Objective as Objective  # defined with the gradient primitive that ascends it
from ..errors import ConfigError

LossSpec = Union[str, Callable[..., Tensor]]


def _other_max(logits: Tensor, labels: Tensor) -> Tensor:
    """Largest logit among the classes other than ``labels``."""
    return logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)


def cross_entropy(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    """CE of the true class (ascended) or minus CE of the target class."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    return -ce if targeted else ce


def margin(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    """Carlini & Wagner (2017) margin: positive once the attack has succeeded.

    Untargeted: max_{i≠y} z_i − z_y. Targeted: z_t − max_{i≠t} z_i.
    """
    own = logits.gather(1, labels[:, None]).squeeze(1)
    other = _other_max(logits, labels)
    return own - other if targeted else other - own


def dlr(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020), invariant to shifting and scaling the logits.

    Untargeted: −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3). Targeted: −(max_{i≠t} z_i − z_t) /
    (z_π1 − (z_π3 + z_π4)/2), where π sorts the logits in decreasing order; the paper writes z_y for
    max_{i≠t} z_i, which is the same number while the true class is the top non-target class.
    """
    top = logits.sort(dim=1, descending=True).values
    if targeted:
        if logits.shape[1] < 4:
            raise ConfigError("loss: targeted DLR needs at least 4 classes; use loss='margin' instead")
        scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12
    else:
        if logits.shape[1] < 3:
            raise ConfigError("loss: DLR needs at least 3 classes; use loss='margin' or 'ce' instead")
        scale = top[:, 0] - top[:, 2] + 1e-12
    return margin(logits, labels, targeted) / scale


LOSSES: dict[str, Objective] = {"ce": cross_entropy, "dlr": dlr, "margin": margin, "cw": margin}


class _UserLoss:
    """Wraps ``fn(logits, labels) -> (batch,)`` (a loss to increase) into an objective."""

    def __init__(self, fn: Callable[..., Tensor]):
        self.fn = fn

    def __call__(self, logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
        value = self.fn(logits, labels)
        if not isinstance(value, Tensor) or value.shape != (logits.shape[0],):
            raise ConfigError(
                "loss: a callable loss must return one value per sample, shape (batch,); "
                "use reduction='none'"
            )
        return -value if targeted else value


def resolve_objective(loss: LossSpec) -> Objective:
    """Turn ``"ce" | "dlr" | "margin" | callable`` into an objective."""
    if isinstance(loss, str):
        key = loss.lower()
        if key not in LOSSES:
            raise ConfigError(f"loss: unknown loss {loss!r}; choose one of {sorted(LOSSES)} or pass a callable")
        return LOSSES[key]
    if callable(loss):
        return _UserLoss(loss)
    raise ConfigError(f"loss: expected a name or a callable, got {type(loss).__name__}")
