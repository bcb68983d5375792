"""gradguard.diagnostics: gradient health while training (GradientMonitor), curvature, gradient masking."""
from .curvature import (
    DensityEstimate,
    EigenEstimate,
    EigenvaluesEstimate,
    InputCurvatureSummary,
    SharpnessTracker,
    TraceEstimate,
    hessian_density,
    hessian_eigenvalues,
    hessian_power_iteration,
    hessian_trace,
    input_curvature,
    input_curvature_distribution,
    top_hessian_eigenvalue,
)
from .gradflow import (
    FATAL_KINDS,
    Finding,
    GradientHealthWarning,
    GradientMonitor,
    TrainingStopped,
    findings_from_records,
    load_gradflow,
)
from .masking import Check, MaskingReport, check_masking

__all__ = ["DensityEstimate", "EigenEstimate", "EigenvaluesEstimate", "InputCurvatureSummary", "SharpnessTracker",
           "TraceEstimate", "hessian_density", "hessian_eigenvalues", "hessian_power_iteration", "hessian_trace",
           "input_curvature", "input_curvature_distribution", "top_hessian_eigenvalue", "FATAL_KINDS", "Finding",
           "GradientHealthWarning", "TrainingStopped",
           "GradientMonitor", "findings_from_records", "load_gradflow", "Check", "MaskingReport", "check_masking"]
