"""lr_too_low: the whole model's update ratio (median over the run) below LR_LOW_RATIO while the loss does not
change by LR_LOW_LOSS_CHANGE."""
from __future__ import annotations

from ...findings import WHOLE_MODEL, Finding
from ...health import LR_HIGH_RATIO, LR_LOW_LOSS_CHANGE, LR_LOW_RATIO, RECENT_SAMPLES, START_SAMPLES
from ..records import RecordTable, median
from .lr_too_high import typical_update

KIND = "lr_too_low"
ADVICE = (
    "The weights barely move (updates below one millionth of their size) and the loss does not change: "
    "the learning rate is too small to train. Raise it (typical: 1e-3 for Adam, 1e-2 to 1e-1 for SGD), "
    "or check that the schedule does not start at zero."
)


def check(table: RecordTable) -> list[Finding]:
    found = typical_update(table)
    if found is None:
        return []
    _, typical, evidence = found
    if typical > LR_HIGH_RATIO or not typical < LR_LOW_RATIO:  # too high is lr_too_high's finding
        return []
    losses = table.losses()
    change = None
    if len(losses) >= 2:
        start = median(losses[:START_SAMPLES])
        change = abs(start - median(losses[-RECENT_SAMPLES:])) / max(abs(start), 1e-12)
        if change >= LR_LOW_LOSS_CHANGE:
            return []
    evidence.update(threshold=LR_LOW_RATIO, loss_change=change, loss_change_threshold=LR_LOW_LOSS_CHANGE)
    return [Finding(KIND, WHOLE_MODEL, evidence, ADVICE)]
