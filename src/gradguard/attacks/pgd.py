"""PGD — projected gradient descent on the loss (Madry et al., ICLR 2018), the iterative loop of gradguard."""
from __future__ import annotations

from typing import Dict

from torch import Tensor, nn

from ..checks import positive_float, positive_int
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

    # The loop. Subclasses change the start (``_start``) or the direction (``_direction``), never the loop.
    def _perturb(self, x: Tensor, labels: Tensor) -> Iterate:
        x_adv = self._start(x, labels)
        best = BestIterate(x_adv)
        index: Tensor | None = None  # original positions of the samples still worked on; None = all
        state: Dict[str, Tensor] = {}
        for _ in range(self.steps):
            grad, logits, objective = self._gradient(x_adv, labels)
            success = self._succeeded(logits, labels)
            best.update(x_adv, logits, objective, success, index)
            if self.early_stop and bool(success.any()):
                keep = ~success
                if not bool(keep.any()):
                    return Iterate(best.x_adv, best.logits, best.objective)
                index = keep.nonzero().squeeze(1) if index is None else index[keep]
                x, x_adv, labels, grad = x[keep], x_adv[keep], labels[keep], grad[keep]
                state = {key: value[keep] for key, value in state.items()}
            direction = self._direction(grad, state)
            x_adv = self.threat.project(x_adv + self.threat.ascent_step(direction, self.step_size, x_adv), x)
        logits, objective = self._evaluate(x_adv, labels)
        best.update(x_adv, logits, objective, self._succeeded(logits, labels), index)
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
