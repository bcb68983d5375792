"""The training-loop callback protocol: the hooks ``Trainer.fit`` dispatches and the state a callback keeps in a
checkpoint (Lightning's ``Callback`` habit). Every optional behaviour of the loop (weight averaging, robust early
stopping, the catastrophic-overfitting guard, the monitor, run-directory writing) is one subclass, so the loop
only dispatches and a new behaviour is one new file."""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

from torch import Tensor

# The gradguard.train.Trainer running the loop; not imported, since the trainer imports its callbacks.
TrainerLike = Any


class TrainCallback:
    """No-op hooks, called by ``Trainer.fit`` in the order of ``trainer.callbacks`` (see each hook for when)."""

    def setup(self, trainer: TrainerLike) -> None:
        """The optimiser and resolved config exist; the run directory is not read yet (resume comes next)."""

    def on_fit_start(self, trainer: TrainerLike) -> None:
        """The model is wrapped for training (DDP under torchrun); the first epoch is next."""

    def on_train_epoch_start(self, trainer: TrainerLike, epoch: int) -> None:
        """Epoch ``epoch`` (0-based) starts, also when it is run again after a rollback."""

    def on_batch_end(self, trainer: TrainerLike, objective: Tensor, y: Tensor) -> None:
        """After every optimiser step; may raise ``TrainingStopped``."""

    def on_train_epoch_end(self, trainer: TrainerLike, epoch: int, metrics: dict) -> bool:
        """The epoch's training is done, before validation; True: it was rolled back, run it again."""
        return False

    def evaluated_weights(self, trainer: TrainerLike) -> ContextManager[None]:
        """A context in which the model holds the weights that are validated and saved."""
        return contextlib.nullcontext()

    def on_validation_end(self, trainer: TrainerLike, epoch: int, metrics: dict) -> None:
        """Epoch ``epoch`` (1-based) is validated; called inside ``evaluated_weights``."""

    def on_epoch_end(self, trainer: TrainerLike, epoch: int, metrics: dict, step_log: list[dict]) -> None:
        """Epoch ``epoch`` (1-based) is complete and in ``trainer.history``."""

    def on_event(self, trainer: TrainerLike, event: dict) -> None:
        """An event (a rollback, a stop) was logged on the main process."""

    def on_metrics(self, trainer: TrainerLike) -> None:
        """``trainer.history`` changed after an epoch's end (a stop, the final evaluation)."""

    def install_final_weights(self, trainer: TrainerLike, record: dict) -> int | None:
        """End of fit: load this callback's final weights into the model and note the choice in ``record``;
        the epoch they come from, or None when this callback has none (the next one is asked)."""
        return None

    def on_final_weights(self, trainer: TrainerLike, epoch: int) -> None:
        """The model holds its final weights, those of epoch ``epoch``."""

    def model_metadata(self) -> dict:
        """Extra fields for the saved model's sidecar (and the final history record)."""
        return {}

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, JSON state) to keep in a checkpoint; the tensors' names carry this callback's prefix."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Restore from a checkpoint's (tensors, state) on resume."""
