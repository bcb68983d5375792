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

One family per file: ``base`` (the contract, ``Standard``), ``adversarial`` (FGSM-AT, fast FGSM, PGD-AT),
``trades``, ``mart``, ``tradeoff`` (the settings those two share), ``awp`` (the weight perturbation option),
``regularisers`` (input-gradient regularisation, CURE, GradAlign) and ``noise`` (Gaussian). A new method is one file
here plus one line in ``METHODS``.
"""
from __future__ import annotations

from ...errors import ConfigError
from ...threat import ThreatModel
from .adversarial import FGSMAT, PGDAT, FastFGSM
from .awp import AdversarialWeightPerturbation, WeightPerturbationOption, awp_radius
from .base import Forward, MethodOutput, Objective, Standard, TrainingMethod
from .mart import MART
from .noise import Gaussian
from .regularisers import CURE, GradAlign, InputGradientRegularization
from .trades import TRADES

__all__ = [
    "Forward", "Objective", "MethodOutput", "TrainingMethod", "Standard", "FGSMAT", "FastFGSM", "PGDAT", "TRADES",
    "Gaussian", "InputGradientRegularization", "CURE", "GradAlign", "MART", "AdversarialWeightPerturbation",
    "WeightPerturbationOption", "awp_radius", "METHODS", "get_method",
]

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
