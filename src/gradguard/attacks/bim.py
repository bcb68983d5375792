"""BIM / I-FGSM — the Basic Iterative Method (Kurakin, Goodfellow & Bengio, 2016)."""
from __future__ import annotations

import math

from torch import nn

from ..threat import ThreatModel
from .pgd import PGD


def kurakin_defaults(threat: ThreatModel) -> tuple[int, float]:
    """The paper's budget: step α = 1 pixel level (1/255 of the range) and min(ε+4, 1.25ε) steps, ε in levels.

    The paper defines it for L∞ on 0..255 images; for other norms we use 10 steps of 2.5·ε/10.
    """
    if threat.norm == "linf":
        levels = threat.eps * 255.0 / (threat.bounds[1] - threat.bounds[0])
        steps = max(1, math.ceil(min(levels + 4.0, 1.25 * levels)))
        return steps, (threat.bounds[1] - threat.bounds[0]) / 255.0
    return 10, 2.5 * threat.eps / 10


class BIM(PGD):
    """Iterated FGSM from the clean input, clipped to the ε-ball after every step.

    Kurakin et al. (2016) defaults: α = 1/255 of the pixel range, steps = ceil(min(ε·255 + 4, 1.25·ε·255)).
    No random start (that, plus a different step rule, is PGD).
    """

    name = "bim"

    def __init__(self, model: nn.Module, threat: ThreatModel, *, steps: int | None = None,
                 step_size: float | None = None, **kwargs) -> None:
        default_steps, default_step_size = kurakin_defaults(threat)
        kwargs.setdefault("init", "zero")
        super().__init__(model, threat, steps=steps or default_steps,
                         step_size=step_size if step_size is not None else default_step_size, **kwargs)
