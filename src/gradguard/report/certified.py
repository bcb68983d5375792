"""The certified part of summary.json: per model with certify.json, its randomized-smoothing settings and the
certified accuracy at the standard radii (and at the L2 eps of its evaluation), beside its empirical robust accuracy.

Its own module because it is data, not rendering: ``builder`` puts it into summary.json and draws the certified
section from it, ``markdown`` tabulates it.
"""
from __future__ import annotations

from .rundir import RunData, threat_label

CERTIFIED_RADII = (0.25, 0.5, 0.75, 1.0)


def certified_summary(run: RunData) -> list[dict]:
    """Per model with certify.json: its settings and certified accuracy at the standard radii (for summary.json)."""
    rows = []
    for m in run.models:
        c = m.certify
        if not c or "samples" not in c:
            continue
        eps = _l2_eps(m)
        radii = sorted(set(CERTIFIED_RADII) | ({eps} if eps is not None else set()))
        rows.append({"label": m.label, "sigma": c.get("sigma"), "n0": c.get("n0"), "n": c.get("n"),
                     "alpha": c.get("alpha"), "n_samples": c.get("n_samples"),
                     "base_clean_accuracy": c.get("base_clean_accuracy"),
                     "smoothed_accuracy": _certified_at(c, 0.0), "abstain_rate": c.get("abstain_rate"),
                     "certified_accuracy": {f"{r:g}": _certified_at(c, r) for r in radii},
                     "empirical": _empirical(m), "guarantee": "smoothed classifier, not the base model"})
    return rows


def _certified_at(certify: dict, radius: float) -> float | None:
    samples = certify["samples"]
    pairs = list(zip(samples["prediction"], samples["label"], samples["radius"], strict=True))
    if not pairs:
        return None
    return sum(1 for p, y, r in pairs if p == y and r >= radius) / len(pairs)


def _l2_eps(m) -> float | None:
    """The eps of the model's evaluation when it was in L2 (certified accuracy is then shown at that radius too)."""
    threat = (m.robustness or {}).get("threat") or {}
    eps = threat.get("eps")
    return float(eps) if str(threat.get("norm")).lower() == "l2" and isinstance(eps, (int, float)) else None


def _empirical(m) -> dict | None:
    if not m.robustness or m.robustness.get("robust_accuracy") is None:
        return None
    return {"robust_accuracy": m.robustness["robust_accuracy"], "threat": threat_label(m.robustness.get("threat"))}
