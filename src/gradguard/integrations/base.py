"""What the framework callbacks share: argument checks, one monitored fit, the stop, the diagnosis file.

``GradientHealthBase`` is the framework-independent half of the Lightning and Hugging Face callbacks (the base
class they subclass, hence the module's name; it was ``_common.py``). The ``on_finding`` check is the monitor's
own (``diagnostics.findings.check_on_finding``)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..diagnostics.findings import Finding, OnFinding, TrainingStopped, check_on_finding
from ..diagnostics.gradflow import GradientMonitor, findings_from_records
from ..errors import ConfigError
from ..io import atomic_write_json
from ..layout import DIAGNOSIS_FILE
from ..runtime.distributed import any_rank

logger = logging.getLogger("gradguard.integrations")


def check_options(every: int, path: str | os.PathLike | None, on_finding: OnFinding, tensorboard: Any) -> None:
    """Fail at construction, not minutes into a fit, on a bad callback argument."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"every: expected a positive integer (sample one optimiser step in `every`), got {every!r}")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"path: expected a file path for gradflow.jsonl (str or pathlib.Path) or None for the "
                          f"default, got {type(path).__name__}")
    check_on_finding(on_finding)
    if not (isinstance(tensorboard, (bool, str, os.PathLike)) or callable(getattr(tensorboard, "add_scalar", None))):
        raise ConfigError(f"tensorboard: expected True/False, a log directory or a SummaryWriter, "
                          f"got {type(tensorboard).__name__}")


def loss_scalar(value: Any) -> Tensor | float | None:
    """The scalar training loss out of what a framework hands over (a tensor, a number, or a dict with 'loss')."""
    if isinstance(value, dict) or hasattr(value, "keys"):
        try:
            value = value.get("loss")
        except (AttributeError, TypeError):
            return None
    if isinstance(value, Tensor):
        return value.detach() if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class GradientHealthBase:
    """The framework-independent half of the callbacks (see the Lightning and Hugging Face subclasses).

    Args:
        every: sample one optimiser step in ``every`` (``GradientMonitor(every=)``).
        path: where ``gradflow.jsonl`` goes (default: the framework's run directory); ``diagnosis.json`` is
            written beside it at the end of the fit.
        on_finding: None, "warn", "stop" or a callable, as ``GradientMonitor(on_finding=)``; "stop" (or a callable
            raising ``TrainingStopped``) ends the fit cleanly through the framework's own stop flag.
        tensorboard: True to stream the records into TensorBoard (the framework's writer where there is one,
            else event files beside gradflow.jsonl), or a log directory or ``SummaryWriter`` to write to.
    """

    def __init__(self, every: int = 10, path: str | os.PathLike | None = None, on_finding: OnFinding = None,
                 tensorboard: bool | str | os.PathLike | Any = False):
        check_options(every, path, on_finding, tensorboard)
        super().__init__()
        self.every, self.on_finding, self.tensorboard = every, on_finding, tensorboard
        self.path = Path(path) if path is not None else None
        self.monitor: GradientMonitor | None = None
        self.stopped: TrainingStopped | None = None  # why on_finding stopped the fit, if it did
        self.gradflow_path: Path | None = None
        self.diagnosis_path: Path | None = None
        self._sink: Any = None
        self._is_main = True

    # -- one fit -----------------------------------------------------------------------------------
    def _start(self, model: nn.Module, gradflow_path: Path, *, is_main: bool, distributed: bool, start_step: int,
               writer: Any = None) -> GradientMonitor:
        """Attach a fresh monitor. Steps are counted by the callback (``step()``), not the optimiser's hooks."""
        self._finish_quietly()
        monitor = GradientMonitor(model, every=self.every, path=gradflow_path if is_main else None,
                                  on_finding=self.on_finding, distributed=distributed, append=start_step > 0)
        # A resumed fit numbers its steps on from the framework's global step (and appends to gradflow.jsonl),
        # so records, TensorBoard steps and the framework's own logs agree.
        monitor.step_count = start_step
        monitor.attach()
        self.monitor, self.stopped, self._is_main = monitor, None, is_main
        self.gradflow_path, self.diagnosis_path = gradflow_path, None
        if self.tensorboard is not False and is_main:
            from .tensorboard import TensorBoardSink

            target = writer if self.tensorboard is True and writer is not None else (
                gradflow_path.parent if self.tensorboard is True else self.tensorboard)
            self._sink = TensorBoardSink(target)
        return monitor

    def _step(self, loss: Any) -> bool:
        """Count one optimiser step (call after it, before the gradients are zeroed); True: stop training."""
        monitor = self.monitor
        if monitor is None:
            return False
        sampled = monitor.sampling  # the same on every rank: sampling follows the step count
        try:
            monitor.step(loss_scalar(loss))
        except TrainingStopped as error:
            if self.stopped is None:
                self.stopped = error
                logger.warning("GradientHealthCallback stopped training (the framework ends the fit cleanly): %s",
                               error)
        if self._sink is not None:
            self._sink.update(monitor)
        stop = self.stopped is not None
        if monitor.distributed and sampled:
            # Under DDP findings are acted on only at sampled steps (from statistics combined over the ranks);
            # one all-reduce there makes the decision common, so no rank trains on while another stops.
            stop = any_rank(stop, next(monitor.model.parameters()).device)
            if stop and self.stopped is None:
                logger.warning("GradientHealthCallback: another rank's monitor stopped training at step %d",
                               monitor.step_count - 1)
        return stop

    def _finish(self) -> None:
        """Detach the monitor, close TensorBoard and write diagnosis.json (main process only). Idempotent."""
        monitor = self.monitor
        if monitor is None or not monitor.attached:
            return
        monitor.detach()
        findings = self.findings
        if self._sink is not None:
            self._sink.update(monitor)
            self._sink.close(findings)
            self._sink = None
        if self._is_main and self.gradflow_path is not None:
            self.diagnosis_path = atomic_write_json(self.gradflow_path.with_name(DIAGNOSIS_FILE),
                                                    self.diagnosis(findings))
            logger.info("GradientHealthCallback: %d findings (%s) in %s", len(findings),
                        ", ".join(f.kind for f in findings) or "healthy", self.diagnosis_path)

    def _finish_quietly(self) -> None:
        """Close a monitor left attached by an earlier fit that never reached its end."""
        if self.monitor is not None and self.monitor.attached:
            self._finish()

    # -- results -----------------------------------------------------------------------------------
    @property
    def findings(self) -> list[Finding]:
        """The monitor's findings so far, with the one that stopped the fit first if the records lack it.

        Before any fit: an "unrecorded" finding (nothing measured is not an all-clear)."""
        if self.monitor is None:
            return findings_from_records([])
        found = self.monitor.findings()
        if self.stopped is not None and not any(f.kind == self.stopped.finding.kind for f in found):
            found.insert(0, self.stopped.finding)  # e.g. a NaN loss on a step that was not sampled
        return found

    def diagnosis(self, findings: list[Finding] | None = None) -> dict:
        """What diagnosis.json holds: the findings (as ``gradguard diagnose`` stores them), the stop, the actions."""
        monitor = self.monitor
        findings = self.findings if findings is None else findings
        stopped = None
        if self.stopped is not None:
            stopped = {"step": self.stopped.step, "message": str(self.stopped), **self.stopped.finding.to_dict()}
        return {"gradient_findings": [f.to_dict() for f in findings], "stopped": stopped,
                "actions": list(monitor.actions) if monitor is not None else [],
                "steps": monitor.step_count if monitor is not None else 0,
                "sampled_steps": len({r["step"] for r in monitor.records}) if monitor is not None else 0,
                "every": self.every, "gradflow": self.gradflow_path.name if self.gradflow_path else None}
