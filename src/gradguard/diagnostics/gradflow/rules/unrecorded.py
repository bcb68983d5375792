"""unrecorded: no record at all, so nothing was diagnosed (never a silent all-clear)."""
from __future__ import annotations

from ...findings import WHOLE_MODEL, Finding
from ..records import RecordTable

KIND = "unrecorded"
ADVICE = (
    "The monitor recorded no training step, so it has nothing to diagnose: this is not an all-clear. Pass "
    "the optimiser (GradientMonitor(model, optimizer=opt)) so steps are counted automatically, or call "
    "monitor.step() after every optimizer.step(); and keep the monitor attached (`with` or attach()) while "
    "training runs."
)


def check(table: RecordTable) -> list[Finding]:
    return [] if table.records else [Finding(KIND, WHOLE_MODEL, {"records": 0}, ADVICE)]
