"""What the gradient-masking checklist and the "adaptive" suite's evidence share: the thresholds (fractions of the
checked samples), the causes a failed check points to with the adaptive attack each calls for (Tramèr et al.
2020), and the per-sample measurements both take (two identical passes, CE and margin input gradients, whether an
attack's loss rose). It lives below both (``gradguard.diagnostics.masking`` grades, ``evaluation.evidence``
escalates), so the two judge alike and neither imports the other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..attacks.base import input_gradient
from ..attacks.losses import cross_entropy, margin

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
SEVERITY = {PASS: 0, WARN: 1, FAIL: 2}

# Thresholds: (warn above, fail above), as fractions of the checked samples.
PGD_WORSE_THAN_FGSM = (0.01, 0.05)      # PGD accuracy minus FGSM accuracy
NOT_MONOTONE = (0.02, 0.05)             # largest rise of PGD accuracy when eps grows
UNBOUNDED_ACCURACY = (0.02, 0.10)       # PGD accuracy when the ball covers the whole box
NOT_CONVERGED = (0.05, 0.15)            # accuracy drop when steps and restarts are doubled
SQUARE_STRONGER = (0.02, 0.05)          # PGD accuracy minus Square accuracy
NOISE_ONLY = (0.01, 0.03)               # samples random noise breaks but PGD does not
ZERO_GRADIENTS = (0.10, 0.50)           # samples with a zero or non-finite input gradient
LOSS_FLAT = (0.10, 0.50)                # samples whose loss does not rise along the attack path
NON_DETERMINISM = (1e-6, 1e-4)          # largest relative logit change between two identical forward passes

EPS_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)

# What the checks point to, and the adaptive attack each FAIL names next (Tramèr et al. 2020, "On adaptive attacks").
RANDOM, SATURATED, SHATTERED, MISLEADING, UNCONVERGED = "random", "saturated", "shattered", "misleading", "unconverged"
NEXT_ATTACK = {
    RANDOM: "EOT — average the gradient over the model's randomness (eot_samples=20 on any gradient attack, or "
            "the 'rand' suite: APGD-CE and APGD-DLR with EOT 20)",
    SATURATED: "a margin loss — the softmax saturates and CE gradients underflow while logit differences still "
               "have gradients: APGD-DLR / APGD-T (the 'standard' suite) or loss='margin'",
    SHATTERED: "BPDA — attack nn.Sequential(gradguard.attacks.BPDA(preprocess), model): the non-differentiable "
               "layer forward, a differentiable stand-in (identity) backward",
    MISLEADING: "BPDA on the layer that obstructs the gradient, or a transfer attack from a smooth surrogate "
                "(gradguard.attacks.Transfer)",
    UNCONVERGED: "more steps and restarts, or APGD-CE (the 'standard' suite runs APGD-CE with 100 steps)",
}



# ------------------------------------------------------------------------------------------------
# Per-sample measurements shared with the "adaptive" evaluation suite (gradguard.evaluation.evidence)
# ------------------------------------------------------------------------------------------------
@dataclass
class LogitChanges:
    """Two identical forward passes, per sample: the largest absolute logit change, the largest absolute logit of
    the first pass (the scale), and whether the prediction flipped."""

    change: Tensor
    scale: Tensor
    flipped: Tensor


@torch.no_grad()
def logit_changes(model: nn.Module, x: Tensor, batch_size: int) -> LogitChanges:
    """The determinism measurement: ``x`` through ``model`` twice, compared sample by sample."""
    first = torch.cat([model(b) for b in x.split(batch_size)])
    second = torch.cat([model(b) for b in x.split(batch_size)])
    change = (first - second).abs().amax(dim=1)
    change = torch.where(torch.isfinite(first).all(dim=1), change, torch.full_like(change, float("inf")))
    return LogitChanges(change, first.abs().amax(dim=1), first.argmax(1) != second.argmax(1))


@dataclass
class GradientHealth:
    """Per sample: the flattened input gradients of CE and of the logit margin at ``x``, whether each is finite and
    non-zero (``*_live``), and whether the CE one is finite."""

    ce: Tensor
    margin: Tensor
    ce_finite: Tensor
    ce_live: Tensor
    margin_live: Tensor


def gradient_health(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> GradientHealth:
    """The zero-gradient measurement: CE and margin input gradients (zero CE but live margin gradients: a saturated
    softmax; both zero: shattered gradients). Two gradients per sample."""
    ce_grads, margin_grads = [], []
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        ce_grads.append(input_gradient(model, xb, yb, cross_entropy, False)[0])
        margin_grads.append(input_gradient(model, xb, yb, margin, False)[0])
    ce = torch.cat(ce_grads).reshape(x.shape[0], -1)
    margin_flat = torch.cat(margin_grads).reshape(x.shape[0], -1)
    finite = torch.isfinite(ce).all(dim=1)
    return GradientHealth(ce, margin_flat, finite, finite & (ce.abs().amax(dim=1) > 1e-20),
                          torch.isfinite(margin_flat).all(dim=1) & (margin_flat.abs().amax(dim=1) > 1e-20))


def loss_rose(start: Tensor, best: Tensor) -> Tensor:
    """Per sample: did the attack loss rise above its starting value (by more than float noise)?"""
    return best > start + 1e-3 * start.abs() + 1e-6
