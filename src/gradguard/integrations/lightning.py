"""GradientMonitor as a Lightning callback (pip install gradguard[lightning]).

    trainer = lightning.pytorch.Trainer(callbacks=[GradientHealthCallback(every=10, on_finding="stop")])

Why steps are counted in ``on_train_batch_end`` and not by the optimiser's step hooks: Lightning runs the
training step, ``zero_grad`` and ``backward`` as a *closure inside* ``optimizer.step(closure)``, so a step
pre-hook fires before this step's gradients exist (it would read the previous step's). After the step, in
``on_train_batch_end``, the gradients are this step's, as the optimiser applied them (after Lightning's gradient
clipping), and the weights are updated; they are zeroed only at the next closure. A batch counts when
``trainer.global_step`` advanced, so gradient accumulation counts one step per optimiser step.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..layout import GRADFLOW_FILE
from ..runtime.distributed import group_initialized
from . import optional_dependency
from .base import GradientHealthBase, OnFinding

with optional_dependency("lightning", extra="lightning", user=__name__):
    import lightning.pytorch as pl

__all__ = ["GradientHealthCallback"]


class GradientHealthCallback(GradientHealthBase, pl.Callback):
    """Watch a LightningModule's gradient health during ``trainer.fit``.

    Args:
        every: sample one optimiser step in ``every``.
        path: ``gradflow.jsonl`` (default: ``<trainer.log_dir or default_root_dir>/gradflow.jsonl``);
            ``diagnosis.json`` (the findings, and the stop if there was one) is written beside it at the end of
            the fit, by global rank 0.
        on_finding: None, "warn", "stop" or a callable (see ``GradientMonitor``). "stop" turns a fatal finding
            (non-finite loss or gradients, exploding gradients) into ``trainer.should_stop = True`` and a logged
            warning: the fit ends after the current batch, without a traceback. (Lightning honours
            ``should_stop`` only once ``min_steps``/``min_epochs`` are reached.)
        tensorboard: True streams the records into the trainer's ``TensorBoardLogger`` (else event files beside
            gradflow.jsonl); or a log directory / ``SummaryWriter``.

    The monitor is attached in ``on_train_start`` (after a checkpoint is restored, so a resumed fit numbers its
    records from ``trainer.global_step`` and appends to gradflow.jsonl) and detached at the end of the fit, or
    when it fails. ``.monitor`` is the ``GradientMonitor``, ``.findings`` its findings, ``.stopped`` the
    ``TrainingStopped`` that ended the fit (or None). Under DDP every rank runs the monitor (statistics are
    combined across ranks) and the stop decision is shared; only rank 0 writes files.
    """

    def __init__(self, every: int = 10, path: str | os.PathLike | None = None, on_finding: OnFinding = None,
                 tensorboard: bool | str | os.PathLike | Any = False):
        super().__init__(every=every, path=path, on_finding=on_finding, tensorboard=tensorboard)
        self._last_global_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: every rank calls it
        path = self.path if self.path is not None else Path(run_dir) / GRADFLOW_FILE
        distributed = trainer.world_size > 1 and group_initialized()
        writer = None
        if self.tensorboard is True and trainer.is_global_zero:
            writer = next((logger.experiment for logger in trainer.loggers
                           if isinstance(logger, pl.loggers.TensorBoardLogger)), None)
        self._last_global_step = trainer.global_step
        self._start(pl_module, path, is_main=trainer.is_global_zero, distributed=distributed,
                    start_step=trainer.global_step, writer=writer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.monitor is None or not self.monitor.attached or trainer.global_step == self._last_global_step:
            return  # no optimiser step in this batch (accumulating, or training_step returned None)
        self._last_global_step = trainer.global_step
        if self._step(outputs):
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish()  # close the file and remove the hooks; diagnosis.json still tells what was seen
