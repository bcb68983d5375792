"""FGSM — Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy, ICLR 2015)."""
from __future__ import annotations

from torch import Tensor, nn

from ..checks import positive_float
from ..threat import ThreatModel
from .base import Attack, Iterate


class FGSM(Attack):
    """One steepest-ascent step of length ``eps``: x + eps·sign(∇x L) under L∞ (normalised gradient
    under L2, sparse step under L1), then clipped to the bounds.

    ``random_start=True`` with ``step_size=1.25·eps`` is the "fast" FGSM of Wong, Rice & Kolter (2020):
    start from a uniform point in the ball, step, project back. Defaults: no random start, step = eps.
    """

    name = "fgsm"

    def __init__(self, model: nn.Module, threat: ThreatModel, *, random_start: bool = False,
                 step_size: float | None = None, **kwargs) -> None:
        super().__init__(model, threat, **kwargs)
        self.random_start = bool(random_start)
        self.step_size = threat.eps if step_size is None else positive_float(step_size, "step_size", allow_zero=True)

    def _perturb(self, x: Tensor, labels: Tensor) -> Iterate:
        start = self._random_start(x) if self.random_start else x
        grad, _, _ = self._gradient(start, labels)
        x_adv = self.threat.project(start + self.threat.ascent_step(grad, self.step_size, start), x)
        return Iterate(x_adv.detach())
