"""gradguard.evaluation: honest robust accuracy — attack suites, per-sample worst case, accuracy vs eps; streamed
block by block, journaled and resumable."""
from .journal import model_fingerprint
from .robustness import RobustnessCurve, RobustnessReport, evaluate, evaluate_curve, per_class_table
from .suites import ATTACKS, SUITES, AttackSpec, get_suite, resolve_suite

__all__ = ["evaluate", "evaluate_curve", "RobustnessReport", "RobustnessCurve", "SUITES", "ATTACKS", "get_suite",
           "resolve_suite", "AttackSpec", "per_class_table", "model_fingerprint"]
