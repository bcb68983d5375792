"""Is the model randomised at test time? Two identical forward passes, compared.

``measure_determinism`` returns the numbers (the largest relative logit change and the fraction of predictions that
flip between two identical calls). The masking checklist grades them (``gradguard.diagnostics.masking``, the
``deterministic`` check); ``evaluate`` warns with them (``randomness_warnings``) when a named suite would judge a
random model on one draw. The thresholds are ``signals.NON_DETERMINISM``. The measurement lives here, below
diagnostics, so evaluation never imports the checklist.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..threat import ThreatModel
from .signals import NON_DETERMINISM, logit_changes


def measure_determinism(model: nn.Module, x: Tensor, batch_size: int) -> tuple[float, float]:
    """``(max_relative_logit_change, prediction_flips)`` between two identical passes over ``x``: the largest
    logit change over the largest logit scale (inf when a change is not finite), and the fraction of flips."""
    changes = logit_changes(model, x, batch_size)
    scale = float(changes.scale.max().clamp_min(1e-12))
    change = float(changes.change.max()) / scale if bool(torch.isfinite(changes.change).all()) else float("inf")
    flips = float(changes.flipped.float().mean())
    return change, flips


def randomness_warnings(model: nn.Module, x: Tensor, threat: ThreatModel, suite: Any) -> list[str]:
    """The masking checklist's determinism check on one block, for a named suite other than "rand": a model whose
    logits change between identical calls (the check FAILs) needs EOT and majority votes, which "rand" runs.
    (``threat`` is not used by the measurement; it stays in the signature ``evaluate`` calls.)"""
    if not isinstance(suite, str) or suite == "rand":
        return []
    change, flips = measure_determinism(model, x, x.shape[0])
    if not change > NON_DETERMINISM[1]:  # a WARN is float non-determinism (GPU kernels), not a randomised defence
        return []
    note = (f"the model is randomised (its logits change by up to {change:.2g} "
            f"between identical calls; {100 * flips:.0f} % of predictions flip): "
            f"suite {suite!r} judges each sample on one draw, which overstates robustness; evaluate with "
            "suite='rand' (EOT over 20 draws, success by majority vote)")
    warnings.warn(f"evaluate: {note}", stacklevel=3)
    return [note]
