"""The monitor as a callback: anything with ``step()`` (a ``GradientMonitor``) is stepped after every optimiser
step, so the loop holds no ``isinstance`` switch of its own."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ...diagnostics.gradflow import GradientMonitor
from .base import TrainCallback, TrainerLike


class MonitorCallback(TrainCallback):
    """Steps ``monitor`` after every optimiser step; a ``GradientMonitor`` gets the objective and the targets, and
    under DDP it combines its activation statistics over the ranks (its records read as one process's)."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def on_fit_start(self, trainer: TrainerLike) -> None:
        if trainer.train_model is not trainer.logits_model and hasattr(self.monitor, "distributed"):
            self.monitor.distributed = True  # combine activation statistics over ranks: records as one process

    def on_batch_end(self, trainer: TrainerLike, objective: Tensor, y: Tensor) -> None:
        if isinstance(self.monitor, GradientMonitor):
            self.monitor.step(objective.detach(), targets=y)
        else:
            self.monitor.step()
