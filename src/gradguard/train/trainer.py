"""The training loop: one loop for every method, with the gradient controls, checkpoints, resume and DDP.

Per step it minimises exactly J = a·L + r·‖θ‖² (a = ``loss_weight``, L = the method's batch loss,
r = ``l2``, θ = the parameters not excluded by ``l2_exclude``), logs the pre-clip global gradient norm, then
clips element-wise (``clip_grad_value``) and by global norm (``clip_grad_norm``, Pascanu et al. 2013) before
the optimiser step. Weight decay is never hidden inside the optimiser, so the objective is what it says.
"""
from __future__ import annotations

import contextlib
import copy
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..diagnostics.gradflow import TrainingStopped
from ..errors import ConfigError, InputError
from ..models import as_logits_model, unwrap
from ..rng import per_sample_generators
from ..runtime import distributed
from ..threat import ThreatModel
from .batches import as_data, first_samples, model_device, steps_per_epoch, train_batches
from .callbacks import TrainCallback
from .callbacks.averaging import WeightAverage, WeightAveraging, ema_decay_value
from .callbacks.early_stopping import EARLY_STOPS, RobustEarlyStopping
from .callbacks.guard import GuardSettings, OverfittingGuard, guard_accuracies
from .callbacks.monitor import MonitorCallback
from .methods import TrainingMethod, get_method
from .objective import NORM_LAYERS, clip_gradients, l2_penalty, regularised_parameters  # noqa: F401
from .options import RESUME_KEYS, TrainOptions, resolved_config  # noqa: F401  (RESUME_KEYS: re-exported)
from .persistence import RunDirWriter
from .schedules import build_optimizer, lr_at, seed_everything, threat_at
from .validation import clean_logits, final_evaluation, validate


class Trainer(TrainOptions):
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
        self._check_options(
            threat=threat, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum,
            schedule=schedule, eps_warmup_epochs=eps_warmup_epochs, clip_grad_value=clip_grad_value,
            clip_grad_norm=clip_grad_norm, loss_weight=loss_weight, l2=l2, l2_exclude=l2_exclude, run_dir=run_dir,
            seed=seed, resume=resume, progress=progress, monitor=monitor, val_attack=val_attack,
            val_max_samples=val_max_samples, final_suite=final_suite)
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
        if early_stop is not None and self.val_attack is None:
            raise ConfigError("early_stop: 'robust' needs a val_attack and a threat model to measure robust accuracy")
        self.early_stop = early_stop
        self.metadata = dict(metadata or {})
        self.on_epoch_end = on_epoch_end
        self.device = torch.device(device) if device is not None else model_device(model)
        self.history: list[dict] = []
        self.events: list[dict] = []
        self.lr_scale = 1.0
        self.global_step = 0
        # the loop's optional behaviours, dispatched in this order (see callbacks/base.py for the hooks)
        self.callbacks: list[TrainCallback] = []
        if early_stop is not None:
            self.callbacks.append(RobustEarlyStopping())  # first: its best epoch wins the final weights
        if self.ema_decay is not None:
            self.callbacks.append(WeightAveraging(self.ema_decay))
        if monitor is not None:
            self.callbacks.append(MonitorCallback(monitor))
        if self.co_guard:
            self.callbacks.append(OverfittingGuard(self.guard))
        if self.run_dir is not None:
            self.callbacks.append(RunDirWriter(self.run_dir, self.resume))  # last: resume restores the others

    # ------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------
    @property
    def ema(self) -> WeightAverage | None:
        """The moving average of the weights (``ema_decay``) once ``fit`` has begun; None without averaging."""
        return next((c.average for c in self.callbacks if isinstance(c, WeightAveraging)), None)

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
        seed_everything(self.seed + self.rank)
        self.train_data = as_data(train, "train", self.threat)
        self.val_data = as_data(val, "val", self.threat) if val is not None else None
        self.steps_per_epoch = steps_per_epoch(self.train_data, batch_size=self.batch_size, seed=self.seed,
                                               rank=self.rank, world_size=self.world_size)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(self.model, self.optimizer_name, self.lr, self.momentum)
        if self.early_stop is not None and self.val_data is None:
            raise ConfigError("early_stop: 'robust' needs validation data; pass val to fit() or a gradguard Dataset")
        self.config = resolved_config(self)
        self.start_epoch = 0  # a resumed run's RunDirWriter sets it at setup
        self._dispatch("setup")
        start_epoch = self.start_epoch
        self.train_model = self.logits_model
        if distributed.is_distributed():
            self.train_model = nn.parallel.DistributedDataParallel(
                self.logits_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._dispatch("on_fit_start")
        epoch = start_epoch
        self.stopped: dict | None = None
        while epoch < self.epochs:
            started = time.perf_counter()
            self.global_step = epoch * self.steps_per_epoch
            self._dispatch("on_train_epoch_start", epoch)
            try:
                train_stats, step_log = self._train_epoch(epoch)
            except TrainingStopped as stop:
                self._stop(epoch, stop)
                break
            metrics = {"epoch": epoch + 1, **train_stats}
            rolled_back = False
            for callback in self.callbacks:  # the guard's warnings point here (stacklevel)
                rolled_back = callback.on_train_epoch_end(self, epoch, metrics) or rolled_back
            if rolled_back:
                continue  # rolled back: run the same epoch again with the safer setting
            with self._evaluated_weights():
                metrics.update(self._validate())
                self._dispatch("on_validation_end", epoch + 1, metrics)
            metrics["time_s"] = round(time.perf_counter() - started, 3)
            self.history.append(metrics)
            epoch += 1
            self._end_of_epoch(epoch, metrics, step_log)
        self.train_model = self.logits_model  # drop the DDP wrapper: it holds the process group (see teardown)
        if self.stopped is not None:
            distributed.barrier()
            return self.history
        self._install_final_weights()
        final = self._final_evaluation()
        if final is not None and self.history:
            self.history[-1]["final"] = final
            self._dispatch("on_metrics")
        distributed.barrier()
        return self.history

    # ------------------------------------------------------------------------------------------------
    # One epoch, validation and the final evaluation
    # ------------------------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> tuple[dict, list[dict]]:
        self.train_model.train()
        totals = torch.zeros(8, dtype=torch.float64)  # loss·n, objective·n, n, clean ok, clean n, adv ok, adv n, steps
        grad_norms: list[float] = []
        step_log: list[dict] = []
        batches = train_batches(self.train_data, epoch, batch_size=self.batch_size, seed=self.seed, rank=self.rank,
                                world_size=self.world_size, device=self.device)
        bar = None
        if self.progress and self.is_main:
            from ..runtime.progress import progress_bar

            bar = progress_bar(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}")
        for x, y, share, indices in batches:
            lr = lr_at(self.global_step, lr=self.lr, schedule=self.schedule, total_steps=self.total_steps,
                       steps_per_epoch=self.steps_per_epoch, epochs=self.epochs, lr_scale=self.lr_scale)
            threat = threat_at(self.threat, self.global_step, eps_warmup_epochs=self.eps_warmup_epochs,
                               steps_per_epoch=self.steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            # Random starts and noise keyed by (seed, epoch, sample): the same draws on 1 or N processes.
            with (per_sample_generators(self.seed, epoch, indices) if indices is not None
                  else contextlib.nullcontext()):
                output = self.method.compute(self.train_model, self.logits_model, x, y, threat)
            objective = self.loss_weight * output.loss + (self.l2 * self.l2_penalty() if self.l2 > 0 else 0.0)
            (objective * share).backward()
            grad_norm = clip_gradients(self.model, self.clip_grad_value, self.clip_grad_norm)
            self.optimizer.step()
            self._dispatch("on_batch_end", objective, y)
            n = y.shape[0]
            clean = output.logits_clean if output.logits_clean is not None else clean_logits(self.model,
                                                                                             self.logits_model, x)
            totals += torch.tensor([float(output.loss.detach()) * n, float(objective.detach()) * n, n,
                                    float((clean.argmax(1) == y).sum()), n,
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
        return l2_penalty(self.regularised_parameters(), self.device)

    def regularised_parameters(self) -> list[nn.Parameter]:
        return regularised_parameters(self.model, self.l2_exclude)

    def _validate(self) -> dict:
        if self.val_data is None:
            return {}
        x, y = first_samples(self.val_data, self.val_max_samples, self.device)
        return validate(self.model, self.logits_model, x, y, threat=self.threat, val_attack=self.val_attack,
                        seed=self.seed, rank=self.rank, world_size=self.world_size)

    def _final_evaluation(self) -> dict | None:
        if self.final_suite is None or self.val_data is None or self.threat is None:
            return None
        # Every rank calls evaluate with the full data (it shards the work itself); rank 0 writes the file.
        x, y = first_samples(self.val_data, 10 ** 9, self.device)
        result = final_evaluation(self.model, (x, y), self.threat, self.final_suite, seed=self.seed,
                                  run_dir=self.run_dir if self.is_main else None)
        distributed.barrier()
        return result

    # ------------------------------------------------------------------------------------------------
    # Hook dispatch: evaluated and final weights, the end of an epoch, stops and events
    # ------------------------------------------------------------------------------------------------
    def _dispatch(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every callback, in order."""
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    @contextlib.contextmanager
    def _evaluated_weights(self) -> Iterator[None]:
        """Inside: the model holds the weights that are validated and saved (the EMA's, when on); after: the
        training weights again, exactly."""
        with contextlib.ExitStack() as stack:
            for callback in self.callbacks:
                stack.enter_context(callback.evaluated_weights(self))
            yield

    def _install_final_weights(self) -> None:
        """End of fit: the best epoch's weights (early_stop) or the averaged ones (EMA) become the model's and
        the saved model's; the choice is recorded in the last history entry."""
        record: dict[str, Any] = {}
        epoch = None
        for callback in self.callbacks:
            epoch = callback.install_final_weights(self, record)
            if epoch is not None:
                break
        if epoch is None:
            return
        for callback in self.callbacks:
            record.update(callback.model_metadata())
        if self.history:
            self.history[-1].update(record)
        self._dispatch("on_final_weights", epoch)
        distributed.barrier()

    def _end_of_epoch(self, epoch: int, metrics: dict, step_log: list[dict]) -> None:
        self._dispatch("on_epoch_end", epoch, metrics, step_log)
        distributed.barrier()
        if self.on_epoch_end is not None:
            self.on_epoch_end(metrics)

    def _stop(self, epoch: int, stop: TrainingStopped) -> None:
        """The monitor's on_finding="stop" fired: end training, keep what was saved, record why."""
        finding = stop.finding
        kept = (f"the model saved at the end of epoch {epoch} is kept" if self.run_dir is not None and epoch > 0
                else "nothing was saved" if self.run_dir is not None else "the model holds the weights of the stop")
        self.stopped = {"event": "stopped", "epoch": epoch + 1, "step": self.global_step,
                        "rule": f"GradientMonitor: {finding.kind} in {finding.layer}",
                        "action": f"training stopped ({finding.kind}); {kept}", "finding": finding.to_dict()}
        self._log_event(self.stopped)
        if self.history:
            self._dispatch("on_metrics")

    def _log_event(self, event: dict, stacklevel: int = 3) -> None:
        self.events.append(event)
        if self.is_main:
            warnings.warn(f"gradguard.Trainer: {event['event']} at epoch {event['epoch']} "
                          f"({event.get('rule')}): {event['action']}",
                          stacklevel=stacklevel)
            self._dispatch("on_event", event)

    # ------------------------------------------------------------------------------------------------
    # The CO guard's probe and rollback point (override to inject measurements or watch rollbacks)
    # ------------------------------------------------------------------------------------------------
    def measure_guard_accuracies(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        """(PGD accuracy, FGSM accuracy) on (x, y) — the guard's probe; override to inject measurements."""
        if self.threat is None:
            raise ConfigError("threat: the overfitting guard attacks the model, so it needs a threat model")
        return guard_accuracies(self.model, self.threat, self.guard, self.seed, x, y)

    def _snapshot(self) -> dict:
        """In-memory copy of the model and optimiser state (the guard's rollback point)."""
        return {"model": copy.deepcopy(unwrap(self.model).state_dict()),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "ema": copy.deepcopy(self.ema.shadow) if self.ema is not None else None}

    def _restore_snapshot(self, snapshot: dict) -> None:
        unwrap(self.model).load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
        if self.ema is not None and snapshot.get("ema") is not None:
            self.ema.shadow = copy.deepcopy(snapshot["ema"])
