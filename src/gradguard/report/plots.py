"""The report's figures, now drawn by ``gradguard.viz`` (re-exported here: ``report.builder`` and the workflow
name them as ``report.plots``)."""
from __future__ import annotations

from ..viz import PALETTE, series_colours
from ..viz.certify import certified_accuracy
from ..viz.curvature import hessian_density, input_curvature_histogram
from ..viz.robustness import accuracy_vs_eps, example_grid, per_attack_bars, per_class_bars
from ..viz.training import gradient_flow, training_curves

__all__ = ["PALETTE", "series_colours", "accuracy_vs_eps", "per_attack_bars", "per_class_bars", "example_grid",
           "training_curves", "gradient_flow", "certified_accuracy", "hessian_density", "input_curvature_histogram"]
