"""lr_too_high: the whole model's update ratio ‖Δθ‖/‖θ‖ (median over the run) above LR_HIGH_RATIO."""
from __future__ import annotations

from typing import Any

from ...findings import WHOLE_MODEL, Finding
from ...health import LR_HIGH_RATIO, RECENT_SAMPLES
from ..records import RecordTable, median

KIND = "lr_too_high"
ADVICE = (
    "Each update moves the weights by more than a tenth of their size (a healthy run sits near 1e-3), so "
    "training jumps around instead of descending. Lower the learning rate 10x, add a warm-up, or clip "
    "gradients by norm."
)


def typical_update(table: RecordTable) -> tuple[list[float], float, dict[str, Any]] | None:
    """The whole model's update ratios, their median and the evidence both learning-rate rules start from (the
    median of all samples, so a warm-up or a decay to zero at the end does not decide it); None with too few."""
    ratios = [r for _, r in table.model_update_ratios()]
    if len(ratios) < RECENT_SAMPLES:
        return None
    typical = median(ratios)
    evidence: dict[str, Any] = {"update_ratio": typical, "samples": len(ratios),
                                "measure": "‖Δθ‖/‖θ‖ of the whole model, median over the sampled steps"}
    return ratios, typical, evidence


def check(table: RecordTable) -> list[Finding]:
    found = typical_update(table)
    if found is None:
        return []
    ratios, typical, evidence = found
    if typical > LR_HIGH_RATIO:
        above = sum(r > LR_HIGH_RATIO for r in ratios)
        evidence.update(threshold=LR_HIGH_RATIO, samples_above=above)
        return [Finding(KIND, WHOLE_MODEL, evidence, ADVICE)]
    return []
