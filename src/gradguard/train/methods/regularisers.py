"""Methods that put the input gradient into the loss: input-gradient regularisation (Drucker & LeCun 1992; Ross &
Doshi-Velez 2018), CURE (Moosavi-Dezfooli et al. 2019) and GradAlign (Andriushchenko & Flammarion 2020).

Their penalties are differentiated through the input gradient (``create_graph=True``), a second backward pass;
every input gradient here comes from the library's one primitive, ``input_gradient``.
"""
from __future__ import annotations

import math

from torch import Tensor
from torch.nn import functional as F

from ...attacks import FGSM
from ...attacks.losses import cross_entropy
from ...checks import positive_float
from ...core.gradient import input_gradient
from ...errors import ConfigError
from ...threat import ThreatModel
from .base import Forward, MethodOutput, TrainingMethod, adversarial_batch


def _input_gradient_with_graph(forward: Forward, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(∇ₓ CE_i for every sample i, the logits at x), both differentiable in the parameters: the primitive with
    ``create_graph=True`` (double backpropagation). Samples are independent in eval mode; in train mode a
    BatchNorm layer couples them, and the result is then the gradient of the batch's summed loss."""
    grad, logits, _ = input_gradient(forward, x, y, cross_entropy, False, create_graph=True, checked=False)
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
        grad, logits = _input_gradient_with_graph(model, x, y)
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
        grad, logits = _input_gradient_with_graph(model, x, y)
        sign = grad.detach().sign()
        z = sign / sign.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        grad_moved, _ = _input_gradient_with_graph(model, x + h * z, y)
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
    single_step = False  # one FGSM step, but the alignment penalty is what keeps it from overfitting catastrophically

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
        grad, _, _ = input_gradient(model, x, y, cross_entropy, False)
        grad_moved, _ = _input_gradient_with_graph(model, threat.random_start(x), y)
        cosine = F.cosine_similarity(grad.detach().flatten(1), grad_moved.flatten(1), dim=1)
        return (1 - cosine).mean()

    def compute(self, model, attack_model, x, y, threat):
        attack = FGSM(attack_model, threat, random_start=self.random_start, step_size=self.step_factor * threat.eps) \
            if threat.eps > 0 else None
        x_adv = adversarial_batch(attack, x, y, threat)
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv, y)
        if threat.eps == 0 or self.lam == 0:
            return MethodOutput(loss, logits_adv=logits_adv)
        penalty = self.penalty(model, x, y, threat)
        return MethodOutput(loss + self.lam * penalty, logits_adv=logits_adv,
                            stats={"misalignment": float(penalty.detach())})
