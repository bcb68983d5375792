"""Adversarial attacks. Each takes a model and a ``ThreatModel``; ``attack(x, y)`` returns adversarial inputs."""
from .apgd import APGD, APGDT, apgd_checkpoints
from .base import Attack, AttackResult, BestIterate, Iterate, input_gradient, model_guard
from .bim import BIM
from .bpda import BPDA
from .cw import CW
from .deepfool import DeepFool
from .fab import FAB
from .fgsm import FGSM
from .losses import cross_entropy, dlr, margin
from .mifgsm import MIFGSM
from .pgd import PGD
from .square import Square, square_p_schedule
from .transfer import Transfer

__all__ = [
    "Attack", "AttackResult", "BestIterate", "Iterate", "input_gradient", "model_guard",
    "FGSM", "BIM", "PGD", "MIFGSM", "cross_entropy", "dlr", "margin",
    "APGD", "APGDT", "CW", "DeepFool", "FAB", "Square", "apgd_checkpoints", "square_p_schedule", "BPDA", "Transfer",
]
