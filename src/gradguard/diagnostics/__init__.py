"""gradguard.diagnostics: gradient health while training (GradientMonitor), curvature, gradient masking."""
from .curvature import EigenEstimate, hessian_power_iteration, input_curvature, top_hessian_eigenvalue
from .gradflow import Finding, GradientMonitor, findings_from_records, load_gradflow
from .masking import Check, MaskingReport, check_masking

__all__ = ["EigenEstimate", "hessian_power_iteration", "input_curvature", "top_hessian_eigenvalue", "Finding",
           "GradientMonitor", "findings_from_records", "load_gradflow", "Check", "MaskingReport", "check_masking"]
