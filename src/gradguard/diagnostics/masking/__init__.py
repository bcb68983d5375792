"""The gradient-masking checklist: automatic sanity checks on a robustness evaluation.

A model can look robust because its gradients are useless to the attacker (saturated softmax, rounding or other
non-differentiable layers, randomness), not because it is robust. Athalye, Carlini & Wagner (ICML 2018, §3.1)
and Carlini et al. ("On Evaluating Adversarial Robustness", 2019, §§4-5) list the tell-tale signs; each becomes
one check here, run on a small subset with small budgets, and reported as PASS / WARN / FAIL with the measured
numbers and one line of advice. The verdict is the worst status.

Black-box and noise attacks are compared with the strongest white-box attack the checklist ran (the lowest
accuracy among FGSM, PGD, PGD with doubled budget and APGD-CE), so a PGD that merely has not converged reads as
"a weak white-box attack" (WARN: use more steps or APGD), and only a black-box attack that beats APGD-CE too reads
as "masked gradients" (FAIL). Every FAIL names the adaptive attack to run next, from what the other checks saw:
EOT for a random model, BPDA for shattered (zero) gradients, a margin loss for a saturated softmax, more steps /
APGD for an attack that has not converged (Athalye et al. 2018, §5; Tramèr et al., NeurIPS 2020).

Thresholds (fractions of the correctly classified samples checked) were tuned on honest and deliberately masked
models (tests/test_masking.py): honest MLPs/CNNs stay well inside them, masked models land far outside.

The package: ``report.py`` holds what the checklist returns (``Check``, ``MaskingReport``, ``format_evidence``),
``checks.py`` the checklist itself (``check_masking`` and its probe); this module re-exports both, with the
thresholds of ``gradguard.evaluation.signals``.
"""
from __future__ import annotations

# The thresholds, the causes and the adaptive attack each cause calls for live in gradguard.evaluation.signals, with
# the per-sample measurements the checklist shares with the "adaptive" suite; re-exported here.
from ...evaluation.signals import (
    EPS_MULTIPLIERS,
    FAIL,
    LOSS_FLAT,
    MISLEADING,
    NEXT_ATTACK,
    NOISE_ONLY,
    NON_DETERMINISM,
    NOT_CONVERGED,
    NOT_MONOTONE,
    PASS,
    PGD_WORSE_THAN_FGSM,
    RANDOM,
    SATURATED,
    SEVERITY,
    SHATTERED,
    SQUARE_STRONGER,
    UNBOUNDED_ACCURACY,
    UNCONVERGED,
    WARN,
    ZERO_GRADIENTS,
    gradient_health,
    loss_rose,
)
from .checks import check_masking
from .report import Check, MaskingReport, format_evidence

__all__ = ["Check", "MaskingReport", "check_masking", "format_evidence", "EPS_MULTIPLIERS", "FAIL", "LOSS_FLAT",
           "MISLEADING", "NEXT_ATTACK", "NOISE_ONLY", "NON_DETERMINISM", "NOT_CONVERGED", "NOT_MONOTONE", "PASS",
           "PGD_WORSE_THAN_FGSM", "RANDOM", "SATURATED", "SEVERITY", "SHATTERED", "SQUARE_STRONGER",
           "UNBOUNDED_ACCURACY", "UNCONVERGED", "WARN", "ZERO_GRADIENTS", "gradient_health", "loss_rose"]
