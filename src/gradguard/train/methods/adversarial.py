"""Adversarial training on the library's attacks: FGSM-AT (Goodfellow et al. 2015), fast FGSM (Wong, Rice &
Kolter 2020) and PGD-AT (Madry et al. 2018), the methods that minimise the loss at an attack's point."""
from __future__ import annotations

from torch.nn import functional as F

from ...attacks import FGSM, PGD
from ...checks import positive_float, positive_int
from ...errors import ConfigError
from ...threat import ThreatModel
from .awp import WeightPerturbationOption
from .base import MethodOutput, TrainingMethod, adversarial_batch, mixed_forward


class FGSMAT(TrainingMethod):
    """FGSM adversarial training (Goodfellow, Shlens & Szegedy 2015): each step attacks the current model with
    FGSM (no random start, step = eps) and minimises L = w·CE(x) + (1 − w)·CE(x_fgsm).

    ``clean_weight`` w = 0.5 is the paper's α; w = 0 trains on adversarial examples only. Like fast FGSM it can
    overfit catastrophically; the Trainer's guard then calls ``make_safer``, which adds a uniform random start
    in the ball (Wong, Rice & Kolter 2020) and keeps the step at eps.
    """

    name = "fgsm"
    single_step = True

    def __init__(self, threat: ThreatModel | None = None, *, clean_weight: float = 0.5,
                 random_start: bool = False) -> None:
        super().__init__(threat)
        self.clean_weight = positive_float(clean_weight, "clean_weight", allow_zero=True)
        if self.clean_weight > 1:
            raise ConfigError(f"clean_weight: must lie in [0, 1], got {clean_weight!r}")
        self.random_start = bool(random_start)

    def state_dict(self):
        return {"clean_weight": self.clean_weight, "random_start": self.random_start}

    def make_safer(self) -> str | None:
        if self.random_start:
            return None
        self.random_start = True
        return "FGSM from a uniform random start in the ball (step eps)"

    def compute(self, model, attack_model, x, y, threat):
        x_adv = adversarial_batch(FGSM(attack_model, threat, random_start=self.random_start), x, y, threat)
        if self.clean_weight == 0:
            logits_adv = model(x_adv)
            return MethodOutput(F.cross_entropy(logits_adv, y), logits_adv=logits_adv)
        logits_clean, logits_adv = mixed_forward(model, x, x_adv)
        loss = self.clean_weight * F.cross_entropy(logits_clean, y) + (1 - self.clean_weight) * F.cross_entropy(logits_adv, y)
        return MethodOutput(loss, logits_clean, logits_adv)


class FastFGSM(TrainingMethod):
    """"Fast is better than free" FGSM training (Wong, Rice & Kolter, ICLR 2020): FGSM from a uniform random
    start in the eps-ball with step ``step_factor``·eps (1.25 in the paper), projected back; L = CE(x_adv).

    Prone to catastrophic overfitting (robustness to PGD collapses within an epoch while FGSM accuracy soars);
    the Trainer's guard detects it and calls ``make_safer``: first step 1.0·eps (the Trainer also halves the
    learning rate), then PGD-2 with random start and step 0.5·eps, which does not overfit catastrophically.
    """

    name = "fgsm-rs"
    single_step = True

    def __init__(self, threat: ThreatModel | None = None, *, step_factor: float = 1.25, pgd_steps: int = 0) -> None:
        super().__init__(threat)
        self.step_factor = positive_float(step_factor, "step_factor")
        self.pgd_steps = int(pgd_steps)  # 0: FGSM; >0 after the guard switched to PGD-k

    def state_dict(self):
        return {"step_factor": self.step_factor, "pgd_steps": self.pgd_steps}

    def make_safer(self) -> str | None:
        if self.pgd_steps == 0 and self.step_factor > 1.0:
            self.step_factor = 1.0
            return "FGSM step lowered to 1.0·eps"
        if self.pgd_steps == 0:
            self.pgd_steps, self.step_factor = 2, 0.5
            return "switched to PGD-2 (random start, step 0.5·eps)"
        return None

    def compute(self, model, attack_model, x, y, threat):
        if self.pgd_steps:
            attack = PGD(attack_model, threat, steps=self.pgd_steps, step_size=self.step_factor * threat.eps,
                         early_stop=False) if threat.eps > 0 else None
        else:
            attack = FGSM(attack_model, threat, random_start=True, step_size=self.step_factor * threat.eps) \
                if threat.eps > 0 else None
        x_adv = adversarial_batch(attack, x, y, threat)
        logits_adv = model(x_adv)
        return MethodOutput(F.cross_entropy(logits_adv, y), logits_adv=logits_adv)



class PGDAT(WeightPerturbationOption):
    """PGD adversarial training (Madry et al., ICLR 2018): min over θ of CE at the PGD point,
    PGD with random start, ``steps`` (10) steps of ``step_size`` (2.5·eps/steps), loss maximised (no early stop).
    ``awp_gamma`` > 0 adds adversarial weight perturbation (AWP-AT, Wu et al. 2020; the paper uses 5e-3)."""

    name = "pgd"

    def __init__(self, threat: ThreatModel | None = None, *, steps: int = 10, step_size: float | None = None,
                 awp_gamma: float = 0.0, awp_step_size: float | None = None, awp_steps: int = 1) -> None:
        super().__init__(threat)
        self.steps = positive_int(steps, "steps")
        self.step_size = None if step_size is None else positive_float(step_size, "step_size")
        self._init_awp(awp_gamma, awp_step_size, awp_steps)

    def state_dict(self):
        return {"steps": self.steps, "step_size": self.step_size, **self.awp_state()}

    def compute(self, model, attack_model, x, y, threat):
        attack = None
        if threat.eps > 0:
            step_size = self.step_size if self.step_size is not None else 2.5 * threat.eps / self.steps
            attack = PGD(attack_model, threat, steps=self.steps, step_size=step_size, early_stop=False)
        x_adv = adversarial_batch(attack, x, y, threat)
        forward = self.loss_forward(model, attack_model, lambda f: F.cross_entropy(f(x_adv), y))
        logits_adv = forward(x_adv)
        return MethodOutput(F.cross_entropy(logits_adv, y), logits_adv=logits_adv)
