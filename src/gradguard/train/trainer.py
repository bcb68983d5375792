"""The training loop: one loop for every method, with the gradient controls, checkpoints, resume and DDP.

Per step it minimises exactly J = a·L + r·‖θ‖² (a = ``loss_weight``, L = the method's batch loss,
r = ``l2``, θ = the parameters not excluded by ``l2_exclude``), logs the pre-clip global gradient norm, then
clips element-wise (``clip_grad_value``) and by global norm (``clip_grad_norm``, Pascanu et al. 2013) before
the optimiser step. Weight decay is never hidden inside the optimiser, so the objective is what it says.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import operator
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Sized

import numpy as np
import torch
from torch import Tensor, nn

from ..attacks import FGSM, PGD
from ..attacks.base import model_guard
from ..checks import as_labels, check_inputs, positive_float, positive_int
from ..diagnostics.gradflow import GradientMonitor, TrainingStopped
from ..errors import CheckpointError, ConfigError, InputError, ResumeMismatchError, describe_changes
from ..io import atomic_write_json, atomic_write_text
from ..models import as_logits_model, model_spec, state_tensors, unwrap
from ..models import save as save_model
from ..rng import per_sample_generators
from ..threat import Linf, ThreatModel
from . import distributed
from .checkpoint import (
    capture_rng,
    flatten_optimizer,
    latest_checkpoint,
    restore_rng,
    save_checkpoint,
    unflatten_optimizer,
)
from .methods import TrainingMethod, get_method

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cyclic", "piecewise")
VAL_ATTACKS = ("pgd", "fgsm", None)
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
               nn.InstanceNorm2d, nn.InstanceNorm3d, nn.SyncBatchNorm)
# Settings that must match for ``resume=True`` to continue the same run.
RESUME_KEYS = ("model", "method", "threat", "epochs", "batch_size", "optimizer", "lr", "momentum", "schedule",
               "eps_warmup_epochs", "clip_grad_value", "clip_grad_norm", "loss_weight", "l2", "l2_exclude", "seed",
               "ema_decay", "early_stop")
EARLY_STOPS = ("robust", None)


@dataclass
class GuardSettings:
    """Catastrophic-overfitting detector (Wong et al. 2020, Sec. 5): after every epoch, PGD and FGSM accuracy
    on a fixed training batch. A collapse is PGD accuracy below ``ratio`` × the last good epoch's (when that
    was at least ``min_reference``), or PGD accuracy < ``floor`` while FGSM accuracy > ``fgsm_high`` (the sudden
    kind), or FGSM accuracy above PGD accuracy by more than ``max_gap`` (the slow kind: the model learns to defeat
    the single-step attack while multi-step robustness falls; Andriushchenko & Flammarion 2020). None disables
    a rule."""

    samples: int = 256
    pgd_steps: int = 10
    ratio: float | None = 0.3
    min_reference: float = 0.1
    floor: float | None = 0.05
    fgsm_high: float = 0.5
    max_gap: float | None = 0.12

    def collapsed(self, pgd_acc: float, fgsm_acc: float, reference: float | None) -> str | None:
        """The rule that fired (as text), or None."""
        if self.ratio is not None and reference is not None and reference >= self.min_reference \
                and pgd_acc < self.ratio * reference:
            return f"PGD accuracy {pgd_acc:.3f} < {self.ratio:g} × last good {reference:.3f}"
        if self.floor is not None and pgd_acc < self.floor and fgsm_acc > self.fgsm_high:
            return f"PGD accuracy {pgd_acc:.3f} < {self.floor:g} while FGSM accuracy {fgsm_acc:.3f} > {self.fgsm_high:g}"
        if self.max_gap is not None and fgsm_acc - pgd_acc > self.max_gap:
            return f"FGSM accuracy {fgsm_acc:.3f} exceeds PGD accuracy {pgd_acc:.3f} by more than {self.max_gap:g}"
        return None


class WeightAverage:
    """Exponential moving average of a model's weights (Polyak averaging; as used for robust models by
    Gowal et al. 2020): after every optimiser step each floating-point parameter's shadow becomes
    d·shadow + (1 − d)·θ, and buffers (BatchNorm running statistics, counters) are copied as they are."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.parameter_names = {name for name, _ in model.named_parameters()}
        self.shadow = {key: value.detach().clone() for key, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            if key in self.parameter_names and value.dtype.is_floating_point:
                self.shadow[key].mul_(self.decay).add_(value, alpha=1 - self.decay)
            else:
                self.shadow[key].copy_(value)


def ema_decay_value(value: Any) -> float | None:
    """The EMA decay: None (off) or a number strictly between 0 and 1."""
    if value is None:
        return None
    try:
        decay = float(value)
    except (TypeError, ValueError):
        decay = math.nan
    if not 0 < decay < 1:  # also rejects NaN
        raise ConfigError(f"ema_decay: expected a number in (0, 1) such as 0.999 (or None for no averaging), "
                          f"got {value!r}")
    return decay


class Trainer:
    """Train ``model`` with a method: a name from ``METHODS`` ("standard", "fgsm", "fgsm-rs", "pgd", "trades",
    "gaussian", "input-grad-reg", "cure", "gradalign", "mart") or a ``TrainingMethod``.

    Args (all keyword except model/method):
        threat: the ThreatModel to train against (needed by every method but "standard").
        epochs, batch_size: the global batch size; under torchrun each process takes an equal slice.
        optimizer: "sgd" (with ``momentum``) or "adam"; ``lr`` defaults to 0.1 (sgd) / 1e-3 (adam) and is the
            peak for ``schedule="cyclic"`` (one-cycle triangle 0 → lr at 40 % → 0, as in fast AT) and the start for
            "piecewise" (×0.1 at 50 % and 75 % of the epochs).
        eps_warmup_epochs: eps ramps linearly from 0 to threat.eps over this many epochs.
        clip_grad_value / clip_grad_norm: element-wise and global-norm gradient clipping.
        loss_weight, l2, l2_exclude: the objective J = loss_weight·L + l2·‖θ‖², excluding parameters named
            "bias" and those of normalisation layers ("norm") by default.
        run_dir: where config.json, metrics.jsonl, steps.jsonl, model.safetensors/json and checkpoint/ go.
        seed: fixes data order, attack random starts and initial RNG states.
        resume: continue the run in ``run_dir`` from its newest valid checkpoint.
        monitor: anything with ``.step()`` (e.g. GradientMonitor), called after every optimiser step.
        val_attack: "pgd" (PGD-10) or "fgsm" for the per-epoch validation robust accuracy, or None.
        val_max_samples: validation subset size per epoch (the first N samples).
        final_suite: e.g. "standard": evaluate the final model with gradguard.evaluation.evaluate.
        co_guard: catastrophic-overfitting guard; "auto" enables it for the single-step methods "fgsm" and "fgsm-rs".
        ema_decay: keep an exponential moving average of the weights with this decay (e.g. 0.999); validation,
            model.safetensors and the model left in ``model`` after ``fit`` are the averaged weights.
        early_stop: "robust" keeps the epoch with the best validation robust accuracy (Rice, Wong & Kolter 2020)
            and restores it at the end of ``fit`` (needs validation data and ``val_attack``).
        method_kwargs: options for a method given by name (e.g. {"beta": 6.0} for TRADES).
        metadata: extra fields for model.json (e.g. {"dataset": "fashion-mnist"}).
        on_epoch_end: callback(metrics_dict) after each epoch's checkpoint is written.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | TrainingMethod = "standard",
        *,
        threat: ThreatModel | None = None,
        epochs: int = 10,
        batch_size: int = 128,
        optimizer: str = "sgd",
        lr: float | None = None,
        momentum: float = 0.9,
        schedule: str = "constant",
        eps_warmup_epochs: float = 0,
        clip_grad_value: float | None = None,
        clip_grad_norm: float | None = None,
        loss_weight: float = 1.0,
        l2: float = 0.0,
        l2_exclude: Sequence[str] = ("bias", "norm"),
        run_dir: str | Path | None = None,
        seed: int = 0,
        resume: bool = False,
        progress: bool = True,
        monitor: Any = None,
        val_attack: str | None = "pgd",
        val_max_samples: int = 1000,
        final_suite: str | list | None = None,
        co_guard: bool | str = "auto",
        guard: GuardSettings | None = None,
        method_kwargs: dict | None = None,
        metadata: dict | None = None,
        on_epoch_end: Callable[[dict], None] | None = None,
        device: str | torch.device | None = None,
        ema_decay: float | None = None,
        early_stop: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if threat is not None and not isinstance(threat, ThreatModel):
            raise ConfigError(f"threat: expected a ThreatModel such as Linf(eps=0.1), got {type(threat).__name__}")
        self.model = model
        # what training passes run: the model's logits, also for a dict / tuple / ModelOutput (models.Logits)
        self.logits_model = as_logits_model(model)
        self.threat = threat
        self.method = get_method(method, threat, **(method_kwargs or {}))
        if self.method.threat is None:
            self.method.threat = threat
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
        if co_guard not in ("auto", True, False):
            raise ConfigError(f"co_guard: expected 'auto', True or False, got {co_guard!r}")
        self.co_guard = self.method.single_step if co_guard == "auto" else bool(co_guard)
        if self.co_guard and threat is None:
            raise ConfigError("co_guard: needs a threat model to measure PGD accuracy against")
        self.guard = guard or GuardSettings()
        self.ema_decay = ema_decay_value(ema_decay)
        if early_stop not in EARLY_STOPS:
            raise ConfigError(f"early_stop: expected 'robust' (keep the best validation robust accuracy) or None, "
                              f"got {early_stop!r}")
        if early_stop is not None and val_attack is None:
            raise ConfigError("early_stop: 'robust' needs a val_attack and a threat model to measure robust accuracy")
        self.early_stop = early_stop
        self.ema: WeightAverage | None = None
        self.best: dict | None = None  # {"epoch", "val_robust_acc", "val_clean_acc"} of the best epoch so far
        self.best_state: dict[str, Tensor] | None = None
        self.metadata = dict(metadata or {})
        self.on_epoch_end = on_epoch_end
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.history: list[dict] = []
        self.events: list[dict] = []
        self.lr_scale = 1.0
        self.global_step = 0

    # ------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------
    def fit(self, train, val=None) -> list[dict]:
        """Train for ``epochs``; ``train``/``val``: an (x, y) tuple of tensors, a DataLoader, or a gradguard
        ``Dataset`` (its test split then validates). Returns the per-epoch metric dicts."""
        if hasattr(train, "x_train") and hasattr(train, "y_train"):
            if val is None:
                val = (train.x_test, train.y_test)
            self.metadata.setdefault("dataset", getattr(train, "name", None))
            train = (train.x_train, train.y_train)
        self.rank, self.world_size = distributed.setup(self.device)
        self.is_main = self.rank == 0
        self.model.to(self.device)
        self._seed_everything(self.seed + self.rank)
        self.train_data = self._as_data(train, "train")
        self.val_data = self._as_data(val, "val") if val is not None else None
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = self.epochs * self.steps_per_epoch
        self.optimizer = self._build_optimizer()
        if self.early_stop is not None and self.val_data is None:
            raise ConfigError("early_stop: 'robust' needs validation data; pass val to fit() or a gradguard Dataset")
        self.config = self._resolved_config()
        self.ema = WeightAverage(unwrap(self.model), self.ema_decay) if self.ema_decay is not None else None
        start_epoch = self._prepare_run_dir()
        self.train_model = self.logits_model
        if distributed.is_distributed():
            self.train_model = nn.parallel.DistributedDataParallel(
                self.logits_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.train_model is not self.logits_model and hasattr(self.monitor, "distributed"):
            self.monitor.distributed = True  # combine activation statistics over ranks: records as one process
        self.guard_batch = self._guard_batch() if self.co_guard else None
        last_good = self._snapshot()
        epoch = start_epoch
        self.stopped: dict | None = None
        while epoch < self.epochs:
            started = time.perf_counter()
            self.global_step = epoch * self.steps_per_epoch
            try:
                train_stats, step_log = self._train_epoch(epoch)
            except TrainingStopped as stop:
                self._stop(epoch, stop)
                break
            metrics = {"epoch": epoch + 1, **train_stats}
            if self.guard_batch is not None:  # set exactly when the guard (co_guard) is on
                probe = self._probe_overfitting(self.guard_batch)
                metrics["guard"] = probe
                if probe["collapsed"]:
                    action = self._handle_collapse(epoch, probe, last_good)
                    if action is not None:
                        continue  # rolled back: run the same epoch again with the safer setting
            with self._evaluated_weights():
                metrics.update(self._validate())
                self._track_best(epoch + 1, metrics)
            metrics["time_s"] = round(time.perf_counter() - started, 3)
            self.history.append(metrics)
            epoch += 1
            self._end_of_epoch(epoch, metrics, step_log)
            last_good = self._snapshot()
        self.train_model = self.logits_model  # drop the DDP wrapper: it holds the process group (see teardown)
        if self.stopped is not None:
            distributed.barrier()
            return self.history
        self._install_final_weights()
        final = self._final_evaluation()
        if final is not None and self.history:
            self.history[-1]["final"] = final
            self._write_metrics()
        distributed.barrier()
        return self.history

    # ------------------------------------------------------------------------------------------------
    # One epoch
    # ------------------------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> tuple[dict, list[dict]]:
        self.train_model.train()
        totals = torch.zeros(8, dtype=torch.float64)  # loss·n, objective·n, n, clean ok, clean n, adv ok, adv n, steps
        grad_norms: list[float] = []
        step_log: list[dict] = []
        batches = self._train_batches(epoch)
        bar = None
        if self.progress and self.is_main:
            from ..runtime.progress import progress_bar

            bar = progress_bar(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}")
        for x, y, share, indices in batches:
            lr, threat = self._lr_at(self.global_step), self._threat_at(self.global_step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            # Random starts and noise keyed by (seed, epoch, sample): the same draws on 1 or N processes.
            with (per_sample_generators(self.seed, epoch, indices) if indices is not None
                  else contextlib.nullcontext()):
                output = self.method.compute(self.train_model, self.logits_model, x, y, threat)
            objective = self.loss_weight * output.loss + (self.l2 * self.l2_penalty() if self.l2 > 0 else 0.0)
            (objective * share).backward()
            grad_norm = self._clip_gradients()
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(unwrap(self.model))
            if isinstance(self.monitor, GradientMonitor):
                self.monitor.step(objective.detach(), targets=y)
            elif self.monitor is not None:
                self.monitor.step()
            n = y.shape[0]
            clean_logits = output.logits_clean if output.logits_clean is not None else self._clean_logits(x)
            totals += torch.tensor([float(output.loss.detach()) * n, float(objective.detach()) * n, n,
                                    float((clean_logits.argmax(1) == y).sum()), n,
                                    float((output.logits_adv.argmax(1) == y).sum()) if output.logits_adv is not None else 0.0,
                                    n if output.logits_adv is not None else 0, 1], dtype=torch.float64)
            grad_norms.append(grad_norm)
            step_log.append({"step": self.global_step, "epoch": epoch + 1, "loss": float(output.loss.detach()),
                             "objective": float(objective.detach()), "grad_norm": grad_norm, "lr": lr,
                             "eps": threat.eps if threat is not None else None, **output.stats})
            self.global_step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{totals[0] / totals[2]:.3f}", clean=f"{totals[3] / totals[4]:.3f}",
                                robust=f"{totals[5] / totals[6]:.3f}" if totals[6] else "-")
        if bar is not None:
            bar.close()
        totals = distributed.all_reduce_sum(totals)
        norms = torch.tensor(grad_norms, dtype=torch.float64)
        stats = {
            "lr": step_log[-1]["lr"] if step_log else None,
            "eps": step_log[-1]["eps"] if step_log else None,
            "train_loss": float(totals[0] / totals[2]),
            "train_objective": float(totals[1] / totals[2]),
            "train_clean_acc": float(totals[3] / totals[4]),
            "train_robust_acc": float(totals[5] / totals[6]) if totals[6] else None,
            "grad_norm_mean": float(norms.mean()) if len(norms) else None,
            "grad_norm_max": float(norms.max()) if len(norms) else None,
        }
        return stats, step_log

    def l2_penalty(self) -> Tensor:
        """‖θ‖² over the regularised parameters (see ``l2_exclude``)."""
        squares = [(p * p).sum() for p in self.regularised_parameters()]
        if not squares:  # every parameter is excluded
            return torch.zeros((), device=self.device)
        return functools.reduce(operator.add, squares)  # summed left to right, as sum() does

    def regularised_parameters(self) -> list[nn.Parameter]:
        excluded: set[int] = set()
        for module in unwrap(self.model).modules():
            if "norm" in self.l2_exclude and isinstance(module, NORM_LAYERS):
                excluded.update(id(p) for p in module.parameters(recurse=False))
        params = []
        for name, p in unwrap(self.model).named_parameters():
            if id(p) in excluded or ("bias" in self.l2_exclude and name.split(".")[-1] == "bias"):
                continue
            params.append(p)
        return params

    def _clip_gradients(self) -> float:
        """Return the pre-clip global gradient L2 norm, then clip by value and by global norm."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if self.clip_grad_value is not None:
            for g in grads:
                g.clamp_(-self.clip_grad_value, self.clip_grad_value)
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                           self.clip_grad_norm)
        return norm

    @torch.no_grad()
    def _clean_logits(self, x: Tensor) -> Tensor:
        """Clean logits for the accuracy display when a method trains on adversarial points only (eval mode,
        so BatchNorm statistics stay untouched)."""
        with model_guard(self.model):
            return self.logits_model(x)

    # ------------------------------------------------------------------------------------------------
    # Schedules
    # ------------------------------------------------------------------------------------------------
    def _lr_at(self, step: int) -> float:
        if self.schedule == "constant":
            factor = 1.0
        elif self.schedule == "cyclic":
            t = (step + 1) / self.total_steps
            factor = t / 0.4 if t <= 0.4 else max(0.0, (1 - t) / 0.6)
        else:
            epoch = step / self.steps_per_epoch
            factor = 1.0 if epoch < 0.5 * self.epochs else 0.1 if epoch < 0.75 * self.epochs else 0.01
        return self.lr * factor * self.lr_scale

    def _threat_at(self, step: int) -> ThreatModel | None:
        if self.threat is None or self.eps_warmup_epochs == 0:
            return self.threat
        fraction = min(1.0, (step + 1) / (self.eps_warmup_epochs * self.steps_per_epoch))
        if fraction == 1.0:
            return self.threat
        # below the full eps, which is checked for units: no second check (a warning) at every step of the ramp
        return self.threat.with_eps(self.threat.eps * fraction, check_eps=False)

    # ------------------------------------------------------------------------------------------------
    # Data
    # ------------------------------------------------------------------------------------------------
    def _as_data(self, data, argument: str):
        if isinstance(data, torch.utils.data.DataLoader):
            return data
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise InputError(f"{argument}: expected an (x, y) tuple of tensors, a DataLoader or a gradguard Dataset, "
                             f"got {type(data).__name__}")
        x, y = data
        # Without a threat model any finite range is fine; with one, data must lie in its bounds (attacks check).
        x = check_inputs(x, self.threat if self.threat is not None else Linf(0.0, bounds=(-1e30, 1e30)), f"{argument}[0]")
        y = as_labels(y, x.shape[0], f"{argument}[1]")
        if x.shape[0] == 0:
            raise InputError(f"{argument}: is empty; pass at least one sample")
        return x, y

    def _steps_per_epoch(self) -> int:
        if isinstance(self.train_data, torch.utils.data.DataLoader):
            return len(self._distributed_loader(0)) if distributed.is_distributed() else len(self.train_data)
        return math.ceil(self.train_data[1].shape[0] / self.batch_size)

    def _train_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor, float, Tensor | None]]:
        """(x, y, share, indices) per step; ``share`` rescales this process's mean loss so that DDP's gradient
        average equals the gradient of the mean loss over the whole global batch (exact also for ragged last
        batches); ``indices`` are the samples' positions in the training tensors (None for a DataLoader)."""
        if isinstance(self.train_data, torch.utils.data.DataLoader):
            loader = self._distributed_loader(epoch) if distributed.is_distributed() else self.train_data
            for x, y in loader:
                yield x.to(self.device), y.to(self.device), 1.0, None
            return
        x_all, y_all = self.train_data
        order = torch.randperm(y_all.shape[0], generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            if self.world_size > 1:
                if len(batch) < self.world_size:  # pad like DistributedSampler so every process gets a sample
                    batch = torch.cat([batch, order[: self.world_size - len(batch)]])
                global_size = len(batch)
                batch = batch[self.rank::self.world_size]
                share = len(batch) * self.world_size / global_size
            else:
                share = 1.0
            yield x_all[batch].to(self.device), y_all[batch].to(self.device), share, batch

    def _distributed_loader(self, epoch: int):
        from torch.utils.data import DataLoader, DistributedSampler

        loader = self.train_data
        sampler: DistributedSampler[int] = DistributedSampler(loader.dataset, num_replicas=self.world_size,
                                                              rank=self.rank, shuffle=True, seed=self.seed)
        sampler.set_epoch(epoch)
        per_process = max(1, (loader.batch_size or self.batch_size) // self.world_size)
        return DataLoader(loader.dataset, batch_size=per_process, sampler=sampler, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn)

    def _first_samples(self, data, limit: int) -> tuple[Tensor, Tensor]:
        if isinstance(data, torch.utils.data.DataLoader):
            xs: list[Tensor] = []
            ys: list[Tensor] = []
            count = 0
            for x, y in data:
                xs.append(x)
                ys.append(y)
                count += y.shape[0]
                if count >= limit:
                    break
            return torch.cat(xs)[:limit].to(self.device), torch.cat(ys)[:limit].to(self.device)
        return data[0][:limit].to(self.device), data[1][:limit].to(self.device)

    # ------------------------------------------------------------------------------------------------
    # Validation and the final evaluation
    # ------------------------------------------------------------------------------------------------
    def _validate(self) -> dict:
        if self.val_data is None:
            return {}
        x, y = self._first_samples(self.val_data, self.val_max_samples)
        x, y = x[self.rank::self.world_size], y[self.rank::self.world_size]
        counts = torch.zeros(3, dtype=torch.float64)
        attack = self._val_attack_instance()
        for start in range(0, y.shape[0], 500):
            xb, yb = x[start:start + 500], y[start:start + 500]
            counts[0] += float((self._clean_logits(xb).argmax(1) == yb).sum())
            if attack is not None:
                counts[1] += float(attack.run(xb, yb).correct.sum())
            counts[2] += yb.shape[0]
        counts = distributed.all_reduce_sum(counts)
        result: dict[str, float | str] = {"val_clean_acc": float(counts[0] / counts[2])}
        if attack is not None:
            result["val_robust_acc"] = float(counts[1] / counts[2])
            result["val_attack"] = "pgd-10" if self.val_attack == "pgd" else "fgsm"
        return result

    def _val_attack_instance(self):
        if self.val_attack is None or self.threat is None or self.threat.eps == 0:  # no threat: no val_attack
            return None
        if self.val_attack == "pgd":
            return PGD(self.model, self.threat, steps=10, seed=self.seed)
        return FGSM(self.model, self.threat)

    def _final_evaluation(self) -> dict | None:
        if self.final_suite is None or self.val_data is None or self.threat is None:
            return None
        # Every rank calls evaluate with the full data (it shards the work itself); rank 0 writes the file.
        x, y = self._first_samples(self.val_data, 10 ** 9)
        result = final_evaluation(self.model, (x, y), self.threat, self.final_suite, seed=self.seed,
                                  run_dir=self.run_dir if self.is_main else None)
        distributed.barrier()
        return result

    # ------------------------------------------------------------------------------------------------
    # Weight averaging and robust early stopping
    # ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _evaluated_weights(self) -> Iterator[None]:
        """Inside: the model holds the weights that are validated and saved (the EMA's, when on); after: the
        training weights again, exactly."""
        if self.ema is None:
            yield
            return
        module = unwrap(self.model)
        live = {key: value.detach().clone() for key, value in module.state_dict().items()}
        module.load_state_dict(self.ema.shadow)
        try:
            yield
        finally:
            module.load_state_dict(live)

    def _track_best(self, epoch: int, metrics: dict) -> None:
        """Robust early stopping: remember the evaluated weights of the epoch with the best val robust accuracy."""
        if self.early_stop is None or "val_robust_acc" not in metrics:
            return
        if self.best is None or metrics["val_robust_acc"] > self.best["val_robust_acc"]:
            self.best = {"epoch": epoch, "val_robust_acc": metrics["val_robust_acc"],
                         "val_clean_acc": metrics.get("val_clean_acc")}
            self.best_state = {key: value.detach().clone() for key, value in unwrap(self.model).state_dict().items()}
        metrics["best_epoch"] = self.best["epoch"]

    def _install_final_weights(self) -> None:
        """End of fit: the best epoch's weights (early_stop) or the averaged ones (EMA) become the model's and
        the saved model's; the choice is recorded in the last history entry."""
        module = unwrap(self.model)
        if self.early_stop is not None and self.best_state is not None and self.best is not None:
            module.load_state_dict(self.best_state)
            record: dict[str, Any] = {"early_stop": {"criterion": "val_robust_acc", "restored_epoch": self.best["epoch"],
                                                     "val_robust_acc": self.best["val_robust_acc"],
                                                     "val_clean_acc": self.best["val_clean_acc"]}}
            epoch = self.best["epoch"]
        elif self.ema is not None:
            module.load_state_dict(self.ema.shadow)
            record, epoch = {}, len(self.history)
        else:
            return
        if self.ema is not None:
            record["weights"] = f"ema (decay {self.ema.decay:g})"
        if self.history:
            self.history[-1].update(record)
        if self.is_main and self.run_dir is not None and self.history:
            save_model(self.model, self.run_dir, **self._model_metadata(epoch))
            self._write_metrics()
        distributed.barrier()

    # ------------------------------------------------------------------------------------------------
    # Catastrophic-overfitting guard
    # ------------------------------------------------------------------------------------------------
    def _guard_batch(self) -> tuple[Tensor, Tensor]:
        return self._first_samples(self.train_data, self.guard.samples)

    def _probe_overfitting(self, batch: tuple[Tensor, Tensor]) -> dict:
        """PGD and FGSM accuracy of the current model on the fixed training batch; decide collapse."""
        pgd_acc, fgsm_acc = self.measure_guard_accuracies(*batch)
        reference = self._guard_reference()
        rule = self.guard.collapsed(pgd_acc, fgsm_acc, reference)
        collapsed = distributed.broadcast_flag(rule is not None)
        return {"pgd_acc": pgd_acc, "fgsm_acc": fgsm_acc, "reference": reference, "collapsed": collapsed,
                "rule": rule}

    def measure_guard_accuracies(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        """(PGD accuracy, FGSM accuracy) on (x, y) — the guard's probe; override to inject measurements."""
        if self.threat is None:
            raise ConfigError("threat: the overfitting guard attacks the model, so it needs a threat model")
        pgd = PGD(self.model, self.threat, steps=self.guard.pgd_steps, seed=self.seed)
        fgsm = FGSM(self.model, self.threat)
        return pgd.run(x, y).accuracy, fgsm.run(x, y).accuracy

    def _guard_reference(self) -> float | None:
        for metrics in reversed(self.history):
            if "guard" in metrics:
                return metrics["guard"]["pgd_acc"]
        return None

    def _handle_collapse(self, epoch: int, probe: dict, last_good: dict) -> str | None:
        action = self.method.make_safer()
        event = {"event": "catastrophic_overfitting", "epoch": epoch + 1, **probe}
        if action is None:
            event["action"] = "none left: keeping the current model"
            self._log_event(event)
            return None
        self._restore_snapshot(last_good)
        self.lr_scale *= 0.5
        event["action"] = f"rolled back to the end of epoch {epoch}; {action}; learning rate halved " \
                          f"(scale {self.lr_scale:g})"
        event["method"] = self.method.state_dict()
        self._log_event(event)
        return event["action"]

    def _stop(self, epoch: int, stop: TrainingStopped) -> None:
        """The monitor's on_finding="stop" fired: end training, keep what was saved, record why."""
        finding = stop.finding
        kept = (f"the model saved at the end of epoch {epoch} is kept" if self.run_dir is not None and epoch > 0
                else "nothing was saved" if self.run_dir is not None else "the model holds the weights of the stop")
        self.stopped = {"event": "stopped", "epoch": epoch + 1, "step": self.global_step,
                        "rule": f"GradientMonitor: {finding.kind} in {finding.layer}",
                        "action": f"training stopped ({finding.kind}); {kept}", "finding": finding.to_dict()}
        self._log_event(self.stopped)
        if self.is_main and self.run_dir is not None and self.history:
            self._write_metrics()

    def _log_event(self, event: dict) -> None:
        self.events.append(event)
        if self.is_main:
            warnings.warn(f"gradguard.Trainer: {event['event']} at epoch {event['epoch']} "
                          f"({event.get('rule')}): {event['action']}",
                          stacklevel=3)
            if self.run_dir is not None:
                with open(self.run_dir / "events.jsonl", "a") as handle:
                    handle.write(json.dumps(event) + "\n")

    def _snapshot(self) -> dict:
        """In-memory copy of the model and optimiser state (the guard's rollback point)."""
        if not self.co_guard:
            return {}
        return {"model": copy.deepcopy(unwrap(self.model).state_dict()),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "ema": copy.deepcopy(self.ema.shadow) if self.ema is not None else None}

    def _restore_snapshot(self, snapshot: dict) -> None:
        unwrap(self.model).load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
        if self.ema is not None and snapshot.get("ema") is not None:
            self.ema.shadow = copy.deepcopy(snapshot["ema"])

    # ------------------------------------------------------------------------------------------------
    # Run directory, checkpoints, resume
    # ------------------------------------------------------------------------------------------------
    def _resolved_config(self) -> dict:
        return {
            "model": model_spec(self.model), "method": self.method.config(),
            "threat": self.threat.to_dict() if self.threat is not None else None, "epochs": self.epochs,
            "batch_size": self.batch_size, "optimizer": self.optimizer_name, "lr": self.lr, "momentum": self.momentum,
            "schedule": self.schedule, "eps_warmup_epochs": self.eps_warmup_epochs,
            "clip_grad_value": self.clip_grad_value, "clip_grad_norm": self.clip_grad_norm,
            "loss_weight": self.loss_weight, "l2": self.l2, "l2_exclude": list(self.l2_exclude), "seed": self.seed,
            "val_attack": self.val_attack, "val_max_samples": self.val_max_samples,
            "final_suite": self.final_suite, "co_guard": self.co_guard, "guard": vars(self.guard),
            "ema_decay": self.ema_decay, "early_stop": self.early_stop,
            "world_size": self.world_size, "device": str(self.device), "steps_per_epoch": self.steps_per_epoch,
            "n_train": self._n_samples(self.train_data), "metadata": self.metadata,
            "versions": {"torch": torch.__version__},
        }

    @staticmethod
    def _n_samples(data) -> int | None:
        if isinstance(data, torch.utils.data.DataLoader):
            if not isinstance(data.dataset, Sized):  # an iterable dataset has no length
                return None
            try:
                return len(data.dataset)
            except TypeError:  # a __len__ that refuses, e.g. a chain of iterable datasets
                return None
        return int(data[1].shape[0])

    def _prepare_run_dir(self) -> int:
        """Write config.json, or restore from the newest checkpoint when resuming; returns the start epoch."""
        if self.run_dir is None:
            return 0
        checkpoint_dir = self.run_dir / "checkpoint"
        found = latest_checkpoint(checkpoint_dir) if self.resume else None
        if not self.resume and any(checkpoint_dir.glob("epoch-*.json")):
            raise ConfigError(f"run_dir: {str(self.run_dir)!r} already holds a run; pass resume=True to continue it "
                              "or choose a new directory")
        if found is None:
            if self.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.run_dir / "config.json", self.config)
            distributed.barrier()
            return 0
        tensors, state = found
        self._check_resume_config(self.run_dir)
        model_state = {key[len("model."):]: value for key, value in tensors.items() if key.startswith("model.")}
        unwrap(self.model).load_state_dict(model_state)
        self.optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer"]))
        restore_rng(tensors, state["rng"])
        self.method.load_state_dict(state["method"])
        if self.ema is not None:
            self.ema.shadow = {key[len("ema."):]: value.to(self.device) for key, value in tensors.items()
                               if key.startswith("ema.")}
        self.best = state.get("best")
        if self.best is not None:
            self.best_state = {key[len("best."):]: value.to(self.device) for key, value in tensors.items()
                               if key.startswith("best.")}
        self.history, self.events = state["history"], state.get("events", [])
        self.lr_scale = state["lr_scale"]
        if self.is_main:
            self._truncate_steps_log(self.run_dir, state["epoch"] * self.steps_per_epoch)
            self._write_metrics()
        distributed.barrier()
        return int(state["epoch"])

    def _check_resume_config(self, run_dir: Path) -> None:
        path = run_dir / "config.json"
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"run_dir: cannot read {str(path)!r} to resume ({error})") from None
        current = json.loads(json.dumps(self.config, default=str))
        different = [key for key in RESUME_KEYS if key != "method" and stored.get(key) != current.get(key)]
        if stored.get("method", {}).get("name") != current["method"]["name"]:
            different.append("method")
        if different:
            changes = {key: (stored.get(key), current.get(key)) for key in different}
            raise ResumeMismatchError(f"resume: the run in {str(run_dir)!r} was trained with other settings "
                                      f"({describe_changes(changes)}); resume with the recorded settings, or train "
                                      "into a new run_dir", changes, where=str(run_dir))

    def _end_of_epoch(self, epoch: int, metrics: dict, step_log: list[dict]) -> None:
        if self.is_main and self.run_dir is not None:
            with open(self.run_dir / "steps.jsonl", "a") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in step_log)
            self._write_metrics()
            with self._evaluated_weights():
                save_model(self.model, self.run_dir, **self._model_metadata(epoch))
            self._save_checkpoint(self.run_dir, epoch)
        distributed.barrier()
        if self.on_epoch_end is not None:
            self.on_epoch_end(metrics)

    def _save_checkpoint(self, run_dir: Path, epoch: int) -> None:
        optimizer_tensors, optimizer_meta = flatten_optimizer(self.optimizer.state_dict())
        rng_tensors, rng_meta = capture_rng()
        tensors = {f"model.{key}": value for key, value in state_tensors(self.model).items()}
        tensors.update(optimizer_tensors)
        tensors.update(rng_tensors)
        if self.ema is not None:
            tensors.update({f"ema.{key}": value for key, value in self.ema.shadow.items()})
        if self.best_state is not None:
            tensors.update({f"best.{key}": value for key, value in self.best_state.items()})
        state = {"epoch": epoch, "optimizer": optimizer_meta, "rng": rng_meta, "method": self.method.state_dict(),
                 "history": self.history, "events": self.events, "lr_scale": self.lr_scale, "best": self.best}
        save_checkpoint(run_dir / "checkpoint", epoch, tensors, state)

    def _model_metadata(self, epoch: int) -> dict:
        metrics = self.history[epoch - 1] if 0 < epoch <= len(self.history) else None
        averaged = {"weights": f"ema (decay {self.ema.decay:g})"} if self.ema is not None else {}
        return {"dataset": self.metadata.get("dataset"), "threat": self.config["threat"],
                "method": self.method.config(), "epoch": epoch, "metrics": metrics, **averaged,
                **{k: v for k, v in self.metadata.items() if k != "dataset"}}

    def _write_metrics(self) -> None:
        if self.is_main and self.run_dir is not None:
            atomic_write_text(self.run_dir / "metrics.jsonl",
                              "".join(json.dumps(record, default=str) + "\n" for record in self.history))

    def _truncate_steps_log(self, run_dir: Path, steps_done: int) -> None:
        path = run_dir / "steps.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < steps_done:
                    kept.append(line + "\n")
            except (ValueError, KeyError):
                continue  # a line cut short by the crash
        atomic_write_text(path, "".join(kept))

    # ------------------------------------------------------------------------------------------------
    # Setup helpers
    # ------------------------------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        return torch.optim.Adam(params, lr=self.lr)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)


def final_evaluation(model: nn.Module, data: tuple[Tensor, Tensor], threat: ThreatModel, suite, *, seed: int = 0,
                     run_dir: Path | None = None) -> dict:
    """Evaluate with ``gradguard.evaluation.evaluate`` (writes robustness.json into ``run_dir``); if the evaluation
    package is not available, fall back to PGD-50 with 5 restarts and say so in the result."""
    note = "gradguard.evaluation.evaluate not available"
    try:
        from ..evaluation import evaluate
    except ImportError:
        pass
    else:
        try:
            report = evaluate(model, data, threat, suite=suite, seed=seed)
        except ConfigError as error:  # e.g. a suite attack missing from this installation
            note = f"suite {suite!r} could not run: {error}"
            warnings.warn(f"final_suite: {note}; falling back to PGD-50 x 5 restarts", stacklevel=2)
        else:
            if run_dir is not None:
                report.to_json(run_dir / "robustness.json")
            return {"suite": suite, "attacks_run": list(report.suite), "clean_acc": report.clean_accuracy,
                    "robust_acc": report.robust_accuracy, "per_attack": report.per_attack,
                    "n_samples": report.n_samples}
    x, y = data
    with model_guard(model), torch.no_grad():
        clean = float((as_logits_model(model)(x).argmax(1) == y).float().mean())
    result = PGD(model, threat, steps=50, restarts=5, seed=seed).run(x, y)
    return {"suite": f"pgd-50x5 (fallback: {note})", "clean_acc": clean,
            "robust_acc": result.accuracy, "n_samples": int(y.shape[0])}


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
