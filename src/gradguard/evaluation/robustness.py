"""Robust accuracy the honest way: the documented home of ``evaluate`` / ``evaluate_curve`` and their results.

The protocol follows AutoAttack (Croce & Hein, ICML 2020): samples the model already misclassifies are never
attacked (they count as not robust); each attack runs only on the samples every earlier attack failed on; a
sample is robust only if no attack found an adversarial point for it. Every point an attack returns is projected
onto the threat model (a no-op for a correct attack) and re-scored by the model itself, so the numbers never
depend on an attack's own bookkeeping.

The code lives in smaller modules; this one re-exports the names it used to hold, so
``gradguard.evaluation.robustness`` keeps working:

- ``results.py``: ``RobustnessReport``, ``RobustnessCurve``, ``per_class_table``, ``threat_of`` (JSON in and out);
- ``cascade.py``: ``Cascade``, ``BlockOutcome``, ``NOT_BROKEN``;
- ``pipeline.py``: ``evaluate`` (stream -> cascade -> journal -> report), ``output_width``, ``chance_warnings``;
- ``curve.py``: ``evaluate_curve``;
- ``randomness.py``: the determinism measurement and ``randomness_warnings``;
- ``stream.py``: ``collect_data``.
"""
from __future__ import annotations

from .cascade import NOT_BROKEN, BlockOutcome, Cascade
from .curve import evaluate_curve
from .pipeline import chance_warnings, evaluate, output_width
from .randomness import randomness_warnings
from .results import RobustnessCurve, RobustnessReport, per_class_table, threat_of
from .stream import collect_data

__all__ = ["NOT_BROKEN", "BlockOutcome", "Cascade", "evaluate_curve", "chance_warnings", "evaluate", "output_width",
           "randomness_warnings", "RobustnessCurve", "RobustnessReport", "per_class_table", "threat_of",
           "collect_data"]
