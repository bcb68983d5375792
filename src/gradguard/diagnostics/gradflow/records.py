"""The gradient-health records as a table the rules (and the calibration benchmarks) read: ``RecordTable``.

A record is one layer at one sampled step (the dicts ``GradientMonitor.records`` holds and ``gradflow.jsonl``
stores). ``RecordTable`` indexes them by (step, layer) and derives the series every rule compares: one layer's
values over the steps, the whole model's gradient norm, update ratio and loss, the depth ends and the gradient
RMS ratio between them. It is public because the thresholds are calibrated on exactly these numbers
(``bench/diagnostics_calibration.py``, ``bench/diagnostics_faults.py``). ``load_gradflow`` reads the file back.
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
from pathlib import Path
from typing import Iterable

from ...errors import DataError
from ...layout import GRADFLOW_FILE
from ..health import RECENT_SAMPLES, START_SAMPLES, layer_order

__all__ = ["RecordTable", "depth_ends", "grad_rms", "growth", "largest_jump", "load_gradflow", "median"]

Series = list[tuple[int, float]]


class RecordTable:
    """Records indexed by (step, layer): ``rows``; ``steps`` (sorted) and ``layers`` (depth order) to read.

    ``before(step)`` gives the same rows read only over the earlier steps (what the rules see after a non-finite
    value); whole-run facts (the depth ends, the output width) still come from every row.
    """

    def __init__(self, records: Iterable[dict]):
        self.records = list(records)
        self.rows: dict[tuple[int, str], dict] = {(record["step"], record["layer"]): record
                                                  for record in self.records}
        self.all_steps: list[int] = sorted({record["step"] for record in self.records})
        self.steps: list[int] = self.all_steps
        self.layers: list[str] = layer_order(self.records)

    @classmethod
    def of(cls, rows: dict[tuple[int, str], dict], steps: list[int], layers: list[str]) -> "RecordTable":
        """A table over an existing (step, layer) -> record dict, read over ``steps`` in the order ``layers``."""
        table = cls([])
        table.records, table.rows = list(rows.values()), rows
        table.all_steps, table.steps, table.layers = sorted({step for step, _ in rows}), list(steps), list(layers)
        return table

    def with_steps(self, steps: list[int]) -> "RecordTable":
        """The same rows, read over ``steps`` only."""
        view = copy.copy(self)
        view.steps = list(steps)
        return view

    def before(self, step: int) -> "RecordTable":
        """The same rows, read over the steps before ``step``."""
        return self.with_steps([s for s in self.steps if s < step])

    def get(self, step: int, layer: str) -> dict | None:
        return self.rows.get((step, layer))

    def series(self, layer: str, key: str) -> Series:
        """(step, value) of one layer's ``key`` over the steps where it was recorded."""
        values = []
        for step in self.steps:
            record = self.rows.get((step, layer))
            if record is not None and record.get(key) is not None:
                values.append((step, float(record[key])))
        return values

    def total_grad_norms(self) -> Series:
        """(step, ‖g‖) of the whole model: the root sum of squares of the layers' gradient norms."""
        totals = []
        for step in self.steps:
            norms = [self.rows[(step, layer)]["grad_norm"] for layer in self.layers
                     if (step, layer) in self.rows and self.rows[(step, layer)].get("grad_norm") is not None]
            if norms:
                totals.append((step, math.sqrt(sum(n * n for n in norms))))
        return totals

    def model_update_ratios(self) -> Series:
        """Per sampled step, ‖Δθ‖ / ‖θ‖ over the whole model (layers with both numbers)."""
        ratios = []
        for step in self.steps:
            deltas, weights = 0.0, 0.0
            for layer in self.layers:
                record = self.rows.get((step, layer))
                if record is None or record.get("weight_norm") is None or record.get("update_ratio") is None:
                    continue
                delta = record.get("update_norm")
                delta = record["update_ratio"] * record["weight_norm"] if delta is None else delta
                deltas, weights = deltas + delta * delta, weights + record["weight_norm"] ** 2
            if weights > 0:
                ratios.append((step, math.sqrt(deltas / weights)))
        return ratios

    def losses(self) -> list[float]:
        """The loss of each sampled step that recorded one (it is the same on every layer's record)."""
        values = []
        for step in self.steps:
            record = next((self.rows[(step, layer)] for layer in self.layers if (step, layer) in self.rows), None)
            if record is not None and record.get("loss") is not None:
                values.append(float(record["loss"]))
        return values

    def depth_ends(self) -> tuple[str, str] | None:
        """First and last layer the forward pass ran (see ``depth_ends``)."""
        return depth_ends(self.rows, self.layers)

    def depth_ratios(self, first: str, last: str) -> Series:
        """(step, gradient RMS of ``first`` / that of ``last``) where both are known and the last is non-zero."""
        ratios = []
        for step in self.steps:
            top, bottom = grad_rms(self.rows.get((step, first))), grad_rms(self.rows.get((step, last)))
            if top is not None and bottom:
                ratios.append((step, top / bottom))
        return ratios

    def __repr__(self) -> str:
        return f"RecordTable(records={len(self.records)}, steps={len(self.steps)}, layers={len(self.layers)})"


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def grad_rms(record: dict | None) -> float | None:
    """A layer's gradient RMS: its gradient norm / sqrt(numel); None without a gradient norm."""
    if record is None or record.get("grad_norm") is None:
        return None
    return record["grad_norm"] / math.sqrt(max(int(record.get("numel") or 1), 1))


def growth(totals: Series) -> dict:
    """Start (median of the first samples), peak and peak/start of a total-gradient-norm series."""
    start = median(v for _, v in totals[:START_SAMPLES])
    peak_step, peak = max(totals, key=lambda item: item[1])
    return {"start_grad_norm": start, "peak_grad_norm": peak, "peak_step": peak_step,
            "growth": peak / start if start > 0 else math.inf}


def largest_jump(totals: Series, start: float) -> tuple[int | None, float]:
    """Largest factor by which a sample exceeds the median of the samples before it.

    Only samples above the starting norm count: a near-converged model's tiny gradient growing back on a
    hard batch is not an explosion.
    """
    best: tuple[int | None, float] = (None, 0.0)
    for i in range(1, len(totals)):
        step, value = totals[i]
        before = median(v for _, v in totals[max(0, i - RECENT_SAMPLES):i])
        if value > start and before > 0 and value / before > best[1]:
            best = (step, value / before)
    return best


def depth_ends(table: dict, layers: list[str]) -> tuple[str, str] | None:
    """First and last layer the forward pass ran (containers owning parameters have no forward position;
    records from before ``forward_index`` existed use the registration order); None with fewer than two."""
    placed = {name for (_, name), record in table.items() if record.get("forward_index") is not None}
    ordered = [layer for layer in layers if layer in placed]
    ends = ordered if len(ordered) >= 2 else layers
    return (ends[0], ends[-1]) if len(ends) >= 2 else None


def load_gradflow(path: str | os.PathLike) -> list[dict]:
    """Read a ``gradflow.jsonl`` file (one record per line) back into a list of dicts."""
    path = Path(path)
    if path.is_dir():
        path = path / GRADFLOW_FILE
    if not path.exists():
        raise DataError(f"path: {str(path)!r} does not exist; pass the gradflow.jsonl a GradientMonitor(path=...) wrote")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"path: line {number} of {str(path)!r} is not JSON ({error}); the file is corrupt") from None
            if not isinstance(record, dict) or "layer" not in record or "step" not in record:
                raise DataError(f"path: line {number} of {str(path)!r} is not a gradflow record (needs 'step' and 'layer')")
            records.append(record)
    return records
