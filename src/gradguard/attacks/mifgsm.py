"""MI-FGSM — momentum iterative FGSM (Dong et al., CVPR 2018)."""
from __future__ import annotations

from typing import Dict

from torch import Tensor, nn

from ..checks import positive_float
from ..threat import ThreatModel
from .pgd import PGD


class MIFGSM(PGD):
    """Iterative FGSM with a momentum term: g ← μ·g + ∇/‖∇‖₁, x ← Π(x + α·step(g)).

    Dong et al. (2018) defaults: μ = 1.0, 10 steps, α = ε/steps, start at the clean input.
    """

    name = "mifgsm"

    def __init__(self, model: nn.Module, threat: ThreatModel, *, steps: int = 10, step_size: float | None = None,
                 decay: float = 1.0, **kwargs) -> None:
        kwargs.setdefault("init", "zero")
        super().__init__(model, threat, steps=steps,
                         step_size=threat.eps / steps if step_size is None else step_size, **kwargs)
        self.decay = positive_float(decay, "decay", allow_zero=True)

    def _direction(self, grad: Tensor, state: Dict[str, Tensor]) -> Tensor:
        l1 = grad.abs().reshape(grad.shape[0], -1).sum(dim=1).clamp_min(1e-12)
        normalised = grad / l1.reshape((-1,) + (1,) * (grad.dim() - 1))
        state["momentum"] = self.decay * state["momentum"] + normalised if "momentum" in state else normalised
        return state["momentum"]
