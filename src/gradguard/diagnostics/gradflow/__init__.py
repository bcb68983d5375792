"""Gradient health while training: per-layer gradient, weight and update norms, dead and saturated units.

``GradientMonitor`` watches a model through hooks only. Every ``every``-th training step it records, for each
parameterised module ("layer"):

- ``grad_norm`` / ``grad_max``: L2 norm and max |g| of the layer's parameter gradients, as the optimiser sees
  them (after any clipping, which is what moves the weights);
- ``weight_norm`` and ``update_ratio`` = ‖Δθ‖ / ‖θ‖ across the optimiser step;
- activation statistics of the layer's output as it passes through the next activation module:
  ``dead_fraction`` (ReLU units never positive over the sampled batch) and ``saturated_fraction``
  (sigmoid/tanh outputs where the local derivative is below 5 % of its maximum).

The model's hooks are registered just before a sampled step and removed after it, so the other steps run
exactly as without the monitor (only ``step()``, or the optimiser's step hook, counts). ``findings()`` turns
the records into ``Finding`` objects (vanishing, exploding, dead, saturated, stalled) with the numbers behind
them and the usual fix. The thresholds, measured on the demo models in ``bench/diagnostics_calibration.py``,
live in ``diagnostics/health.py`` (shared with the plots); the measured values are listed in docs/diagnose.md.

The package (this module re-exports its public names, the documented path):

- ``monitor.py``: ``GradientMonitor`` (lifecycle, hooks, step, ``on_finding`` actions, curvature schedule);
- ``measure.py``: ``LayerStats``, what a sampled step measures per layer (``kernels.py``: its fused tensor work);
- ``records.py``: ``RecordTable``, the records as the rules and the calibration benchmarks read them;
  ``load_gradflow``;
- ``rules/``: one finding kind per file, ``RULES``, ``KINDS``, ``ADVICE`` and ``findings_from_records``;
- ``..findings``: ``Finding``, ``GradientHealthWarning``, ``TrainingStopped`` (shared with the integrations).
"""
from __future__ import annotations

from ..curvature import LossFn, SharpnessTracker
from ..findings import WHOLE_MODEL, Finding, GradientHealthWarning, TrainingStopped
from ..health import (
    DEAD_FRACTION,
    EXPLODING_BEFORE_OVERFLOW,
    EXPLODING_GROWTH,
    EXPLODING_JUMP,
    FATAL_KINDS,
    INPUT_RMS_LIMIT,
    LR_HIGH_RATIO,
    LR_LOW_LOSS_CHANGE,
    LR_LOW_RATIO,
    NOT_LEARNING_DIVERGED,
    NOT_LEARNING_GROWTH,
    NOT_LEARNING_RATIO,
    RECENT_SAMPLES,
    SATURATED_FRACTION,
    SATURATION_DERIVATIVE,
    STALLED_FACTOR,
    START_SAMPLES,
    VANISHING_DROP,
    VANISHING_RATIO,
    layer_order,
)
from ..plots import plot_all
from .measure import RELU_TYPES, SIGMOID_MARGIN, SIGMOID_TYPES, TANH_LIMIT, TANH_TYPES
from .monitor import GradientMonitor
from .records import RecordTable, depth_ends, load_gradflow
from .rules import ADVICE, KINDS, RULES, findings_from_records
from .rules.not_learning import not_learning_level

__all__ = [
    "ADVICE", "KINDS", "RULES", "WHOLE_MODEL", "FATAL_KINDS", "Finding", "GradientHealthWarning", "GradientMonitor",
    "RecordTable", "TrainingStopped", "depth_ends", "findings_from_records", "load_gradflow", "not_learning_level",
    "RELU_TYPES", "SIGMOID_TYPES", "TANH_TYPES", "SIGMOID_MARGIN", "TANH_LIMIT", "LossFn", "SharpnessTracker",
    "plot_all", "layer_order",
    "DEAD_FRACTION", "EXPLODING_BEFORE_OVERFLOW", "EXPLODING_GROWTH", "EXPLODING_JUMP", "INPUT_RMS_LIMIT",
    "LR_HIGH_RATIO", "LR_LOW_LOSS_CHANGE", "LR_LOW_RATIO", "NOT_LEARNING_DIVERGED", "NOT_LEARNING_GROWTH",
    "NOT_LEARNING_RATIO", "RECENT_SAMPLES", "SATURATED_FRACTION", "SATURATION_DERIVATIVE", "STALLED_FACTOR",
    "START_SAMPLES", "VANISHING_DROP", "VANISHING_RATIO",
]
