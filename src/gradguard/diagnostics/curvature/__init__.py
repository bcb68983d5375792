"""Second-order diagnostics: the loss Hessian's top eigenvalue and input-space curvature.

- ``top_hessian_eigenvalue``: power iteration on Hessian-vector products H·v = ∇_θ(∇_θ L · v) (double
  backward, Pearlmutter 1994), the method of PyHessian (Yao et al. 2020). Sharp minima (large λ_max) go with
  poor generalisation and a small stable learning rate (SGD diverges beyond lr ≈ 2/λ_max).
- ``input_curvature``: curvature of each sample's loss along its own input gradient, ĝᵀ H_x ĝ with
  ĝ = g/‖g‖, by a central finite difference of gradients (Moosavi-Dezfooli et al. 2019, CURE) or an exact
  double-backward HVP. Adversarial training lowers it; a large value means the loss bends sharply and
  linear attacks (FGSM) underestimate it.

Both leave the model as they found it: they run in eval mode (BatchNorm statistics are not updated) and
restore each module's mode, take gradients with ``torch.autograd.grad`` only (``.grad`` is never touched) and
never change ``requires_grad``.

The package, one estimator family per module (``hvp``: the Hessian-vector-product operator the others share;
``spectrum``: top eigenvalue, top-k, density; ``trace``; ``inputs``: input curvature; ``sharpness``: the
edge-of-stability tracker; ``summary``: everything at once), re-exports the public names of the former
``diagnostics/curvature.py`` here. ``LANCZOS_BASIS_BYTES`` is a copy: patch ``curvature.spectrum``'s.
"""
from .hvp import LossFn, per_sample_cross_entropy
from .inputs import InputCurvatureSummary, input_curvature, input_curvature_distribution
from .sharpness import SharpnessTracker
from .spectrum import (
    LANCZOS_BASIS_BYTES,
    DensityEstimate,
    EigenEstimate,
    EigenvaluesEstimate,
    hessian_density,
    hessian_eigenvalues,
    hessian_power_iteration,
    top_hessian_eigenvalue,
)
from .summary import curvature_summary
from .trace import TraceEstimate, hessian_trace

__all__ = ["DensityEstimate", "EigenEstimate", "EigenvaluesEstimate", "InputCurvatureSummary", "LANCZOS_BASIS_BYTES",
           "LossFn", "SharpnessTracker", "TraceEstimate", "curvature_summary", "hessian_density",
           "hessian_eigenvalues", "hessian_power_iteration", "hessian_trace", "input_curvature",
           "input_curvature_distribution", "per_sample_cross_entropy", "top_hessian_eigenvalue"]
