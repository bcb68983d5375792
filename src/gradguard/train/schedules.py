"""What changes over the steps of a run, and how it starts: the learning-rate and eps schedules, the optimiser,
and the seeding of every global RNG."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from ..threat import ThreatModel

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cyclic", "piecewise")
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}


def lr_at(step: int, *, lr: float, schedule: str, total_steps: int, steps_per_epoch: int, epochs: int,
          lr_scale: float) -> float:
    """The learning rate of ``step``: "constant", "cyclic" (one-cycle triangle 0 → lr at 40 % → 0) or
    "piecewise" (×0.1 at 50 % and 75 % of the epochs), times the guard's ``lr_scale``."""
    if schedule == "constant":
        factor = 1.0
    elif schedule == "cyclic":
        t = (step + 1) / total_steps
        factor = t / 0.4 if t <= 0.4 else max(0.0, (1 - t) / 0.6)
    else:
        epoch = step / steps_per_epoch
        factor = 1.0 if epoch < 0.5 * epochs else 0.1 if epoch < 0.75 * epochs else 0.01
    return lr * factor * lr_scale


def threat_at(threat: ThreatModel | None, step: int, *, eps_warmup_epochs: float,
              steps_per_epoch: int) -> ThreatModel | None:
    """The threat of ``step``: eps ramps linearly from 0 to ``threat.eps`` over ``eps_warmup_epochs``."""
    if threat is None or eps_warmup_epochs == 0:
        return threat
    fraction = min(1.0, (step + 1) / (eps_warmup_epochs * steps_per_epoch))
    if fraction == 1.0:
        return threat
    # below the full eps, which is checked for units: no second check (a warning) at every step of the ramp
    return threat.with_eps(threat.eps * fraction, check_eps=False)


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float) -> torch.optim.Optimizer:
    """"sgd" (with ``momentum``) or "adam" over the parameters that require gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)
