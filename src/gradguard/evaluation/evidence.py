"""Evidence that a cheap evaluation may be wrong about a model, measured per sample along the way.

The automatable failure indicators of Pintor et al. (NeurIPS 2022, "Indicators of attack failure") and of
AutoAttack's checks, each reduced to one bit per sample that the "adaptive" suite (``adaptive.py``) sets while it
attacks, and one model-level verdict (the fraction of checked samples above a threshold). The measurements of the
gradient-masking checklist are shared with it through ``signals.py`` (``logit_changes``,
``gradient_health``, ``loss_rose`` and its thresholds), so the checklist and the suite judge alike.

Each indicator names the escalations it calls for (``CALLS_FOR``): a sample whose bit is set gets them; when the
fraction over the whole evaluation passes the threshold, every sample still robust gets them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..attacks.losses import margin
from ..threat import ThreatModel
from .signals import (
    LOSS_FLAT,
    NEXT_ATTACK,
    NON_DETERMINISM,
    RANDOM,
    SHATTERED,
    SQUARE_STRONGER,
    ZERO_GRADIENTS,
    gradient_health,
    logit_changes,
    loss_rose,
)


@dataclass(frozen=True)
class Indicator:
    """One piece of evidence: its bit, what it means, the model-level threshold (a fraction of the samples
    checked; 0 means any sample), the escalation stages it calls for, and whether it is measured by the black-box
    probe (then counted over the probed samples, not over all the checked ones)."""

    name: str
    bit: int
    meaning: str
    threshold: float
    calls_for: tuple[str, ...]
    by_probe: bool = False


# Escalation stage labels (the tail of SUITES["adaptive"]).
REST, FAB, SQUARE, EOT_CE, EOT_DLR, BPDA = "apgd-t-rest", "fab-t", "square", "apgd-ce-eot", "apgd-dlr-eot", "bpda"
SHATTERED_FRACTION = 0.10  # samples whose finite differences disagree with the gradient, before the model is flagged
FD_DISAGREEMENT = 0.5       # relative gap between a central difference and the gradient's directional derivative
FD_STEP = 1e-2              # the finite-difference step, as a fraction of eps (in the threat's norm)

INDICATORS = (
    Indicator("random", 0, "the logits change between two identical passes (a randomised model)",
              0.0, (EOT_CE, EOT_DLR)),
    Indicator("zero_gradient", 1, "the CE input gradient is zero or not finite while the logit margin's is not (a "
              "saturated softmax; margin losses, FAB and Square do not care about the scale)", ZERO_GRADIENTS[0],
              (REST, FAB, SQUARE)),
    Indicator("zero_margin_gradient", 2, "the logit-margin gradient is zero too: no loss has a gradient "
              "(rounding, quantisation)", ZERO_GRADIENTS[0], (SQUARE, BPDA)),
    Indicator("shattered", 3, "finite differences along the gradient disagree with its directional derivative",
              SHATTERED_FRACTION, (REST, SQUARE)),
    Indicator("loss_flat", 4, "APGD-CE's loss did not rise above its starting value (silent optimiser failure)",
              LOSS_FLAT[0], (REST, FAB, SQUARE)),
    Indicator("unstable_best", 5, "the best point found, re-scored, does not reproduce its logits or lies outside "
              "the threat model (randomness the two-pass check missed)", ZERO_GRADIENTS[0], (EOT_CE, EOT_DLR)),
    Indicator("black_box", 6, "the short Square probe broke a sample every white-box stage had left (fraction of "
              "the probed samples)", SQUARE_STRONGER[0], (REST, FAB, SQUARE), by_probe=True),
    # Not a sign of masking but of a verdict that is close: a per-sample call only (a model-level fraction of near
    # misses says nothing about the model's gradients), so its threshold is never passed.
    Indicator("close_call", 7, "the white-box core's best point left the sample less than close_call of its clean "
              "logit margin (a near miss: the likeliest to fall to the other targets, FAB-T or Square)",
              1.0, (REST, FAB, SQUARE)),
    # Per sample too: a minimum-norm search measured the boundary to be near in the threat's own norm (on a TRADES
    # model in L2, the sample only the reference's FAB-T broke was 2nd nearest of 63 by this distance).
    Indicator("near_boundary", 11, "FAB-T's core found an adversarial point within near_distance x eps (not within "
              "eps): FAB-T's other targets may find one inside", 1.0, (FAB,)),
    # Graded black-box evidence, per sample: random search is on its way (bench/results/adaptive-suite.md, fifth
    # round: the samples only a 5 000-query Square breaks are those its 500-query probe took furthest).
    Indicator("probe_progress", 10, "the short Square probe took the sample's logit margin below probe_progress of "
              "its clean margin, and within probe_rival x the white-box core's, without breaking it: random search "
              "is on its way and a match for the gradients there; a full Square may finish the job", 1.0, (SQUARE,),
              by_probe=True),
)
BY_NAME = {i.name: i for i in INDICATORS}
CHECKED_BIT = 1 << 8   # the sample survived APGD-CE, so the indicators were measured on it
PROBED_BIT = 1 << 9    # the sample was in the Square probe's random subset
RELATIVE_CHANGE = NON_DETERMINISM[1]  # the checklist's FAIL level for the determinism check


def bits(*names: str) -> int:
    """The evidence bitmask of the named indicators."""
    mask = 0
    for name in names:
        mask |= 1 << BY_NAME[name].bit
    return mask


def calls_for(stage: str) -> int:
    """The bitmask of the indicators that call for escalation ``stage``."""
    return bits(*(i.name for i in INDICATORS if stage in i.calls_for))


def at_clean_point(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, batch_size: int) -> tuple[Tensor, int]:
    """(evidence bitmask per sample, gradient passes spent) measured at the clean inputs: randomness (two passes),
    zero CE / margin gradients (two gradients, the checklist's own measurements) and shattered gradients (two
    more passes: a central difference of the margin along the threat norm's steepest-ascent direction)."""
    evidence = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    if x.shape[0] == 0:
        return evidence, 0
    random = randomised(model, x, batch_size)
    health = gradient_health(model, x, y, batch_size)
    evidence |= _bit(random, "random") | _bit(~health.ce_live, "zero_gradient")
    evidence |= _bit(~health.margin_live, "zero_margin_gradient")
    evidence |= _bit(health.margin_live & shattered(model, x, y, threat, health.margin.reshape(x.shape)),
                     "shattered")
    return evidence, 2


@torch.no_grad()
def randomised(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Per sample: do two identical passes disagree (prediction, or logits beyond the checklist's FAIL level)?"""
    changes = logit_changes(model, x, batch_size)
    return changes.flipped | ~(changes.change <= RELATIVE_CHANGE * changes.scale.clamp_min(1e-12))


@torch.no_grad()
def shattered(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, grad: Tensor) -> Tensor:
    """Per sample: does a central difference of the margin along the steepest-ascent step s (‖s‖ = FD_STEP·eps)
    disagree with the gradient's prediction ∇·s by more than FD_DISAGREEMENT (relative)? A smooth or piecewise
    linear model agrees to float precision; a non-differentiable or discontinuous one (k-winners-take-all,
    rounding, a gradient that is not the model's) does not."""
    step = threat.ascent_step(grad, FD_STEP * threat.eps)
    lo, hi = threat.bounds
    up, down = (x + step).clamp(lo, hi), (x - step).clamp(lo, hi)
    predicted = (grad * (up - down)).flatten(1).sum(1) / 2
    measured = (margin(model(up), y, False) - margin(model(down), y, False)) / 2
    gap = (measured - predicted).abs()
    return gap > FD_DISAGREEMENT * torch.maximum(predicted.abs(), measured.abs()).clamp_min(1e-12)


def close_call(best_margin: Tensor, clean_margin: Tensor, fraction: float) -> Tensor:
    """The evidence bit of the samples still robust whose smallest logit margin z_y − max_{j≠y} z_j over the
    white-box core's best points is below ``fraction`` of their clean margin (scale-free: a model's logits may
    be of any size)."""
    return _bit(best_margin < fraction * clean_margin, "close_call")


def near_boundary(min_distance: Tensor, eps: float, factor: float) -> Tensor:
    """The evidence bit of the samples a minimum-norm search (FAB) found an adversarial point for within
    ``factor`` x eps, though not within eps: the boundary is near in the threat's own norm."""
    return _bit(min_distance <= factor * eps, "near_boundary")


def probe_progress(probe_margin: Tensor, clean_margin: Tensor, white_box_margin: Tensor, fraction: float,
                   rival: float) -> Tensor:
    """The evidence bit of the samples the black-box probe left with a logit margin (still positive: it did not
    break them) below ``fraction`` of their clean margin and below ``rival`` x the smallest one the white-box core
    reached: random search went far, and about as far as the gradients (on an undefended model it goes far on
    most samples, but the gradients go much further)."""
    return _bit((probe_margin < fraction * clean_margin) & (probe_margin < rival * white_box_margin),
                "probe_progress")


def loss_flat(start: Tensor, best: Tensor) -> Tensor:
    """The evidence bit of the samples whose attack loss never rose (the checklist's ``loss_rose``)."""
    return _bit(~loss_rose(start, best), "loss_flat")


def unstable_best(found_logits: Tensor, found_x: Tensor, rescored_logits: Tensor, candidate: Tensor) -> Tensor:
    """The evidence bit of the samples whose best point does not reproduce: the re-scored logits differ from those
    the attack recorded there (prediction or relative change), or projecting the point moved it (unreachable)."""
    scale = found_logits.abs().amax(dim=1).clamp_min(1e-12)
    changed = (found_logits - rescored_logits).abs().amax(dim=1) > RELATIVE_CHANGE * scale
    changed |= found_logits.argmax(1) != rescored_logits.argmax(1)
    moved = (found_x - candidate).flatten(1).abs().amax(dim=1) > 1e-6
    return _bit(changed | moved, "unstable_best")


def _bit(mask: Tensor, name: str) -> Tensor:
    return mask.to(torch.int64) << BY_NAME[name].bit


def model_level(evidence: Tensor) -> dict[str, dict]:
    """Per indicator over a whole evaluation: samples checked, samples with the bit, the fraction, the threshold
    and whether the model as a whole is flagged (then its escalations run on every sample still robust)."""
    checked = (evidence & CHECKED_BIT) != 0
    probed = (evidence & PROBED_BIT) != 0
    out = {}
    for indicator in INDICATORS:
        base = probed if indicator.by_probe else checked
        fired = base & ((evidence >> indicator.bit) & 1).bool()
        n, k = int(base.sum()), int(fired.sum())
        fraction = k / n if n else 0.0
        out[indicator.name] = {"samples": k, "checked": n, "fraction": fraction, "threshold": indicator.threshold,
                               "model_level": n > 0 and k > 0 and fraction > indicator.threshold,
                               "meaning": indicator.meaning, "calls_for": list(indicator.calls_for)}
    return out


BPDA_NOTE = ("not run automatically: BPDA needs the non-differentiable layer itself; " + NEXT_ATTACK[SHATTERED])
RANDOM_NOTE = NEXT_ATTACK[RANDOM]
