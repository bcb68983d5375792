"""``GradientMonitor``: when to measure and what to do about it.

The monitor's lifecycle (attach/detach, the optimiser's step hooks), the model hooks armed only for sampled
steps, the step count, the ``on_finding`` actions and the curvature schedule (``curvature_every``). What a sampled
step measures is ``measure.LayerStats``; how records become findings is ``rules``. The hook and work method names
(``_layer_pre_hook``, ``_enter_layer``, ``_read_gradients``, ``_finish_sample``, ...) stay on the monitor: they
are where a sampled step's work enters, and the tests count calls through them.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import IO, Any, Callable

import torch
from torch import Tensor, nn

from ...errors import ConfigError, InputError
from ...layout import CURVATURE_FILE
from ...runtime.distributed import group_initialized
from ..curvature import LossFn, SharpnessTracker
from ..findings import FATAL_KINDS, Finding, GradientHealthWarning, TrainingStopped, check_on_finding
from ..plots import plot_all
from .measure import LayerStats
from .rules import ADVICE, findings_from_records
from .rules import sharpness as sharpness_rule

__all__ = ["GradientMonitor"]


class GradientMonitor:
    """Per-layer gradient health of a model while it trains, through hooks only.

    Args:
        model: the model being trained; it is never modified (hooks are removed on ``detach``).
        every: sample one training step in ``every`` (steps 0, every, 2·every, ...).
        path: optional ``gradflow.jsonl``; the records of each sampled step are appended as JSON lines.
        optimizer: optional; when given, steps are counted automatically through its step hooks
            (explicit ``step()`` calls then do nothing, so a Trainer calling ``step()`` too is harmless).
        append: append to an existing ``path`` (resumed runs) instead of starting it afresh.
        curvature_every: every N-th step, also measure the top Hessian eigenvalue of that step's training
            batch (``curvature_iters`` warm-started power-iteration products) against the optimiser's stability
            threshold (2/lr for SGD; see ``SharpnessTracker``); a "sharpness" finding when it is exceeded.
            Needs ``optimizer=`` or ``lr=``; labels come from ``step(targets=...)``, else the predictions.
        on_finding: what to do when a finding first appears (checked after every sampled step): None (only
            collect), "warn" (a ``GradientHealthWarning``), "stop" (raise ``TrainingStopped`` at a fatal finding,
            ``FATAL_KINDS`` = nonfinite, exploding; warn at the others) or a callable ``action(finding)``. With an
            action set, a NaN/inf loss passed to ``step(loss)`` is acted on at once (one host sync per step).
        distributed: under DistributedDataParallel, also combine the activation statistics, the first layer's
            input statistics and the loss over all processes, so every rank's records equal a single process's
            on the whole batch (gradients are all-reduced by DDP already). Every rank must then run the monitor.
            Default: on when ``model`` is a DistributedDataParallel and a process group is initialised.

    Use as ``with GradientMonitor(model, every=10, optimizer=opt) as monitor: ...`` (or call ``monitor.step()``
    after each optimiser step instead of passing ``optimizer=``), or hand it to ``Trainer(monitor=...)``. A
    monitor that was never attached attaches itself at its first ``step()`` (recording from the next sampled step
    on). A monitor that recorded nothing says so (a warning and an "unrecorded" finding), never an all-clear.

    The model's hooks are registered only for the sampled steps: ``step()`` arms them when the next step is
    sampled and the end of that step removes them, so the other steps run the model exactly as without the
    monitor (the optimiser's step hooks, when used, only count).
    """

    def __init__(self, model: nn.Module, every: int = 10, path: str | os.PathLike | None = None,
                 optimizer: torch.optim.Optimizer | None = None, *, append: bool = False,
                 curvature_every: int | None = None, curvature_iters: int = 5, lr: float | None = None,
                 curvature_loss: LossFn | None = None, on_finding: str | Callable[[Finding], Any] | None = None,
                 distributed: bool | None = None):
        if not isinstance(model, nn.Module):
            raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        check_on_finding(on_finding)
        is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if is_ddp:
            model = model.module  # type: ignore[assignment]  # hook the wrapped model: same layer names as a single process
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every: expected a positive integer (sample one step in `every`), got {every!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise InputError(f"optimizer: expected a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self.model = model
        self.on_finding = on_finding
        self.distributed = (is_ddp and group_initialized()) if distributed is None else bool(distributed)
        self.actions: list[dict] = []  # what on_finding did: step, kind, layer, action
        self._acted: set = set()
        self.every = every
        self.path = Path(path) if path is not None else None
        self.optimizer = optimizer
        self.append = append
        self.records: list[dict] = []
        self.step_count = 0  # training steps completed while attached
        self.sampling = False  # is the step in progress sampled (model hooks armed)?
        self.attached = False
        self._ever_attached = False
        self._stats = LayerStats(model)  # the layers, and what a sampled step measures on them
        self._optimizer_handles: list[Any] = []
        self._sample_handles: list[Any] = []
        self._file: IO[str] | None = None
        self._reset_sample()
        self._warned_no_grad = self._warned_unrecorded = False
        self.sharpness = (SharpnessTracker(model, curvature_every, optimizer=optimizer, lr=lr, iters=curvature_iters,
                                           loss_fn=curvature_loss) if curvature_every is not None else None)
        self._batch_handle: Any = None
        self._batch: Tensor | None = None  # the sampled step's training input, for the curvature measurement
        self._targets: Tensor | None = None

    @property
    def layer_names(self) -> list[str]:
        return [state.name for state in self._stats.layers]

    # -- attach / detach ------------------------------------------------------------------------
    def attach(self) -> "GradientMonitor":
        """Start watching (idempotent): open ``path``, hook the optimiser, arm the model if this step is sampled."""
        if self.attached:
            return self
        self.attached = self._ever_attached = True
        if self.optimizer is not None:
            self._optimizer_handles = [self.optimizer.register_step_pre_hook(self._optimizer_pre_hook),
                                       self.optimizer.register_step_post_hook(self._optimizer_post_hook)]
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a" if self.append else "w", encoding="utf-8")
        if self.step_count % self.every == 0:
            self._arm()
        self._arm_curvature()
        return self

    def detach(self) -> None:
        """Remove every hook and close the file; records stay available."""
        if self.attached and self.step_count == 0 and self._stats.snapshot is not None:
            self._warn_unrecorded("training forward passes ran while it was attached, but no step was counted")
        self._disarm()
        self._disarm_curvature()
        for handle in self._optimizer_handles:
            handle.remove()
        self._optimizer_handles = []
        if self._file is not None:
            self._file.close()
            self._file = None
        self.attached = False
        self._reset_sample()
        self._stats.snapshot_buffers = None

    def __enter__(self) -> "GradientMonitor":
        return self.attach()

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def _arm(self) -> None:
        """Register the model hooks for one sampled step (or re-enable those kept from the step before)."""
        if self._sample_handles:
            self.sampling = True
            return
        handles = [state.module.register_forward_pre_hook(self._layer_pre_hook) for state in self._stats.layers]
        handles += [module.register_forward_hook(self._activation_hook) for module in self._stats.activations]
        handles += [param.register_post_accumulate_grad_hook(self._raw_gradient_hook) for param in self._stats.params]
        handles.append(self.model.register_forward_hook(self._output_hook))
        self._sample_handles = handles
        self.sampling = True

    def _disarm(self) -> None:
        for handle in self._sample_handles:
            handle.remove()
        self._sample_handles = []
        self.sampling = False

    # -- hooks (armed on sampled steps only; each also checks the flag) --------------------------
    def _layer_pre_hook(self, module: nn.Module, inputs: Any) -> None:
        if self.sampling:
            if self._stats.snapshot is None and torch.is_grad_enabled():
                self._take_snapshot(module)
            self._enter_layer(module, inputs)

    def _activation_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.sampling:
            self._record_activation(module, output)

    def _output_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        # The width of a (batch, C) output: C classes, whose chance loss ln(C) the "not_learning" rule compares.
        if self.sampling and torch.is_grad_enabled() and isinstance(output, Tensor) and output.dim() == 2:
            self._stats.output_width = int(output.shape[1])

    def _raw_gradient_hook(self, param: Tensor) -> None:
        if self.sampling:
            self._record_raw_gradient(param)

    def _optimizer_pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.sampling:
            self._read_gradients()

    def _optimizer_post_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._end_step()

    # -- the work, on sampled steps only (delegated to LayerStats) ---------------------------------
    def _reset_sample(self) -> None:
        self._stats.reset()

    def _take_snapshot(self, module: nn.Module) -> None:
        self._stats.take_snapshot(module)

    def _enter_layer(self, module: nn.Module, inputs: Any) -> None:
        self._stats.enter_layer(module, inputs)

    def _record_activation(self, module: nn.Module, output: Any) -> None:
        self._stats.record_activation(module, output)

    def _record_raw_gradient(self, param: Tensor) -> None:
        self._stats.record_raw_gradient(param)

    def _read_gradients(self) -> tuple[list[Tensor | None], list[Tensor | None]]:
        return self._stats.read_gradients()

    def _finish_sample(self) -> None:
        grad_norms, grad_maxima = self._stats.gradients or self._read_gradients()
        if all(n is None for n in grad_norms) and not self._warned_no_grad:
            self._warned_no_grad = True
            warnings.warn("GradientMonitor: no parameter has a .grad at step(); call monitor.step() after "
                          "optimizer.step() and before optimizer.zero_grad()", RuntimeWarning, stacklevel=4)
        if self.distributed:
            self._stats.combine_across_ranks()
        records = self._stats.layer_records(self.step_count, grad_norms, grad_maxima)
        self.records.extend(records)
        if self._file is not None:
            self._file.write("".join(json.dumps(record) + "\n" for record in records))
            self._file.flush()

    # -- public ----------------------------------------------------------------------------------
    def step(self, loss: float | Tensor | None = None, *, targets: Tensor | None = None) -> None:
        """Mark the end of one training step (call after ``optimizer.step()``, before ``zero_grad()``).

        ``loss`` (recommended) is checked for NaN/inf at every step without a host sync, and the latest one is
        stored with the sampled step's records (it feeds the "nonfinite" and "lr_too_low" findings). With
        ``optimizer=`` given, steps are counted by the optimiser's hooks and this call only notes ``loss``.
        ``targets`` (the batch's labels) are used by the curvature measurement of ``curvature_every`` (when steps
        are counted here; the optimiser's hooks measure before this call, on the predictions).
        """
        if loss is not None:
            self._note_loss(loss)
        if self.optimizer is not None and self.attached:
            return
        if not self.attached and not self._ever_attached:
            # Handed to a loop (e.g. Trainer(monitor=...)) without `with`/attach(): start watching now, so
            # the next sampled step is recorded instead of nothing at all. The step ending now was not watched.
            self.attach()
            self._disarm()
        self._targets = targets
        self._end_step()

    def _note_loss(self, loss: float | Tensor) -> None:
        """Keep the latest loss; remember the first step whose loss was not finite (a tensor op: no sync)."""
        # With the optimiser's hooks counting, the step this loss belongs to has already been counted.
        step = self.step_count - 1 if (self.optimizer is not None and self.attached) else self.step_count
        value = self._stats.note_loss(loss, step)
        if self.on_finding is not None and not self.distributed and not math.isfinite(float(value)):
            evidence = {"first_step": step, "loss": float(value), "loss_nonfinite_step": step}
            self._act([Finding("nonfinite", "(loss)", evidence, ADVICE["nonfinite"])], step=step)

    def _end_step(self) -> None:
        sampled = self.sampling
        if sampled:
            self._finish_sample()
            if self.attached and (self.step_count + 1) % self.every == 0:
                self.sampling = False  # the next step is sampled too: keep the hooks, idle until _arm
            else:
                self._disarm()
            self._reset_sample()
        self._measure_curvature()
        self.step_count += 1
        if self.attached and self.step_count % self.every == 0:
            self._arm()
        self._arm_curvature()
        if sampled and self.on_finding is not None:
            self._act(self.findings())

    def _act(self, findings: list[Finding], step: int | None = None) -> None:
        """Apply ``on_finding`` to each finding not acted on before (a fatal kind once, others once per layer).

        ``step``: the step acted at (default: the step just counted; a loss checked before its step is counted,
        as with ``step(loss)`` and no optimiser hooks, passes its own)."""
        step = max(self.step_count - 1, 0) if step is None else step
        for finding in findings:
            key = finding.kind if finding.kind in FATAL_KINDS else (finding.kind, finding.layer)
            if key in self._acted or finding.kind == "unrecorded":
                continue
            self._acted.add(key)
            fatal = finding.kind in FATAL_KINDS
            action = ("callable" if callable(self.on_finding) else
                      "stop" if self.on_finding == "stop" and fatal else "warn")
            self.actions.append({"step": step, "kind": finding.kind, "layer": finding.layer, "action": action})
            if callable(self.on_finding):
                self.on_finding(finding)
            elif action == "stop":
                raise TrainingStopped(finding, step)
            else:
                warnings.warn(f"GradientMonitor (step {step}): {finding}", GradientHealthWarning, stacklevel=3)

    # -- curvature (curvature_every) --------------------------------------------------------------
    def _arm_curvature(self) -> None:
        """Hook the model's input for a step whose curvature is due (no hook on the other steps)."""
        if self.sharpness is not None and self.attached and self._batch_handle is None \
                and self.sharpness.due(self.step_count):
            self._batch_handle = self.model.register_forward_pre_hook(self._batch_hook)

    def _disarm_curvature(self) -> None:
        if self._batch_handle is not None:
            self._batch_handle.remove()
            self._batch_handle = None

    def _batch_hook(self, module: nn.Module, inputs: Any) -> None:
        if torch.is_grad_enabled() and module.training and inputs and isinstance(inputs[0], Tensor):
            self._batch = inputs[0].detach()  # the last training forward of the step: what the optimiser fits

    def _measure_curvature(self) -> None:
        batch, targets, self._batch, self._targets = self._batch, self._targets, None, None
        self._disarm_curvature()
        if self.sharpness is None or batch is None:
            return
        if targets is not None and targets.shape[0] != batch.shape[0]:
            targets = None
        record = self.sharpness.measure(self.step_count, batch, targets)
        if self.path is not None:
            with open(self.path.with_name(CURVATURE_FILE), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    @property
    def curvature_records(self) -> list[dict]:
        """One record per curvature measurement: step, top_eigenvalue, threshold, ratio, lr, seconds."""
        return list(self.sharpness.records) if self.sharpness is not None else []

    def findings(self) -> list[Finding]:
        """Diagnose the records so far (see ``findings_from_records``), plus "sharpness" with ``curvature_every``.

        With no step recorded the answer is an "unrecorded" finding and a warning, never an empty list.
        """
        if not self.records:
            reason = ("no training step was counted: pass optimizer= or call monitor.step() after optimizer.step()"
                      if self.step_count == 0 else
                      f"{self.step_count} steps were counted but none was sampled while attached")
            self._warn_unrecorded(reason)
            finding = findings_from_records([])[0]
            finding.evidence.update(reason=reason, steps_counted=self.step_count, attached=self.attached)
            return [finding]
        return sharpness_rule.from_tracker(self.sharpness) + findings_from_records(self.records)

    def _warn_unrecorded(self, reason: str) -> None:
        if not self._warned_unrecorded:
            self._warned_unrecorded = True
            warnings.warn(f"GradientMonitor recorded nothing ({reason}), so its findings are not an all-clear. "
                          "Pass optimizer= (GradientMonitor(model, optimizer=opt)) or call monitor.step() after "
                          "each optimizer.step().", RuntimeWarning, stacklevel=3)

    def plot(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write the gradient-flow, norm heat-map and activation-health PNGs; return their paths."""
        return plot_all(self.records, out_dir)

    def __repr__(self) -> str:
        return (f"GradientMonitor(layers={len(self._stats.layers)}, every={self.every}, steps={self.step_count}, "
                f"records={len(self.records)}, attached={self.attached})")

