"""What attacks return: ``Iterate`` (one restart), ``AttackResult`` (``Attack.run``), the per-sample
``BestIterate`` tracker, and the two small mask helpers ``expand_mask`` and ``any_per_owner``.

Moved out of ``attacks/base.py`` (which re-exports every name) so that the base file holds the ``Attack`` class
only, and so that code reading results needs neither the class nor the gradient layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Iterate:
    """What one restart of an attack returns; ``logits``/``objective`` may be unknown (None)."""

    x_adv: Tensor
    logits: Tensor | None = None
    objective: Tensor | None = None


@dataclass
class AttackResult:
    """The outcome of ``Attack.run``.

    ``success`` is per sample: misclassified (untargeted) or classified as the target (targeted).
    ``loss`` is the attack objective at ``x_adv`` (higher is stronger). ``n_grad`` counts per-sample
    gradient evaluations and ``n_forward`` per-sample forward-only evaluations, the attack's budget (with EOT,
    k per gradient). ``success_votes`` is the number of forward passes whose majority judged ``success`` (1 for a
    deterministic model).
    """

    x_adv: Tensor
    success: Tensor
    logits: Tensor
    loss: Tensor
    labels: Tensor
    targets: Tensor | None
    n_grad: int
    n_forward: int
    success_votes: int = 1

    @property
    def predictions(self) -> Tensor:
        return self.logits.argmax(dim=1)

    @property
    def correct(self) -> Tensor:
        """Per sample: is ``x_adv`` still classified as its true label."""
        return self.predictions == self.labels

    @property
    def accuracy(self) -> float:
        """Accuracy of the model on ``x_adv`` (robust accuracy for an untargeted attack)."""
        return float(self.correct.float().mean()) if self.labels.numel() else float("nan")


class BestIterate:
    """Keeps, per sample, the best point seen: a success beats a failure, then the higher objective.

    It may keep references to the tensors offered to ``update`` instead of copies: do not modify those
    in place afterwards (the attack loops build a new iterate every step).
    """

    def __init__(self, x: Tensor):
        n = x.shape[0]
        self.x_adv = x.detach().clone()
        self.objective = torch.full((n,), float("-inf"), device=x.device, dtype=x.dtype)
        self.success = torch.zeros(n, dtype=torch.bool, device=x.device)
        self.logits: Tensor | None = None

    def update(self, x_adv: Tensor, logits: Tensor, objective: Tensor, success: Tensor, index: Tensor | None = None) -> None:
        """Offer candidates for all samples (``index=None``) or for the samples at ``index``."""
        if self.logits is None:
            self.logits = torch.zeros(self.x_adv.shape[0], logits.shape[1], device=logits.device, dtype=logits.dtype)
        if index is None:
            better = self._better(success, objective, self.success, self.objective)
            if bool(better.all()):  # common while the loss still climbs: no copy needed
                self.x_adv, self.logits = x_adv.detach(), logits
            else:
                self.x_adv = torch.where(expand_mask(better, x_adv), x_adv.detach(), self.x_adv)
                self.logits = torch.where(better[:, None], logits, self.logits)
            self.objective = torch.where(better, objective, self.objective)
            self.success = self.success | success
            return
        better = self._better(success, objective, self.success[index], self.objective[index])
        chosen = index[better]
        self.x_adv[chosen] = x_adv[better].detach()
        self.logits[chosen] = logits[better]
        self.objective[chosen] = objective[better]
        self.success[chosen] = success[better]

    @staticmethod
    def _better(success: Tensor, objective: Tensor, best_success: Tensor, best_objective: Tensor) -> Tensor:
        return (success & ~best_success) | ((success == best_success) & (objective > best_objective))


def expand_mask(mask: Tensor, like: Tensor) -> Tensor:
    """A per-sample mask shaped to broadcast over ``like``'s (batch, ...) dimensions."""
    return mask.reshape((-1,) + (1,) * (like.dim() - 1))


def any_per_owner(success: Tensor, owner: Tensor, n_owners: int | None = None) -> Tensor:
    """Per row: has any row with the same owner succeeded (rows that are copies of one sample).

    ``n_owners`` bounds the owner ids (default: the row count, right while no row has been dropped); passing it
    avoids reading ``owner.max()`` back from the device."""
    hit = torch.zeros(owner.shape[0] if n_owners is None else n_owners, dtype=torch.bool, device=owner.device)
    hit[owner[success]] = True
    return hit[owner]

