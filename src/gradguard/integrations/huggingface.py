"""GradientMonitor as a Hugging Face ``transformers.Trainer`` callback (pip install gradguard[huggingface]).

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[GradientHealthCallback(every=10, on_finding="stop")])

Steps are counted in ``on_optimizer_step`` (transformers >= 4.42): it runs right after ``optimizer.step()`` and
before ``model.zero_grad()``, so the monitor reads this step's gradients as the optimiser applied them (after the
Trainer's ``max_grad_norm`` clipping). ``on_step_end`` comes after ``zero_grad``, with no gradients left. The
loss: ``on_log`` sees it only every ``logging_steps`` (averaged), so a forward hook on the model keeps the loss
of each training forward (the model's ``outputs["loss"]``, as Trainer.compute_loss reads it); a model that
returns no loss (a custom ``compute_loss``) is monitored without it (NaN is then caught in the gradients).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..layout import GRADFLOW_FILE
from ..runtime.distributed import group_initialized
from . import optional_dependency
from .base import GradientHealthBase, OnFinding, loss_scalar

with optional_dependency("transformers", extra="huggingface", user=__name__):
    import transformers

__all__ = ["GradientHealthCallback"]


class GradientHealthCallback(GradientHealthBase, transformers.TrainerCallback):
    """Watch a model's gradient health during ``transformers.Trainer.train``.

    Args:
        every: sample one optimiser step in ``every``.
        path: ``gradflow.jsonl`` (default: ``<args.output_dir>/gradflow.jsonl``); ``diagnosis.json`` (the
            findings, and the stop if there was one) is written beside it in ``on_train_end``, by the main process.
        on_finding: None, "warn", "stop" or a callable (see ``GradientMonitor``). "stop" turns a fatal finding
            (non-finite loss or gradients, exploding gradients) into ``control.should_training_stop = True`` and
            a logged warning: training ends after the current step, without a traceback.
        tensorboard: True writes TensorBoard event files beside gradflow.jsonl (``tensorboard --logdir
            OUTPUT_DIR`` then shows them next to the Trainer's own ``runs/``); or a log directory /
            ``SummaryWriter``.

    ``.monitor`` is the ``GradientMonitor``, ``.findings`` its findings, ``.stopped`` the ``TrainingStopped``
    that ended training (or None). Under DDP every rank runs the monitor (statistics are combined across ranks)
    and the stop decision is shared; only the main process writes files.
    """

    def __init__(self, every: int = 10, path: str | os.PathLike | None = None, on_finding: OnFinding = None,
                 tensorboard: bool | str | os.PathLike | Any = False):
        super().__init__(every=every, path=path, on_finding=on_finding, tensorboard=tensorboard)
        self._loss: Tensor | None = None
        self._loss_hook: Any = None

    def on_train_begin(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
                       control: transformers.TrainerControl, model: nn.Module | None = None, **kwargs: Any) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model: the Trainer handed on_train_begin no torch model (got {type(model).__name__}); "
                             "GradientHealthCallback needs Trainer(model=...) to be a torch.nn.Module")
        path = self.path if self.path is not None else Path(args.output_dir or ".") / GRADFLOW_FILE
        distributed = args.world_size > 1 and group_initialized()
        self._remove_loss_hook()
        self._start(model, path, is_main=state.is_world_process_zero, distributed=distributed,
                    start_step=state.global_step)
        self._loss = None
        self._loss_hook = model.register_forward_hook(self._keep_loss)

    def _keep_loss(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Keep the loss of the latest training forward (no sync: the tensor stays on its device)."""
        if module.training and torch.is_grad_enabled():
            loss = loss_scalar(output)
            if isinstance(loss, Tensor):
                self._loss = loss

    def on_optimizer_step(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
                          control: transformers.TrainerControl, **kwargs: Any) -> None:
        loss, self._loss = self._loss, None
        if self._step(loss):
            control.should_training_stop = True

    def on_train_end(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
                     control: transformers.TrainerControl, **kwargs: Any) -> None:
        self._remove_loss_hook()
        self._finish()

    def _remove_loss_hook(self) -> None:
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
