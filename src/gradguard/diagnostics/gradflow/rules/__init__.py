"""The gradient-health rules: one kind per file, registered in ``RULES``; ``findings_from_records`` runs them.

A rule module declares ``KIND``, ``ADVICE`` (the usual fix) and ``check(table: RecordTable) -> list[Finding]``.
``RULES`` is in report order, which is also the order of ``KINDS``. Adding a finding: a new file here and one
line in ``RULES`` (its threshold in ``diagnostics/health.py``). The rules are independent except for the three
interactions below, which stay in ``findings_from_records`` and nowhere else:

- "nonfinite" runs first on every sample; the other rules read only the samples before its first step;
- "exploding" also fires when the gradients overflowed after growing (``exploding.overflowed``), which needs the
  nonfinite result;
- "vanishing" is dropped when "dead" holds and the first layer's gradient is exactly zero (blocked, not vanishing).
"""
from __future__ import annotations

from types import ModuleType
from typing import Iterable

from ...findings import Finding
from ..records import RecordTable
from . import (
    dead,
    exploding,
    inputs_not_normalised,
    lr_too_high,
    lr_too_low,
    nonfinite,
    not_learning,
    saturated,
    sharpness,
    stalled,
    unrecorded,
    vanishing,
)

RULES: list[ModuleType] = [
    nonfinite,
    exploding,
    lr_too_high,
    not_learning,
    vanishing,
    stalled,
    lr_too_low,
    dead,
    saturated,
    inputs_not_normalised,
    sharpness,
    unrecorded,
]
KINDS: tuple[str, ...] = tuple(rule.KIND for rule in RULES)
ADVICE: dict[str, str] = {rule.KIND: rule.ADVICE for rule in RULES}

__all__ = ["ADVICE", "KINDS", "RULES", "findings_from_records"]


def findings_from_records(records: Iterable[dict]) -> list[Finding]:
    """Diagnose gradient-health records (from ``GradientMonitor.records`` or ``load_gradflow``).

    Returns findings in the order of ``KINDS`` (fatal ones first); an empty list means healthy. No records at all
    give an "unrecorded" finding: nothing was measured, which is not an all-clear. Once the loss, a gradient or a
    weight turns non-finite ("nonfinite"), the other rules look only at the samples before it.
    """
    table = RecordTable(records)
    if not table.records:
        return unrecorded.check(table)
    broken = nonfinite.check(table)
    finite = table.before(broken[0].evidence["first_step"]) if broken else table
    found = {rule.KIND: rule.check(finite) for rule in RULES if rule is not nonfinite}
    found[nonfinite.KIND] = broken
    if not found[exploding.KIND]:
        found[exploding.KIND] = exploding.overflowed(finite, broken)
    vanished = found[vanishing.KIND]
    if vanished and vanished[0].evidence["grad_norm_first"] == 0 and found[dead.KIND]:
        found[vanishing.KIND] = []  # an exactly-zero gradient behind dead units is blocked, not vanishing
    return [finding for rule in RULES for finding in found[rule.KIND]]
