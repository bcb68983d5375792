"""The Trainer's settings: each keyword argument checked once (``TrainOptions._check_options``) and recorded as the
resolved configuration that ``config.json`` holds and ``resume`` compares (``RESUME_KEYS``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..checks import positive_float, positive_int
from ..errors import ConfigError
from ..models import model_spec
from ..threat import ThreatModel
from .batches import n_samples
from .schedules import DEFAULT_LR, OPTIMIZERS, SCHEDULES
from .validation import VAL_ATTACKS

# Settings that must match for ``resume=True`` to continue the same run.
RESUME_KEYS = ("model", "method", "threat", "epochs", "batch_size", "optimizer", "lr", "momentum", "schedule",
               "eps_warmup_epochs", "clip_grad_value", "clip_grad_norm", "loss_weight", "l2", "l2_exclude", "seed",
               "ema_decay", "early_stop")


class TrainOptions:
    """The validated settings as attributes (the base of ``Trainer``, which adds the method, the CO guard, weight
    averaging and early stopping, whose checks need the method)."""

    def _check_options(self, *, threat: ThreatModel | None, epochs: int, batch_size: int, optimizer: str,
                       lr: float | None, momentum: float, schedule: str, eps_warmup_epochs: float,
                       clip_grad_value: float | None, clip_grad_norm: float | None, loss_weight: float, l2: float,
                       l2_exclude: Sequence[str], run_dir: str | Path | None, seed: int, resume: bool,
                       progress: bool, monitor: Any, val_attack: str | None, val_max_samples: int,
                       final_suite: str | list | None) -> None:
        self.epochs = positive_int(epochs, "epochs")
        self.batch_size = positive_int(batch_size, "batch_size")
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
        self.optimizer_name = optimizer
        self.lr = DEFAULT_LR[optimizer] if lr is None else positive_float(lr, "lr")
        self.momentum = positive_float(momentum, "momentum", allow_zero=True)
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
        self.schedule = schedule
        self.eps_warmup_epochs = positive_float(eps_warmup_epochs, "eps_warmup_epochs", allow_zero=True)
        self.clip_grad_value = None if clip_grad_value is None else positive_float(clip_grad_value, "clip_grad_value")
        self.clip_grad_norm = None if clip_grad_norm is None else positive_float(clip_grad_norm, "clip_grad_norm")
        self.loss_weight = positive_float(loss_weight, "loss_weight")
        self.l2 = positive_float(l2, "l2", allow_zero=True)
        self.l2_exclude = tuple(l2_exclude)
        unknown = set(self.l2_exclude) - {"bias", "norm"}
        if unknown:
            raise ConfigError(f"l2_exclude: expected a subset of ('bias', 'norm'), got {tuple(l2_exclude)!r}")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if resume and self.run_dir is None:
            raise ConfigError("resume: needs run_dir, the directory of the run to continue")
        self.seed = int(seed)
        self.resume = bool(resume)
        self.progress = bool(progress)
        self.monitor = monitor
        if monitor is not None and not callable(getattr(monitor, "step", None)):
            raise ConfigError("monitor: expected an object with a step() method, e.g. GradientMonitor(model)")
        if val_attack not in VAL_ATTACKS:
            raise ConfigError(f"val_attack: expected one of {VAL_ATTACKS}, got {val_attack!r}")
        if val_attack is not None and threat is None:
            val_attack = None
        self.val_attack = val_attack
        self.val_max_samples = positive_int(val_max_samples, "val_max_samples")
        self.final_suite = final_suite


def resolved_config(trainer: Any) -> dict:
    """What config.json records about a run of ``trainer`` (a Trainer whose fit has set up data and devices)."""
    return {
        "model": model_spec(trainer.model), "method": trainer.method.config(),
        "threat": trainer.threat.to_dict() if trainer.threat is not None else None, "epochs": trainer.epochs,
        "batch_size": trainer.batch_size, "optimizer": trainer.optimizer_name, "lr": trainer.lr,
        "momentum": trainer.momentum,
        "schedule": trainer.schedule, "eps_warmup_epochs": trainer.eps_warmup_epochs,
        "clip_grad_value": trainer.clip_grad_value, "clip_grad_norm": trainer.clip_grad_norm,
        "loss_weight": trainer.loss_weight, "l2": trainer.l2, "l2_exclude": list(trainer.l2_exclude),
        "seed": trainer.seed,
        "val_attack": trainer.val_attack, "val_max_samples": trainer.val_max_samples,
        "final_suite": trainer.final_suite, "co_guard": trainer.co_guard, "guard": vars(trainer.guard),
        "ema_decay": trainer.ema_decay, "early_stop": trainer.early_stop,
        "world_size": trainer.world_size, "device": str(trainer.device), "steps_per_epoch": trainer.steps_per_epoch,
        "n_train": n_samples(trainer.train_data), "metadata": trainer.metadata,
        "versions": {"torch": torch.__version__},
    }
