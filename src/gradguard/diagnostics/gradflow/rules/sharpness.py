"""sharpness: the loss Hessian's top eigenvalue past the optimiser's stability threshold. Measured by the
monitor's ``SharpnessTracker`` (``curvature_every``), not stored in the records: ``GradientMonitor.findings``
asks ``from_tracker`` and puts the finding first."""
from __future__ import annotations

from ...curvature import SharpnessTracker
from ...findings import WHOLE_MODEL, Finding
from ..records import RecordTable

KIND = "sharpness"
ADVICE = (
    "The loss Hessian's top eigenvalue is past the optimiser's stability threshold (lr·λ_max > 2 for SGD), "
    "so steps overshoot along the sharpest direction and the run is heading for divergence. Lower the "
    "learning rate (below 2/λ_max), add warm-up, or clip gradients by norm."
)


def check(table: RecordTable) -> list[Finding]:
    """Nothing: the records carry no curvature (see ``from_tracker``)."""
    return []


def from_tracker(tracker: SharpnessTracker | None) -> list[Finding]:
    """One finding when any curvature measurement was over the threshold: the first one, and the worst ratio."""
    unstable = tracker.unstable() if tracker is not None else []
    if tracker is None or not unstable:
        return []
    first, worst = unstable[0], max(unstable, key=lambda record: record["ratio"])
    evidence = {"first_step": first["step"], "top_eigenvalue": first["top_eigenvalue"],
                "threshold": first["threshold"], "ratio": first["ratio"], "lr": first["lr"],
                "worst_ratio": worst["ratio"], "quantity": first["quantity"],
                "measured": len(tracker.records), "over_threshold": len(unstable)}
    return [Finding(KIND, WHOLE_MODEL, evidence, ADVICE)]
