"""saturated: sigmoid/tanh outputs where the derivative is nearly zero, a recent fraction at or above
SATURATED_FRACTION."""
from __future__ import annotations

from ...findings import Finding
from ...health import SATURATED_FRACTION
from ..records import RecordTable
from .dead import fraction_findings

KIND = "saturated"
ADVICE = (
    "These sigmoid/tanh units sit at their asymptotes, where the derivative is ~0 and gradients vanish. "
    "Scale the init down (Glorot: nn.init.xavier_uniform_), normalise the inputs or add normalisation "
    "layers, or switch to a ReLU-family activation."
)


def check(table: RecordTable) -> list[Finding]:
    return fraction_findings(table, KIND, "saturated_fraction", SATURATED_FRACTION, ADVICE)
