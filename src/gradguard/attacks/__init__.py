"""Adversarial attacks. Each takes a model and a ``ThreatModel``; ``attack(x, y)`` returns adversarial inputs."""
from .base import Attack, AttackResult, BestIterate, Iterate, input_gradient, model_guard
from .bim import BIM
from .fgsm import FGSM
from .losses import cross_entropy, dlr, margin
from .mifgsm import MIFGSM
from .pgd import PGD

__all__ = [
    "Attack", "AttackResult", "BestIterate", "Iterate", "input_gradient", "model_guard",
    "FGSM", "BIM", "PGD", "MIFGSM", "cross_entropy", "dlr", "margin",
]
