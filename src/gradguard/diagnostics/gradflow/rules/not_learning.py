"""not_learning: the recent loss sits at or above where it started and the chance loss ln(C), after a gradient
spike or clearly above them (diverged)."""
from __future__ import annotations

import math
from typing import Any

from ...findings import WHOLE_MODEL, Finding
from ...health import (
    NOT_LEARNING_DIVERGED,
    NOT_LEARNING_GROWTH,
    NOT_LEARNING_RATIO,
    RECENT_SAMPLES,
    START_SAMPLES,
)
from ..records import RecordTable, growth, median

KIND = "not_learning"
ADVICE = (
    "The loss has not fallen: it sits at or above both where it started and the chance level ln(C) (what a "
    "model guessing uniformly over C classes scores), after a gradient spike or clearly above them (diverged), "
    "so the model is learning nothing. "
    "The usual cause is a learning rate too high for the model (a step that threw it off, from which it "
    "never recovered): lower it 10x, add warm-up, or clip gradients by norm (Trainer(clip_grad_norm=1.0))."
)


def not_learning_level(table: RecordTable | dict, steps: list[int] | None = None,
                       layers: list[str] | None = None) -> dict[str, Any] | None:
    """The loss numbers the "not_learning" rule compares: the start (median of the first samples) and recent (median
    of the latest) loss, the chance loss ln(C) when the output width C >= 2 is recorded, and ``ratio`` = recent /
    max(start, chance). None before START_SAMPLES + RECENT_SAMPLES losses (the warm-up).

    ``table``: a ``RecordTable``, or (as before the table existed) a (step, layer) -> record dict with its
    ``steps`` and ``layers``."""
    if not isinstance(table, RecordTable):
        table = RecordTable.of(table, steps or [], layers or [])
    losses = table.losses()
    if len(losses) < START_SAMPLES + RECENT_SAMPLES:
        return None
    start, recent = median(losses[:START_SAMPLES]), median(losses[-RECENT_SAMPLES:])
    widths = [record["output_width"] for record in table.rows.values() if record.get("output_width")]
    width = widths[-1] if widths else None
    chance = math.log(width) if width is not None and width >= 2 else None
    level = max(start, chance) if chance is not None else start
    return {"loss_start": start, "loss_recent": recent, "chance_loss": chance, "output_width": width,
            "ratio": recent / level if level > 0 else None, "samples": len(losses)}


def check(table: RecordTable) -> list[Finding]:
    """Not learning: the recent loss sits at or above NOT_LEARNING_RATIO x the higher of its start and ln(C) after the
    total gradient norm peaked NOT_LEARNING_GROWTH x above its start (a slow starter's gradient stays flat), or at or
    above NOT_LEARNING_DIVERGED x that level whatever the gradient did (diverged)."""
    level = not_learning_level(table)
    if level is None or level["ratio"] is None or level["ratio"] < NOT_LEARNING_RATIO:
        return []
    totals = table.total_grad_norms()
    grown = growth(totals)["growth"] if len(totals) >= 2 else None
    if level["ratio"] < NOT_LEARNING_DIVERGED and (grown is None or grown < NOT_LEARNING_GROWTH):
        return []
    evidence = {**level, "grad_growth": grown, "ratio_threshold": NOT_LEARNING_RATIO,
                "growth_threshold": NOT_LEARNING_GROWTH, "diverged_threshold": NOT_LEARNING_DIVERGED,
                "measure": "ratio = median of the recent losses / max(median of the first losses, ln(output width)); "
                           "grad_growth = peak / start of the total gradient norm"}
    return [Finding(KIND, WHOLE_MODEL, evidence, ADVICE)]
