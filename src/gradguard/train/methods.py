"""Training methods: each turns a batch into the loss to minimise (and the logits for accuracy stats).

``Standard`` (clean ERM), ``FGSMAT`` (Goodfellow et al. 2015), ``FastFGSM`` (Wong, Rice & Kolter 2020),
``PGDAT`` (Madry et al. 2018), ``TRADES`` (Zhang et al. 2019) and ``Gaussian`` noise augmentation (Cohen et al.
2019, the base model of randomized smoothing). Adversarial examples come from the landed
attacks (``FGSM``, ``PGD``), which run the model in eval mode with frozen parameters and restore it exactly,
so the attack never touches ``.grad`` and never updates BatchNorm statistics.

``compute(model, attack_model, x, y, threat)``: ``model`` is what the loss flows through (possibly a
DistributedDataParallel wrapper); ``attack_model`` is the plain module the attack differentiates. When a method
needs clean and adversarial logits it runs *one* forward on the concatenated batch (one DDP forward per step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..attacks import FGSM, PGD
from ..attacks.base import input_gradient, model_guard, positive_float, positive_int
from ..errors import ConfigError
from ..threat import ThreatModel


@dataclass
class MethodOutput:
    """The batch loss L (before loss_weight and L2) and the logits the trainer turns into accuracies."""

    loss: Tensor
    logits_clean: Tensor | None = None
    logits_adv: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)


class TrainingMethod:
    """Base class: a method maps (model, batch, threat) to a ``MethodOutput``."""

    name: ClassVar[str] = "method"
    needs_threat: ClassVar[bool] = True

    def __init__(self, threat: ThreatModel | None = None) -> None:
        if self.needs_threat and not isinstance(threat, ThreatModel):
            raise ConfigError(f"threat: method {self.name!r} needs a ThreatModel, e.g. threat=Linf(eps=0.1)")
        self.threat = threat

    def compute(self, model: nn.Module, attack_model: nn.Module, x: Tensor, y: Tensor,
                threat: ThreatModel | None) -> MethodOutput:
        raise NotImplementedError

    # Settings that can change during training (the CO guard) — saved in checkpoints, JSON-able.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.state_dict()}

    def make_safer(self) -> str | None:
        """Switch to a more conservative setting after catastrophic overfitting; describe it, or None."""
        return None

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.state_dict().items())
        return f"{type(self).__name__}({settings})"


def _mixed_forward(model: nn.Module, x: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor]:
    """Clean and adversarial logits from one forward on the concatenated batch."""
    logits = model(torch.cat([x, x_adv]))
    return logits[: x.shape[0]], logits[x.shape[0]:]


class Standard(TrainingMethod):
    """Plain empirical risk minimisation: L = CE(f(x), y)."""

    name = "standard"
    needs_threat = False

    def compute(self, model, attack_model, x, y, threat):
        logits = model(x)
        return MethodOutput(F.cross_entropy(logits, y), logits_clean=logits)


class FGSMAT(TrainingMethod):
    """FGSM adversarial training (Goodfellow, Shlens & Szegedy 2015): each step attacks the current model with
    FGSM (no random start, step = eps) and minimises L = w·CE(x) + (1 − w)·CE(x_fgsm).

    ``clean_weight`` w = 0.5 is the paper's α; w = 0 trains on adversarial examples only. Like fast FGSM it can
    overfit catastrophically; the Trainer's guard then calls ``make_safer``, which adds a uniform random start
    in the ball (Wong, Rice & Kolter 2020) and keeps the step at eps.
    """

    name = "fgsm"

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
        x_adv = _attack(FGSM(attack_model, threat, random_start=self.random_start), x, y, threat)
        if self.clean_weight == 0:
            logits_adv = model(x_adv)
            return MethodOutput(F.cross_entropy(logits_adv, y), logits_adv=logits_adv)
        logits_clean, logits_adv = _mixed_forward(model, x, x_adv)
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
        x_adv = _attack(attack, x, y, threat)
        logits_adv = model(x_adv)
        return MethodOutput(F.cross_entropy(logits_adv, y), logits_adv=logits_adv)


class PGDAT(TrainingMethod):
    """PGD adversarial training (Madry et al., ICLR 2018): min over θ of CE at the PGD point,
    PGD with random start, ``steps`` (10) steps of ``step_size`` (2.5·eps/steps), loss maximised (no early stop)."""

    name = "pgd"

    def __init__(self, threat: ThreatModel | None = None, *, steps: int = 10, step_size: float | None = None) -> None:
        super().__init__(threat)
        self.steps = positive_int(steps, "steps")
        self.step_size = None if step_size is None else positive_float(step_size, "step_size")

    def state_dict(self):
        return {"steps": self.steps, "step_size": self.step_size}

    def compute(self, model, attack_model, x, y, threat):
        attack = None
        if threat.eps > 0:
            step_size = self.step_size if self.step_size is not None else 2.5 * threat.eps / self.steps
            attack = PGD(attack_model, threat, steps=self.steps, step_size=step_size, early_stop=False)
        x_adv = _attack(attack, x, y, threat)
        logits_adv = model(x_adv)
        return MethodOutput(F.cross_entropy(logits_adv, y), logits_adv=logits_adv)


class TRADES(TrainingMethod):
    """TRADES (Zhang et al., ICML 2019): L = CE(f(x), y) + β·KL(p(x) ‖ p(x')) with x' maximising that KL
    in the eps-ball (start x + 0.001·N(0, I), ``steps`` (10) ascent steps of ``step_size`` (eps/4), projected).
    β = 6 is the paper's default; larger β trades clean accuracy for robustness.
    """

    name = "trades"

    def __init__(self, threat: ThreatModel | None = None, *, beta: float = 6.0, steps: int = 10,
                 step_size: float | None = None) -> None:
        super().__init__(threat)
        self.beta = positive_float(beta, "beta", allow_zero=True)
        self.steps = positive_int(steps, "steps")
        self.step_size = None if step_size is None else positive_float(step_size, "step_size")

    def state_dict(self):
        return {"beta": self.beta, "steps": self.steps, "step_size": self.step_size}

    def compute(self, model, attack_model, x, y, threat):
        x_adv = self.maximise_kl(attack_model, x, threat) if threat.eps > 0 else x
        logits_clean, logits_adv = _mixed_forward(model, x, x_adv)
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
        loss = F.cross_entropy(logits_clean, y) + self.beta * kl
        return MethodOutput(loss, logits_clean, logits_adv, {"kl": float(kl.detach())})

    def maximise_kl(self, model: nn.Module, x: Tensor, threat: ThreatModel) -> Tensor:
        """The TRADES inner maximisation: last iterate of projected ascent on KL(p(x) ‖ p(x'))."""
        step_size = self.step_size if self.step_size is not None else threat.eps / 4
        with model_guard(model):
            with torch.no_grad():
                p_clean = F.softmax(model(x), dim=1)

            def kl_objective(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
                return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="none").sum(dim=1)

            x_adv = threat.project(x + 0.001 * torch.randn_like(x), x)
            dummy_labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            for _ in range(self.steps):
                grad, _, _ = input_gradient(model, x_adv, dummy_labels, kl_objective, False)
                x_adv = threat.project(x_adv + threat.ascent_step(grad, step_size, x_adv), x)
        return x_adv.detach()


class Gaussian(TrainingMethod):
    """Gaussian noise augmentation (Cohen, Rosenfeld & Kolter, ICML 2019): L = CE(f(x + δ), y), δ ~ N(0, σ²I),
    one fresh draw per sample and step — the base classifier that ``gradguard.certify`` smooths at the same σ.

    As in the paper the noisy input is *not* clamped to the pixel range: certification adds unclamped noise, and
    the model should be trained on that distribution. No threat model is needed; the noise comes from torch's
    global RNG, which the Trainer seeds and checkpoints. The "robust" training accuracy it reports is the accuracy
    on the noisy inputs it trains on.
    """

    name = "gaussian"
    needs_threat = False

    def __init__(self, threat: ThreatModel | None = None, *, sigma: float = 0.25) -> None:
        super().__init__(threat)
        self.sigma = positive_float(sigma, "sigma")

    def state_dict(self):
        return {"sigma": self.sigma}

    def compute(self, model, attack_model, x, y, threat):
        logits_noisy = model(x + self.sigma * torch.randn_like(x))
        return MethodOutput(F.cross_entropy(logits_noisy, y), logits_adv=logits_noisy)


def _attack(attack, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
    """Adversarial batch from ``attack`` (clean batch when eps is 0, e.g. at the start of an eps warm-up)."""
    if attack is None or threat.eps <= 0:
        return x
    return attack(x, y).detach()


METHODS: dict[str, type[TrainingMethod]] = {
    cls.name: cls for cls in (Standard, FGSMAT, FastFGSM, PGDAT, TRADES, Gaussian)
}


def get_method(name: str | TrainingMethod, threat: ThreatModel | None = None, **kwargs) -> TrainingMethod:
    """A method by name: "standard", "fgsm", "fgsm-rs", "pgd", "trades" or "gaussian" (an instance passes through)."""
    if isinstance(name, TrainingMethod):
        if kwargs:
            raise ConfigError("method: keyword arguments given together with a method instance; set them on the instance")
        return name
    if name not in METHODS:
        raise ConfigError(f"method: unknown training method {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[name]
    try:
        return cls(threat, **kwargs)
    except TypeError as error:
        raise ConfigError(f"method: invalid options for {name!r}: {error}") from None
