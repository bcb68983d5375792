"""TRADES (Zhang et al., ICML 2019): the clean loss plus β times the KL to the point that maximises it, and that
inner maximisation (the library's one projected-ascent loop, ``core.ascent``, on the KL)."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ...core.ascent import objective_gradient, projected_ascent
from ...core.guard import model_guard
from ...rng import noise_like
from ...threat import ThreatModel
from .base import MethodOutput, mixed_forward
from .tradeoff import KLTradeoff


class TRADES(KLTradeoff):
    """TRADES (Zhang et al., ICML 2019): L = CE(f(x), y) + β·KL(p(x) ‖ p(x')) with x' maximising that KL
    in the eps-ball (start x + 0.001·N(0, I), ``steps`` (10) ascent steps of ``step_size`` (eps/4), projected).
    β = 6 is the paper's default; larger β trades clean accuracy for robustness. ``awp_gamma`` > 0 adds
    adversarial weight perturbation (AWP-TRADES, Wu et al. 2020), the ascent maximising this same loss.
    """

    name = "trades"

    def __init__(self, threat: ThreatModel | None = None, *, beta: float = 6.0, steps: int = 10,
                 step_size: float | None = None, awp_gamma: float = 0.0, awp_step_size: float | None = None,
                 awp_steps: int = 1) -> None:
        super().__init__(threat)
        self._init_tradeoff(beta, steps, step_size, awp_gamma, awp_step_size, awp_steps)

    def compute(self, model, attack_model, x, y, threat):
        x_adv = self.maximise_kl(attack_model, x, threat) if threat.eps > 0 else x
        forward = self.loss_forward(model, attack_model, lambda f: self.loss(*mixed_forward(f, x, x_adv), y)[0])
        logits_clean, logits_adv = mixed_forward(forward, x, x_adv)
        loss, kl = self.loss(logits_clean, logits_adv, y)
        return MethodOutput(loss, logits_clean, logits_adv, {"kl": float(kl.detach())})

    def loss(self, logits_clean: Tensor, logits_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(CE(x) + β·KL(p(x) ‖ p(x')), the KL term)."""
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
        return F.cross_entropy(logits_clean, y) + self.beta * kl, kl

    def maximise_kl(self, model: nn.Module, x: Tensor, threat: ThreatModel) -> Tensor:
        """The TRADES inner maximisation: last iterate of projected ascent on KL(p(x) ‖ p(x'))."""
        step_size = self.step_size if self.step_size is not None else threat.eps / 4
        with model_guard(model):
            with torch.no_grad():
                p_clean = F.softmax(model(x), dim=1)

            def kl_objective(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
                return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="none").sum(dim=1)

            start = threat.project(x + 0.001 * noise_like(x), x)
            no_labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # the KL needs none
            path = projected_ascent(objective_gradient(model, kl_objective), threat, x, no_labels, start,
                                    steps=self.steps, step_size=step_size)
        return path.x_adv.detach()
