"""Hardening: adversarial training with one loop and pluggable methods (see docs/train.md)."""
from .checkpoint import latest_checkpoint, read_checkpoint
from .methods import (
    FGSMAT,
    METHODS,
    PGDAT,
    TRADES,
    FastFGSM,
    Gaussian,
    MethodOutput,
    Standard,
    TrainingMethod,
    get_method,
)
from .trainer import GuardSettings, Trainer, final_evaluation

__all__ = [
    "Trainer", "GuardSettings", "final_evaluation", "TrainingMethod", "MethodOutput", "Standard", "FGSMAT",
    "FastFGSM", "PGDAT", "TRADES", "Gaussian", "METHODS", "get_method", "latest_checkpoint", "read_checkpoint",
]
