"""PGD — projected gradient descent on the loss (Madry et al., ICLR 2018): the attack on the one ascent loop."""
from __future__ import annotations

from typing import Dict

from torch import Tensor, nn

from ..checks import positive_float, positive_int
from ..core.ascent import projected_ascent
from ..errors import ConfigError
from ..threat import ThreatModel
from .base import Attack, BestIterate, Iterate

INITS = ("random", "zero", "fgsm")


class PGD(Attack):
    """Projected gradient ascent: ``steps`` steps of size ``step_size`` in the threat model's
    steepest-ascent direction, each projected back onto the eps-ball ∩ bounds.

    Madry et al. (2018) defaults: a uniform random start in the ball and step size 2.5·eps/steps.
    ``init="zero"`` starts at x (this is BIM); ``init="fgsm"`` starts at the FGSM point, then refines.
    Per sample the best iterate is returned (a success first, then the highest loss), not the last one.
    """

    name = "pgd"

    def __init__(self, model: nn.Module, threat: ThreatModel, *, steps: int = 40, step_size: float | None = None,
                 init: str = "random", **kwargs) -> None:
        super().__init__(model, threat, **kwargs)
        self.steps = positive_int(steps, "steps")
        self.step_size = 2.5 * threat.eps / self.steps if step_size is None else positive_float(step_size, "step_size", allow_zero=True)
        if init not in INITS:
            raise ConfigError(f"init: expected one of {INITS}, got {init!r}")
        self.init = init

    # The loop is core.ascent's, shared with TRADES and the masking probe. Subclasses change the start
    # (``_start``) or the direction (``_direction``), never the loop.
    def _perturb(self, x: Tensor, labels: Tensor) -> Iterate:
        x_adv = self._start(x, labels)
        best = BestIterate(x_adv)

        def record(x_adv: Tensor, logits: Tensor, objective: Tensor, labels: Tensor,
                   index: Tensor | None) -> Tensor | None:
            """Offer the point to the per-sample best; with early stop, keep climbing only where it failed."""
            success = self._succeeded(logits, labels)
            best.update(x_adv, logits, objective, success, index)
            return ~success if self.early_stop and bool(success.any()) else None

        path = projected_ascent(self._gradient, self.threat, x, labels, x_adv, steps=self.steps,
                                step_size=self.step_size, direction=self._direction, on_step=record)
        if not path.stopped:  # score the last iterate, which took no gradient step
            logits, objective = self._evaluate(path.x_adv, path.labels)
            best.update(path.x_adv, logits, objective, self._succeeded(logits, path.labels), path.index)
        return Iterate(best.x_adv, best.logits, best.objective)

    def _start(self, x: Tensor, labels: Tensor) -> Tensor:
        if self.init == "random":
            return self._random_start(x)
        if self.init == "fgsm":
            grad, _, _ = self._gradient(x, labels)
            return self.threat.project(x + self.threat.ascent_step(grad, self.threat.eps, x), x)
        return x.clone()

    def _direction(self, grad: Tensor, state: Dict[str, Tensor]) -> Tensor:
        """The ascent direction from this step's gradient; ``state`` holds per-sample tensors across steps."""
        return grad
