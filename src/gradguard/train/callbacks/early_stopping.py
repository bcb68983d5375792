"""Robust early stopping as a callback (Rice, Wong & Kolter 2020): remember the evaluated weights of the epoch with
the best validation robust accuracy, keep them in checkpoints, and install them at the end of ``fit``."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ...models import unwrap
from .base import TrainCallback, TrainerLike

EARLY_STOPS = ("robust", None)


class RobustEarlyStopping(TrainCallback):
    """Tracks the best ``val_robust_acc``; its weights are checkpointed as ``best.*`` and restored by ``fit``."""

    def __init__(self) -> None:
        self.best: dict | None = None  # {"epoch", "val_robust_acc", "val_clean_acc"} of the best epoch so far
        self.best_state: dict[str, Tensor] | None = None
        self.device: Any = None

    def setup(self, trainer: TrainerLike) -> None:
        self.device = trainer.device

    def on_validation_end(self, trainer: TrainerLike, epoch: int, metrics: dict) -> None:
        """Robust early stopping: remember the evaluated weights of the epoch with the best val robust accuracy."""
        if "val_robust_acc" not in metrics:
            return
        if self.best is None or metrics["val_robust_acc"] > self.best["val_robust_acc"]:
            self.best = {"epoch": epoch, "val_robust_acc": metrics["val_robust_acc"],
                         "val_clean_acc": metrics.get("val_clean_acc")}
            self.best_state = {key: value.detach().clone() for key, value in unwrap(trainer.model).state_dict().items()}
        metrics["best_epoch"] = self.best["epoch"]

    def install_final_weights(self, trainer: TrainerLike, record: dict) -> int | None:
        if self.best_state is None or self.best is None:
            return None
        unwrap(trainer.model).load_state_dict(self.best_state)
        record["early_stop"] = {"criterion": "val_robust_acc", "restored_epoch": self.best["epoch"],
                                "val_robust_acc": self.best["val_robust_acc"],
                                "val_clean_acc": self.best["val_clean_acc"]}
        return int(self.best["epoch"])

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"best.{key}": value for key, value in (self.best_state or {}).items()}
        return tensors, {"best": self.best}

    def load_state_dict(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        self.best = state.get("best")
        if self.best is not None:
            self.best_state = {key[len("best."):]: value.to(self.device) for key, value in tensors.items()
                               if key.startswith("best.")}
