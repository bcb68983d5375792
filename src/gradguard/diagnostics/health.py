"""Gradient health in numbers: the calibrated thresholds and the depth order of a run's layers.

Both the findings (``gradflow``) and the plots (``plots``) read these, so they live apart from either and the
imports go one way: gradflow -> plots -> health, gradflow -> health.
"""
from __future__ import annotations

import math
from typing import Iterable

# ------------------------------------------------------------------------------------------------
# Thresholds. Each is set from measurements on the demo models (bench/diagnostics_calibration.py) and the labelled
# fault benchmark over MLP/CNN/BN-ResNet/ViT (bench/diagnostics_faults.py: 100 % recall on every planted fault, 0 of
# 80 healthy runs flagged); the measured values are in docs/diagnose.md, next to why each threshold sits where it does.
# ------------------------------------------------------------------------------------------------
# Vanishing: first-layer gradient RMS / last-layer gradient RMS (median of recent samples). Measured: healthy
# demo nets (ReLU + He, ReLU + BatchNorm, 12 layers; small MLP and CNN; tanh-4) 0.23-3.5, the benchmark's ResNets and
# ViTs down to 0.018; the 12-layer sigmoid MLPs <= 5.1e-10, the planted sigmoid stacks <= 8.2e-8.
VANISHING_RATIO = 1e-3
# Vanishing over time: the first/last ratio fell by this factor from the start of training to recently.
# Measured: healthy demo runs change it by at most ~3x.
VANISHING_DROP = 1e3
# Exploding: the model's total (applied) gradient norm peaked at this factor above its start (median of the
# first samples), or one sample exceeded the median of the samples before it by this factor. Measured:
# healthy runs grow <= 27x and jump <= 8x; SGD at lr=2 without clipping grows 2.8e4-2e14x (1e3 is near
# the geometric middle). SGD at lr=1 grows 43-754x before its ReLUs die (reported as "dead").
EXPLODING_GROWTH = 1e3
EXPLODING_JUMP = 1e3
# Exploding into overflow: a gradient (not the input) turned NaN/inf and, over the finite samples before, the
# total gradient norm had grown by at least this factor while the loss rose above its start: a diverging run, not
# a stray log(0). Measured (bench/diagnostics_faults.py): the Fashion-MNIST ViT at SGD lr 1 grows 55-890x and then
# overflows between two samples (before the 1e3 growth rule can see it); healthy runs grow <= 27x, but their loss
# falls; the planted NaN-pixel runs grow <= 2x.
EXPLODING_BEFORE_OVERFLOW = 10.0
# Dead: fraction of a ReLU layer's units never positive over the sampled batch. Measured: healthy demo nets
# <= 0.48 (the small CNN's 2048->64 layer under Adam; it still reaches 95 % accuracy); bias -5 or a
# diverged run: 1.0; SGD lr=2 with clipping at 0.3: 0.72-0.75 (0.66-0.73 dead over all inputs, 79-88 % accuracy).
DEAD_FRACTION = 0.7
# Measured per sampled batch: with small batches a unit that fires for few inputs looks dead. The Fashion-MNIST demo's
# 8-layer ReLU/He MLP at SGD 0.05, batch 32, shows 0.72-0.81 dead per batch in its first layer and 0.34-0.41 over all
# 10k training inputs, at 72 % test accuracy — a damaged run (a third seed collapses to 20 %, 0.66-0.91 dead over all
# inputs), so the finding stands; a union over several batches was tried and dropped: it let a BatchNorm ResNet with
# shift -5 (chance-level loss) pass as alive on Fashion-MNIST in 2 of 5 seeds.
# Saturated: fraction of sigmoid/tanh outputs whose derivative is below SATURATION_DERIVATIVE of its maximum.
# Measured: default-init sigmoid-12 0.0, tanh-4 0.10-0.22; tanh-4 with N(0, 1) weights 0.96-0.97, the benchmark's
# planted tanh layers >= 0.71.
SATURATED_FRACTION = 0.4
SATURATION_DERIVATIVE = 0.05
# Stalled: a layer's update ratio ‖Δθ‖/‖θ‖ is below this fraction of the median over all layers. Measured:
# healthy runs (SGD and Adam) keep every layer >= 0.059 of the median (BatchNorm's own weights are the
# low end); the sigmoid-12 MLP puts its first layer at <= 5.1e-7 (SGD) and <= 3.5e-3 (Adam) of it.
STALLED_FACTOR = 1e-2
# Learning rate too high: the whole model's update ratio ‖Δθ‖/‖θ‖ (median of the recent samples) above this
# (an update that moves the weights by a tenth of their size every step). Karpathy's rule of thumb puts healthy
# runs near 1e-3.
LR_HIGH_RATIO = 1e-1
# Learning rate too low: the whole model's update ratio below this while the loss moves by less than
# LR_LOW_LOSS_CHANGE (relative, median of the first samples against the median of the recent ones). Measured
# (bench/diagnostics_faults.py): batch-to-batch noise moves a frozen model's loss by up to 3.1 % on 64-image
# batches, so 1 % missed 3 of 4 frozen runs; healthy runs have ratios >= 1.8e-3, Adam at lr 1e-9 <= 1.5e-8.
LR_LOW_RATIO = 1e-6
LR_LOW_LOSS_CHANGE = 5e-2
# Not learning: after START_SAMPLES + RECENT_SAMPLES samples, ``ratio`` = the recent median loss / the higher of its
# start (median of the first samples) and the chance loss ln(C) (C = the width of the model's 2-D output, when it
# has one; a model guessing uniformly scores ln(C) under cross-entropy). Flagged when ratio >= NOT_LEARNING_RATIO and
# the total gradient norm peaked >= NOT_LEARNING_GROWTH x above its start (thrown off by a too-large step and stuck at
# or above chance), or when ratio >= NOT_LEARNING_DIVERGED whatever the gradient did (the loss rose clearly above
# both: diverged). The loss alone cannot tell a stuck run from a slow starter within 100 steps
# (bench/diagnostics_faults.py): the digits ViT under SGD 0.02 hovers at chance (ratio up to 1.016, its gradient
# flat) and frozen or dead models reach 1.031 from batch noise, while the planted CNN at SGD lr 2 sits at
# 1.007-1.105. The gradient tells them apart: healthy runs with ratio >= 0.95 grow it <= 2.5x (frozen ones <= 2.6x),
# healthy runs growing >= 4x are learning (ratio <= 0.945), and 19 of the 20 planted runs spike 5.9-1.3e5x; the
# 20th (3.0x, its ReLUs dead) sits at ratio 1.07. The measured distributions are in docs/diagnose.md.
NOT_LEARNING_RATIO = 1.0
NOT_LEARNING_GROWTH = 4.0
NOT_LEARNING_DIVERGED = 1.05
# Inputs not normalised: RMS of the first layer's input (median over samples) above this. Standardised inputs
# have RMS ~1 and [0, 1] pixels ~0.3-0.5; pixels left in 0-255 have RMS ~70-120.
INPUT_RMS_LIMIT = 10.0
# Findings that mean the run is broken: GradientMonitor(on_finding="stop") stops at these, the report marks them FAIL.
FATAL_KINDS = frozenset({"nonfinite", "exploding"})
# How many of the latest samples form "recent" (medians resist one noisy batch) and the earliest "start".
RECENT_SAMPLES = 5
START_SAMPLES = 3


def layer_order(records: Iterable[dict]) -> list[str]:
    """Layer names of gradient-health records in depth order: the order the forward pass ran them
    (``forward_index``), else their registration ``index``, else first seen. Layers that never ran come last."""
    position: dict[str, tuple[float, int]] = {}
    for record in records:
        forward = record.get("forward_index")
        known = position.get(record["layer"])
        if known is None or (known[0] == math.inf and forward is not None):
            position[record["layer"]] = (forward if forward is not None else math.inf,
                                         record.get("index", len(position)))
    return sorted(position, key=lambda layer: position[layer])
