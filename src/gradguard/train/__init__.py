"""Hardening: adversarial training with one loop and pluggable methods (see docs/train.md)."""
from .checkpoint import latest_checkpoint, read_checkpoint
from .methods import (
    CURE,
    FGSMAT,
    MART,
    METHODS,
    PGDAT,
    TRADES,
    AdversarialWeightPerturbation,
    FastFGSM,
    Gaussian,
    GradAlign,
    InputGradientRegularization,
    MethodOutput,
    Standard,
    TrainingMethod,
    get_method,
)
from .trainer import GuardSettings, Trainer, WeightAverage, final_evaluation

__all__ = [
    "Trainer", "GuardSettings", "final_evaluation", "TrainingMethod", "MethodOutput", "Standard", "FGSMAT",
    "FastFGSM", "PGDAT", "TRADES", "Gaussian", "InputGradientRegularization", "CURE", "GradAlign", "MART",
    "AdversarialWeightPerturbation", "WeightAverage", "METHODS", "get_method", "latest_checkpoint", "read_checkpoint",
]
