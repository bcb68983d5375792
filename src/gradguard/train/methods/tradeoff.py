"""What TRADES and MART share: the settings of a β-weighted KL trade-off with an inner attack, checked once.

Both add β times a KL term between the clean and the adversarial prediction to their loss, find the adversarial
point by ``steps`` ascent steps of ``step_size`` (None: eps/4), and take the AWP option. The checks of these
settings and their checkpoint state live here; each method's loss and inner maximisation stay in its own file.
"""
from __future__ import annotations

from typing import Any, ClassVar

from ...checks import positive_float, positive_int
from .awp import WeightPerturbationOption


class KLTradeoff(WeightPerturbationOption):
    """Base of TRADES and MART: ``beta`` (the weight of the KL term), ``steps`` and ``step_size`` of the inner
    attack and the AWP option, all saved in checkpoints (``state_dict``). A subclass keeps its own ``__init__``
    (its documented signature) and calls ``_init_tradeoff`` from it."""

    beta_hint: ClassVar[str] = ""  # what β means, said in the error for a bad beta

    def _init_tradeoff(self, beta: float, steps: int, step_size: float | None, awp_gamma: float,
                       awp_step_size: float | None, awp_steps: int) -> None:
        self.beta = positive_float(beta, "beta", allow_zero=True, hint=self.beta_hint)
        self.steps = positive_int(steps, "steps")
        self.step_size = None if step_size is None else positive_float(step_size, "step_size")
        self._init_awp(awp_gamma, awp_step_size, awp_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "steps": self.steps, "step_size": self.step_size, **self.awp_state()}
