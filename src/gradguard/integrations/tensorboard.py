"""GradientMonitor records and findings in TensorBoard (pip install gradguard[tensorboard]).

Every numeric field of a record becomes a scalar tagged ``gradflow/<layer>/<key>`` at the record's training step
(``grad_norm``, ``grad_max``, ``raw_grad_norm``, ``weight_norm``, ``update_ratio``, ``update_norm``,
``dead_fraction``, ``saturated_fraction``, the first layer's ``input_rms``/``input_absmax``, and whatever the
monitor records in future), plus ``grad_rms`` = grad_norm / sqrt(numel), the scale the vanishing rule compares
across layers; the loss is written once per sampled step as ``gradflow/loss``. Findings are text
(``gradflow/findings``), and what ``on_finding`` did is text too (``gradflow/actions``) as it happens.

``write_tensorboard(records_or_monitor, log_dir)`` writes a finished run at once (from a monitor, its records, or
a ``gradflow.jsonl``); ``TensorBoardSink`` streams while training (the framework callbacks use it with
``tensorboard=True``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

from ..diagnostics.gradflow import Finding, GradientMonitor, findings_from_records, load_gradflow
from ..errors import InputError
from . import optional_dependency

with optional_dependency("tensorboard", extra="tensorboard", user=__name__):  # torch.utils.tensorboard needs it
    from torch.utils.tensorboard import SummaryWriter

PREFIX = "gradflow"
# Record fields that are not per-layer measurements (identifiers, positions) or are per step (the loss).
NOT_SCALARS = frozenset({"step", "index", "numel", "forward_index", "loss", "loss_nonfinite_step"})


def record_scalars(record: dict) -> dict[str, float]:
    """The record's finite numeric measurements (booleans and None left out), plus ``grad_rms``."""
    values = {key: float(value) for key, value in record.items()
              if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value)}
    if "grad_norm" in values and record.get("numel"):
        values["grad_rms"] = values["grad_norm"] / math.sqrt(int(record["numel"]))
    return values


def findings_text(findings: Iterable[Finding]) -> str:
    """Markdown for TensorBoard's text tab: one bullet per finding with its numbers and advice."""
    lines = []
    for finding in findings:
        lines.append(f"- **{finding.kind}** in `{finding.layer}`: {finding.numbers()}  \n  {finding.advice}")
    return "\n".join(lines) if lines else "No findings: every rule passed on the sampled steps."


def _open_writer(target: Any) -> tuple[Any, bool]:
    """(writer, owned): a log directory opens a SummaryWriter we close; a writer passed in stays the caller's."""
    if isinstance(target, (str, os.PathLike)):
        return SummaryWriter(log_dir=str(target)), True
    if callable(getattr(target, "add_scalar", None)) and callable(getattr(target, "add_text", None)):
        return target, False
    raise InputError(f"writer: expected a log directory (str or path) or a torch.utils.tensorboard.SummaryWriter, "
                     f"got {type(target).__name__}")


class TensorBoardSink:
    """Streams a GradientMonitor's records into TensorBoard while it trains.

    Call ``update(monitor)`` after each training step (cheap when nothing new was sampled): it writes the records
    and ``on_finding`` actions added since the last call. ``close(findings)`` writes the findings as text and
    closes a writer it opened (a writer passed in, e.g. a logger's, is only flushed).

    Args:
        writer: a log directory, or a ``SummaryWriter`` (anything with ``add_scalar`` and ``add_text``).
    """

    def __init__(self, writer: str | os.PathLike | Any):
        self.writer, self._owned = _open_writer(writer)
        self._records_seen = 0
        self._actions_seen = 0
        self._loss_step: int | None = None
        self.last_step: int | None = None

    @property
    def log_dir(self) -> str | None:
        """Where the event files go (None for writers that do not say)."""
        get = getattr(self.writer, "get_logdir", None)
        return get() if callable(get) else getattr(self.writer, "log_dir", None)

    def write_records(self, records: Iterable[dict]) -> int:
        """Write records as scalars at their steps; return how many scalars were written."""
        written = 0
        for record in records:
            step = int(record["step"])
            for key, value in record_scalars(record).items():
                self.writer.add_scalar(f"{PREFIX}/{record['layer']}/{key}", value, step)
                written += 1
            loss = record.get("loss")
            if step != self._loss_step and isinstance(loss, (int, float)) and math.isfinite(loss):
                self.writer.add_scalar(f"{PREFIX}/loss", float(loss), step)
                self._loss_step = step
                written += 1
            self.last_step = step if self.last_step is None else max(self.last_step, step)
        return written

    def update(self, monitor: GradientMonitor) -> None:
        """Write what the monitor recorded, and what its ``on_finding`` did, since the last update."""
        records, actions = monitor.records, monitor.actions
        if len(records) > self._records_seen:
            self.write_records(records[self._records_seen:])
            self._records_seen = len(records)
        for action in actions[self._actions_seen:]:
            self.writer.add_text(f"{PREFIX}/actions", f"step {action['step']}: {action['action']} at "
                                 f"**{action['kind']}** in `{action['layer']}`", int(action["step"]))
        self._actions_seen = len(actions)

    def write_findings(self, findings: Iterable[Finding], step: int | None = None) -> None:
        """The findings as one markdown text entry (at ``step``, default: the last record's step)."""
        self.writer.add_text(f"{PREFIX}/findings", findings_text(findings),
                             step if step is not None else (self.last_step or 0))

    def close(self, findings: Iterable[Finding] | None = None) -> None:
        """Write ``findings`` (if given), then flush, and close the writer if this sink opened it."""
        if findings is not None:
            self.write_findings(findings)
        self.writer.flush()
        if self._owned:
            self.writer.close()


def write_tensorboard(source: GradientMonitor | Iterable[dict] | str | os.PathLike,
                      writer: str | os.PathLike | Any) -> str | None:
    """Write gradient-health records and their findings for TensorBoard; return the log directory.

    Args:
        source: a ``GradientMonitor``, its ``records`` (or ``load_gradflow``'s), or a ``gradflow.jsonl`` path (or
            the run directory holding it).
        writer: a log directory, or an open ``SummaryWriter`` (left open, flushed).

    Scalars are tagged ``gradflow/<layer>/<key>`` at each record's step; findings are text (``gradflow/findings``).
    Run ``tensorboard --logdir LOG_DIR`` to see them.
    """
    if isinstance(source, GradientMonitor):
        records, findings = source.records, source.findings()
    else:
        records = load_gradflow(source) if isinstance(source, (str, os.PathLike)) else list(source)
        if any(not isinstance(record, dict) or "step" not in record or "layer" not in record for record in records):
            raise InputError("source: expected a GradientMonitor, its records (dicts with 'step' and 'layer') or a "
                             "gradflow.jsonl path")
        findings = findings_from_records(records)
    sink = TensorBoardSink(writer)
    sink.write_records(records)
    log_dir = sink.log_dir
    sink.close(findings)
    return str(Path(log_dir)) if log_dir is not None else None
