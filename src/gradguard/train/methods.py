"""Training methods: each turns a batch into the loss to minimise (and the logits for accuracy stats).

``Standard`` (clean ERM), ``FGSMAT`` (Goodfellow et al. 2015), ``FastFGSM`` (Wong, Rice & Kolter 2020),
``PGDAT`` (Madry et al. 2018), ``TRADES`` (Zhang et al. 2019), ``Gaussian`` noise augmentation (Cohen et al.
2019, the base model of randomized smoothing), and the gradient- and curvature-based ones: ``InputGradientRegularization``
(Drucker & LeCun 1992; Ross & Doshi-Velez 2018), ``CURE`` (Moosavi-Dezfooli et al. 2019), ``GradAlign``
(Andriushchenko & Flammarion 2020) and ``MART`` (Wang et al. 2020). ``pgd``, ``trades`` and ``mart`` take
``awp_gamma`` > 0 for adversarial weight perturbation (AWP, Wu et al. 2020). Adversarial examples come from the landed
attacks (``FGSM``, ``PGD``), which run the model in eval mode with frozen parameters and restore it exactly,
so the attack never touches ``.grad`` and never updates BatchNorm statistics.

``compute(model, attack_model, x, y, threat)``: ``model`` is what the loss flows through (possibly a
DistributedDataParallel wrapper); ``attack_model`` is the plain module the attack differentiates. When a method
needs clean and adversarial logits it runs *one* forward on the concatenated batch (one DDP forward per step).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from ..attacks import FGSM, PGD
from ..attacks.base import input_gradient, model_guard
from ..checks import positive_float, positive_int
from ..errors import ConfigError
from ..rng import noise_like
from ..threat import ThreatModel

Forward = Callable[[Tensor], Tensor]  # inputs -> logits: a model, or a model at perturbed weights (AWP)
Objective = Callable[[Forward], Tensor]  # forward -> a method's scalar loss


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


def _mixed_forward(model: Forward, x: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor]:
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


class AdversarialWeightPerturbation:
    """Adversarial weight perturbation (AWP; Wu, Xia & Wang, NeurIPS 2020), layer-wise relative.

    For every weight tensor w_l with more than one dimension (biases and normalisation parameters are left alone,
    as in the paper's code) it finds v_l with ‖v_l‖ ≤ γ·‖w_l‖ that increases the method's own adversarial loss:
    ``steps`` ascent steps v_l ← Π(v_l + η·‖w_l‖·g_l/‖g_l‖), g_l = ∂loss/∂w_l at w + v, η = ``step_size``
    (default γ, so one step lands on the sphere exactly as the paper's one-step setting). The training loss is
    then evaluated at w + v and its gradient applied to w: the paper perturbs, back-propagates, steps and
    subtracts v again; here the forward runs on w + v through ``torch.func.functional_call``, so the stored
    weights never change at all and the optimiser step starts from exactly w. The ascent runs on a copy of the
    buffers, so BatchNorm statistics are updated only by the training forward.
    """

    def __init__(self, gamma: float, *, step_size: float | None = None, steps: int = 1) -> None:
        self.gamma = awp_radius(gamma)
        self.given_step_size = None if step_size is None else positive_float(step_size, "awp_step_size")
        self.steps = positive_int(steps, "awp_steps")

    @property
    def step_size(self) -> float:
        """η: the given one, or γ (one step then lands on the sphere ‖v_l‖ = γ‖w_l‖)."""
        return self.gamma if self.given_step_size is None else self.given_step_size

    def offsets(self, module: nn.Module, objective: Objective) -> dict[int, Tensor]:
        """v per perturbed parameter (keyed by ``id(parameter)``), maximising ``objective(forward)``."""
        weights = {name: p for name, p in module.named_parameters() if p.requires_grad and p.dim() > 1}
        radius = {name: p.detach().norm() for name, p in weights.items()}
        offset = {name: torch.zeros_like(p) for name, p in weights.items()}
        for _ in range(self.steps):
            leaves = {name: (p.detach() + offset[name]).requires_grad_(True) for name, p in weights.items()}
            # the buffers are copies, so the ascent's forwards leave BatchNorm statistics alone
            substitutes = {**{name: b.clone() for name, b in module.named_buffers()}, **leaves}
            with torch.enable_grad():
                loss = objective(functools.partial(_forward_with, module, substitutes))
                grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for name, grad in zip(leaves, grads, strict=True):
                if grad is None or not bool(grad.norm() > 0):
                    continue
                step = offset[name] + self.step_size * radius[name] * grad / grad.norm()
                limit = self.gamma * radius[name]
                offset[name] = step * torch.clamp(limit / step.norm().clamp_min(1e-30), max=1.0)
        return {id(weights[name]): value.detach() for name, value in offset.items()}

    def forward(self, model: nn.Module, attack_model: nn.Module, objective: Objective) -> Forward:
        """A forward through ``model`` at the perturbed weights w + v (gradients flow to w)."""
        offsets = self.offsets(attack_model, objective)

        def perturbed(inputs: Tensor) -> Tensor:
            moved = {name: p + offsets[id(p)] for name, p in model.named_parameters() if id(p) in offsets}
            return functional_call(model, moved, (inputs,))

        return perturbed

    def config(self) -> dict[str, Any]:
        return {"awp_gamma": self.gamma, "awp_step_size": self.given_step_size, "awp_steps": self.steps}


def _forward_with(module: nn.Module, substitutes: dict[str, Tensor], inputs: Tensor) -> Tensor:
    return functional_call(module, substitutes, (inputs,))


def awp_radius(gamma: Any) -> float:
    """γ, the AWP radius relative to each layer's weight norm: a finite number in [0, 1) (0 = off)."""
    value = positive_float(gamma, "awp_gamma", allow_zero=True)
    if value >= 1:
        raise ConfigError(f"awp_gamma: expected a number in [0, 1) (the radius relative to each layer's weight norm; "
                          f"the paper uses 5e-3), got {gamma!r}")
    return value


class WeightPerturbationOption(TrainingMethod):
    """Methods that take ``awp_gamma`` (> 0: train at adversarially perturbed weights; 0: off, bit for bit the
    plain method), ``awp_step_size`` (η, default γ) and ``awp_steps`` (1)."""

    def _init_awp(self, gamma: float, step_size: float | None, steps: int) -> None:
        self.awp = AdversarialWeightPerturbation(gamma, step_size=step_size, steps=steps)

    def awp_state(self) -> dict[str, Any]:
        return self.awp.config()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        awp = {key: state.pop(key) for key in ("awp_gamma", "awp_step_size", "awp_steps") if key in state}
        super().load_state_dict(state)
        if awp:
            self._init_awp(awp.get("awp_gamma", self.awp.gamma), awp.get("awp_step_size", self.awp.given_step_size),
                           awp.get("awp_steps", self.awp.steps))

    def loss_forward(self, model: nn.Module, attack_model: nn.Module, objective: Objective) -> Forward:
        """``model`` itself, or with AWP on the forward at the weights that maximise ``objective``."""
        if self.awp.gamma == 0:
            return model
        return self.awp.forward(model, attack_model, objective)


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
        x_adv = _attack(attack, x, y, threat)
        forward = self.loss_forward(model, attack_model, lambda f: F.cross_entropy(f(x_adv), y))
        logits_adv = forward(x_adv)
        return MethodOutput(F.cross_entropy(logits_adv, y), logits_adv=logits_adv)


class TRADES(WeightPerturbationOption):
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
        self.beta = positive_float(beta, "beta", allow_zero=True)
        self.steps = positive_int(steps, "steps")
        self.step_size = None if step_size is None else positive_float(step_size, "step_size")
        self._init_awp(awp_gamma, awp_step_size, awp_steps)

    def state_dict(self):
        return {"beta": self.beta, "steps": self.steps, "step_size": self.step_size, **self.awp_state()}

    def compute(self, model, attack_model, x, y, threat):
        x_adv = self.maximise_kl(attack_model, x, threat) if threat.eps > 0 else x
        forward = self.loss_forward(model, attack_model, lambda f: self.loss(*_mixed_forward(f, x, x_adv), y)[0])
        logits_clean, logits_adv = _mixed_forward(forward, x, x_adv)
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

            x_adv = threat.project(x + 0.001 * noise_like(x), x)
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
        logits_noisy = model(x + self.sigma * noise_like(x))
        return MethodOutput(F.cross_entropy(logits_noisy, y), logits_adv=logits_noisy)


def _per_sample_input_gradient(forward: Forward, x: Tensor, y: Tensor, *, create_graph: bool) -> tuple[Tensor, Tensor]:
    """(∇ₓ CE_i for every sample i, the logits at x). Samples are independent in eval mode; in train mode a
    BatchNorm layer couples them, and the result is then the gradient of the batch's summed loss."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = forward(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return grad, logits


def _squared_norms(t: Tensor) -> Tensor:
    return t.flatten(1).pow(2).sum(dim=1)


class InputGradientRegularization(TrainingMethod):
    """Input-gradient regularisation, "double backpropagation" (Drucker & LeCun 1992; Ross & Doshi-Velez 2018):
    L = CE(f(x), y) + λ·mean_i ‖∇ₓ CE(f(x_i), y_i)‖².

    The penalty is differentiated through the input gradient (``create_graph=True``: a second backward pass),
    which flattens the loss surface around every training point without generating attacks. No threat model is
    needed. λ (``lam``, default 1.0) sets how flat; tune it to the input scale.
    """

    name = "input-grad-reg"
    needs_threat = False

    def __init__(self, threat: ThreatModel | None = None, *, lam: float = 1.0) -> None:
        super().__init__(threat)
        self.lam = positive_float(lam, "lam", allow_zero=True, hint="the weight λ of the gradient penalty")

    def state_dict(self):
        return {"lam": self.lam}

    def penalty(self, model: Forward, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(mean_i ‖∇ₓ CE_i‖², the logits at x), differentiable in the parameters."""
        grad, logits = _per_sample_input_gradient(model, x, y, create_graph=True)
        return _squared_norms(grad).mean(), logits

    def compute(self, model, attack_model, x, y, threat):
        penalty, logits = self.penalty(model, x, y)
        loss = F.cross_entropy(logits, y) + self.lam * penalty
        return MethodOutput(loss, logits_clean=logits, stats={"grad_penalty": float(penalty.detach())})


class CURE(TrainingMethod):
    """CURE, curvature regularisation (Moosavi-Dezfooli, Fawzi, Uesato & Frossard, CVPR 2019):
    L = CE(f(x), y) + γ·mean_i ‖∇ℓ(x_i + h·z_i) − ∇ℓ(x_i)‖², ℓ = CE, z = sign(∇ℓ(x)) / ‖sign(∇ℓ(x))‖₂.

    The paper's definition: a finite difference of the input gradient along the (normalised) sign of the gradient,
    the direction in which the loss is most curved for an L∞ attacker, squared L2 norm. As in the paper's code z is
    a constant (detached); both gradients are differentiated through (``create_graph=True``), and the point
    x + h·z is not clipped to the pixel box (it measures curvature; it is not an attack). ``h`` defaults to
    ‖δ_FGSM‖₂ of the threat (eps·√d for L∞, so x + h·z is exactly the FGSM point; eps for L2/L1); γ = 4 is the
    paper's code default.
    """

    name = "cure"

    def __init__(self, threat: ThreatModel | None = None, *, gamma: float = 4.0, h: float | None = None) -> None:
        super().__init__(threat)
        self.gamma = positive_float(gamma, "gamma", allow_zero=True,
                                    hint="the weight γ of the curvature penalty; the paper uses 4")
        self.h = None if h is None else positive_float(h, "h")

    def state_dict(self):
        return {"gamma": self.gamma, "h": self.h}

    def step_length(self, x: Tensor, threat: ThreatModel | None) -> float:
        """h: the given one, or the L2 length of the FGSM step of ``threat``."""
        if self.h is not None:
            return self.h
        if threat is None:
            raise ConfigError("h: CURE needs h or a threat model to derive it from")
        return threat.eps * math.sqrt(x[0].numel()) if threat.norm == "linf" else threat.eps

    def penalty(self, model: Forward, x: Tensor, y: Tensor, h: float) -> tuple[Tensor, Tensor]:
        """(mean_i ‖∇ℓ(x_i + h·z_i) − ∇ℓ(x_i)‖², the logits at x), differentiable in the parameters."""
        grad, logits = _per_sample_input_gradient(model, x, y, create_graph=True)
        sign = grad.detach().sign()
        z = sign / sign.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        grad_moved, _ = _per_sample_input_gradient(model, x + h * z, y, create_graph=True)
        return _squared_norms(grad_moved - grad).mean(), logits

    def compute(self, model, attack_model, x, y, threat):
        h = self.step_length(x, threat)
        if threat is not None and threat.eps == 0 and self.h is None:  # eps warm-up at 0: no curvature step yet
            logits = model(x)
            return MethodOutput(F.cross_entropy(logits, y), logits_clean=logits, stats={"curvature": 0.0})
        penalty, logits = self.penalty(model, x, y, h)
        loss = F.cross_entropy(logits, y) + self.gamma * penalty
        return MethodOutput(loss, logits_clean=logits, stats={"curvature": float(penalty.detach())})


class GradAlign(TrainingMethod):
    """GradAlign (Andriushchenko & Flammarion, NeurIPS 2020): fast FGSM training plus the gradient-alignment
    penalty L = CE(f(x_fgsm), y) + λ·mean_i (1 − cos(∇ₓℓ(x_i), ∇ₓℓ(x_i + η_i))), η uniform in the eps-ball.

    It keeps the loss locally linear inside the ball, which is what stops FGSM training from catastrophic
    overfitting without multi-step attacks. As in the paper's code the gradient at x is a constant (no second-order
    term) and the one at x + η is differentiated through. The FGSM point is fast FGSM's (uniform random start,
    step ``step_factor``·eps, 1.25 by default); the paper's own setting is ``random_start=False, step_factor=1.0``.
    λ = 0.2 is the paper's value for CIFAR-10 at eps 8/255 (it grows with eps).
    """

    name = "gradalign"

    def __init__(self, threat: ThreatModel | None = None, *, lam: float = 0.2, step_factor: float = 1.25,
                 random_start: bool = True) -> None:
        super().__init__(threat)
        self.lam = positive_float(lam, "lam", allow_zero=True,
                                  hint="the weight λ of the alignment penalty; the paper uses 0.2")
        self.step_factor = positive_float(step_factor, "step_factor")
        self.random_start = bool(random_start)

    def state_dict(self):
        return {"lam": self.lam, "step_factor": self.step_factor, "random_start": self.random_start}

    def penalty(self, model: Forward, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
        """mean_i (1 − cos(∇ₓℓ(x_i), ∇ₓℓ(x_i + η_i))), differentiable in the parameters through the second gradient."""
        grad, _ = _per_sample_input_gradient(model, x, y, create_graph=False)
        grad_moved, _ = _per_sample_input_gradient(model, threat.random_start(x), y, create_graph=True)
        cosine = F.cosine_similarity(grad.detach().flatten(1), grad_moved.flatten(1), dim=1)
        return (1 - cosine).mean()

    def compute(self, model, attack_model, x, y, threat):
        attack = FGSM(attack_model, threat, random_start=self.random_start, step_size=self.step_factor * threat.eps) \
            if threat.eps > 0 else None
        x_adv = _attack(attack, x, y, threat)
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv, y)
        if threat.eps == 0 or self.lam == 0:
            return MethodOutput(loss, logits_adv=logits_adv)
        penalty = self.penalty(model, x, y, threat)
        return MethodOutput(loss + self.lam * penalty, logits_adv=logits_adv,
                            stats={"misalignment": float(penalty.detach())})


class MART(WeightPerturbationOption):
    """MART, misclassification-aware adversarial training (Wang et al., ICLR 2020):
    L = BCE(p(x'), y) + β·mean_i KL(p(x_i) ‖ p(x'_i))·(1 − p_y(x_i)),
    BCE(p, y) = −log p_y − log(1 − max_{k≠y} p_k), x' from PGD on CE (random start, ``steps`` (10) steps of
    ``step_size`` (eps/4), loss maximised).

    The KL term weighs each sample by how wrong the clean prediction is, so misclassified clean points count
    more. β = 6 is the paper's default; the 1e-12 guards inside the logarithms are the paper's code's.
    ``awp_gamma`` > 0 adds adversarial weight perturbation (AWP-MART, Wu et al. 2020).
    """

    name = "mart"

    def __init__(self, threat: ThreatModel | None = None, *, beta: float = 6.0, steps: int = 10,
                 step_size: float | None = None, awp_gamma: float = 0.0, awp_step_size: float | None = None,
                 awp_steps: int = 1) -> None:
        super().__init__(threat)
        self.beta = positive_float(beta, "beta", allow_zero=True, hint="the weight β of the KL term; the paper uses 6")
        self.steps = positive_int(steps, "steps")
        self.step_size = None if step_size is None else positive_float(step_size, "step_size")
        self._init_awp(awp_gamma, awp_step_size, awp_steps)

    def state_dict(self):
        return {"beta": self.beta, "steps": self.steps, "step_size": self.step_size, **self.awp_state()}

    def compute(self, model, attack_model, x, y, threat):
        attack = None
        if threat.eps > 0:
            step_size = self.step_size if self.step_size is not None else threat.eps / 4
            attack = PGD(attack_model, threat, steps=self.steps, step_size=step_size, early_stop=False)
        x_adv = _attack(attack, x, y, threat)
        forward = self.loss_forward(model, attack_model, lambda f: self.loss(*_mixed_forward(f, x, x_adv), y)[0])
        logits_clean, logits_adv = _mixed_forward(forward, x, x_adv)
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


def _attack(attack, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
    """Adversarial batch from ``attack`` (clean batch when eps is 0, e.g. at the start of an eps warm-up)."""
    if attack is None or threat.eps <= 0:
        return x
    return attack(x, y).detach()


METHODS: dict[str, type[TrainingMethod]] = {
    cls.name: cls for cls in (Standard, FGSMAT, FastFGSM, PGDAT, TRADES, Gaussian, InputGradientRegularization, CURE,
                              GradAlign, MART)
}


def get_method(name: str | TrainingMethod, threat: ThreatModel | None = None, **kwargs) -> TrainingMethod:
    """A method by name, one of ``METHODS`` ("standard", "fgsm", "fgsm-rs", "pgd", "trades", "gaussian",
    "input-grad-reg", "cure", "gradalign", "mart"); an instance passes through."""
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
