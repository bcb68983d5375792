"""MART, misclassification-aware adversarial training (Wang et al., ICLR 2020): a boosted CE at the PGD point plus
a KL term weighted by how wrong the clean prediction is."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ...attacks import PGD
from ...threat import ThreatModel
from .base import MethodOutput, adversarial_batch, mixed_forward
from .tradeoff import KLTradeoff


class MART(KLTradeoff):
    """MART, misclassification-aware adversarial training (Wang et al., ICLR 2020):
    L = BCE(p(x'), y) + β·mean_i KL(p(x_i) ‖ p(x'_i))·(1 − p_y(x_i)),
    BCE(p, y) = −log p_y − log(1 − max_{k≠y} p_k), x' from PGD on CE (random start, ``steps`` (10) steps of
    ``step_size`` (eps/4), loss maximised).

    The KL term weighs each sample by how wrong the clean prediction is, so misclassified clean points count
    more. β = 6 is the paper's default; the 1e-12 guards inside the logarithms are the paper's code's.
    ``awp_gamma`` > 0 adds adversarial weight perturbation (AWP-MART, Wu et al. 2020).
    """

    name = "mart"
    beta_hint = "the weight β of the KL term; the paper uses 6"

    def __init__(self, threat: ThreatModel | None = None, *, beta: float = 6.0, steps: int = 10,
                 step_size: float | None = None, awp_gamma: float = 0.0, awp_step_size: float | None = None,
                 awp_steps: int = 1) -> None:
        super().__init__(threat)
        self._init_tradeoff(beta, steps, step_size, awp_gamma, awp_step_size, awp_steps)

    def compute(self, model, attack_model, x, y, threat):
        attack = None
        if threat.eps > 0:
            step_size = self.step_size if self.step_size is not None else threat.eps / 4
            attack = PGD(attack_model, threat, steps=self.steps, step_size=step_size, early_stop=False)
        x_adv = adversarial_batch(attack, x, y, threat)
        forward = self.loss_forward(model, attack_model, lambda f: self.loss(*mixed_forward(f, x, x_adv), y)[0])
        logits_clean, logits_adv = mixed_forward(forward, x, x_adv)
        loss, kl = self.loss(logits_clean, logits_adv, y)
        return MethodOutput(loss, logits_clean, logits_adv, {"kl": float(kl.detach())})

    def loss(self, logits_clean: Tensor, logits_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(the MART loss, its weighted KL term)."""
        probs_adv = F.softmax(logits_adv, dim=1)
        probs_clean = F.softmax(logits_clean, dim=1)
        wrong = probs_adv.scatter(1, y[:, None], -1.0).argmax(dim=1)  # the most likely wrong class at x'
        boosted_ce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - probs_adv + 1e-12), wrong)
        kl = (probs_clean * (torch.log(probs_clean + 1e-12) - torch.log(probs_adv + 1e-12))).sum(dim=1)
        true_prob = probs_clean.gather(1, y[:, None]).squeeze(1)
        weighted_kl = (kl * (1.0000001 - true_prob)).mean()
        return boosted_ce + self.beta * weighted_kl, weighted_kl
