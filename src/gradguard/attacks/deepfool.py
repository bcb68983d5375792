"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016, "DeepFool: a simple and accurate method to fool
deep neural networks")."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import positive_float, positive_int
from ..errors import ConfigError
from ..threat import ThreatModel
from .base import Attack, Iterate, expand_mask, input_gradient

_TINY = 1e-8
PUSH = 1e-4  # the reference implementation's extra push past the linearised boundary


def logit_difference(logits: Tensor, pairs: Tensor, targeted: bool = False) -> Tensor:
    """z_k − z_y for rows ``pairs = (y, k)``: negative while class y still beats class k."""
    return logits.gather(1, pairs[:, 1:]).squeeze(1) - logits.gather(1, pairs[:, :1]).squeeze(1)


class DeepFool(Attack):
    """Minimal perturbation by repeated linearisation: at each step, move to the closest linearised decision
    boundary among the top candidate classes, until the prediction changes.

    For class k with f_k = z_k − z_y and w_k = ∇f_k the distance to its boundary is |f_k| / ‖w_k‖_q (q = 2 for L2,
    q = 1 for L∞); the step to the closest is (|f_l| + 1e-4) / ‖w_l‖_q^q · w_l (L2) or (|f_l| + 1e-4) / ‖w_l‖₁ ·
    sign(w_l) (L∞). The accumulated step r is overshot: x + (1 + overshoot)·r, clipped to the bounds.
    Paper defaults: overshoot 0.02, 50 steps, the 10 top classes by clean logits (true class included).

    Untargeted only; each sample stops as soon as it is misclassified (a minimal-perturbation method, so
    ``early_stop`` does not apply). The final point is projected into the threat's eps-ball: a perturbation that
    needed more than eps is pulled back and success is re-evaluated there. L∞ and L2 threat models.
    """

    name = "deepfool"
    supported_norms = ("linf", "l2")

    def __init__(self, model: nn.Module, threat: ThreatModel, *, steps: int = 50, overshoot: float = 0.02,
                 candidates: int = 10, **kwargs) -> None:
        if kwargs.get("targeted"):
            raise ConfigError("targeted: DeepFool is an untargeted attack; use PGD/APGD with targeted=True")
        if "loss" in kwargs:
            raise ConfigError("loss: DeepFool uses logit differences, it takes no loss")
        super().__init__(model, threat, loss="margin", **kwargs)
        self.steps = positive_int(steps, "steps")
        self.overshoot = positive_float(overshoot, "overshoot", allow_zero=True)
        self.candidates = positive_int(candidates, "candidates")
        if self.candidates < 2:
            raise ConfigError(f"candidates: need the true class and at least one other, got {candidates!r}")

    def _perturb(self, x: Tensor, labels: Tensor) -> Iterate:
        with torch.no_grad():
            self._n_forward += x.shape[0]
            clean_logits = self._forward(x)
        n_others = min(self.candidates, clean_logits.shape[1]) - 1
        others = clean_logits.scatter(1, labels[:, None], float("-inf")).argsort(dim=1, descending=True)[:, :n_others]
        total = torch.zeros_like(x)
        x_adv = x.clone()
        active = torch.arange(x.shape[0], device=x.device)
        for _ in range(self.steps + 1):
            differences, gradients, logits = self._class_gradients(x_adv[active], labels[active], others[active])
            fooled = logits.argmax(dim=1) != labels[active]
            active = active[~fooled]
            if active.numel() == 0:
                break
            step = self._step_to_closest_boundary(differences[~fooled], gradients[~fooled])
            total[active] = total[active] + step
            x_adv[active] = self.threat.clip(x[active] + (1 + self.overshoot) * total[active])
        x_adv = self.threat.project(x_adv, x)
        logits, objective = self._evaluate(x_adv, labels)
        return Iterate(x_adv, logits, objective)

    def _class_gradients(self, x_adv: Tensor, labels: Tensor, others: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(f_k = z_k − z_y, ∇f_k) for every candidate k, and the logits: one pass over (batch × candidates) copies."""
        n, k = others.shape
        repeated = x_adv.repeat_interleave(k, dim=0)
        pairs = torch.stack([labels.repeat_interleave(k), others.reshape(-1)], dim=1)
        self._n_grad += repeated.shape[0]
        grad, logits, values = input_gradient(self.forward_model, repeated, pairs, logit_difference, False,
                                              amp=self.amp_dtype)
        return values.reshape(n, k), grad.reshape((n, k) + x_adv.shape[1:]), logits[::k]

    def _step_to_closest_boundary(self, differences: Tensor, gradients: Tensor) -> Tensor:
        flat = gradients.flatten(2)
        dual = flat.abs().sum(dim=2) if self.threat.norm == "linf" else flat.norm(dim=2)
        distance = differences.abs() / (dual + _TINY)
        closest = distance.argmin(dim=1)
        rows = torch.arange(closest.shape[0], device=closest.device)
        w, f, size = gradients[rows, closest], differences[rows, closest].abs(), dual[rows, closest]
        if self.threat.norm == "linf":
            return expand_mask((f + PUSH) / (size + _TINY), w) * w.sign()
        return expand_mask((f + PUSH) / (size ** 2 + _TINY), w) * w
