"""Everything at once (``gradguard diagnose --curvature``): ``curvature_summary``, one JSON-ready dict with the
top-k eigenvalues, trace, density, the per-layer table and the input-curvature distribution.
"""
from __future__ import annotations

import time
from typing import Iterable

from torch import Tensor, nn

from .hvp import LossFn
from .inputs import input_curvature_distribution
from .spectrum import DensityEstimate, EigenvaluesEstimate, hessian_density, hessian_eigenvalues
from .trace import TraceEstimate, hessian_trace


def curvature_summary(model: nn.Module, x: Tensor, y: Tensor, *,
                      input_data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]] | None = None,
                      k: int = 5, iters: int = 60, tol: float = 1e-3, trace_probes: int = 60, trace_tol: float = 2e-2,
                      density_steps: int = 40, density_runs: int = 1, layer_iters: int = 20, seed: int = 0,
                      loss_fn: LossFn | None = None) -> dict:
    """Top-k eigenvalues, trace, density and the per-layer table on (x, y), and the input-curvature
    distribution over ``input_data`` (default (x, y)), as one JSON-ready dict with each result's cost."""
    began = time.perf_counter()
    top = hessian_eigenvalues(model, x, y, k=k, iters=iters, tol=tol, seed=seed, loss_fn=loss_fn)
    trace = hessian_trace(model, x, y, iters=trace_probes, tol=trace_tol, seed=seed, deflation=trace_probes // 3,
                          loss_fn=loss_fn)
    density = hessian_density(model, x, y, n_v=density_runs, m=density_steps, seed=seed, loss_fn=loss_fn)
    assert isinstance(top, EigenvaluesEstimate) and isinstance(trace, TraceEstimate)
    assert isinstance(density, DensityEstimate)
    layer_top = hessian_eigenvalues(model, x, y, k=1, iters=layer_iters, tol=tol, per_layer=True, seed=seed,
                                    loss_fn=loss_fn)
    layer_trace = hessian_trace(model, x, y, iters=layer_iters, tol=trace_tol, per_layer=True, seed=seed,
                                deflation=layer_iters // 3, loss_fn=loss_fn)
    assert isinstance(layer_top, dict) and isinstance(layer_trace, dict)
    inputs = input_curvature_distribution(model, input_data if input_data is not None else (x, y), loss_fn=loss_fn)
    return {
        "n_samples": int(x.shape[0]),
        "parameters": top.dimension,
        "top_hessian_eigenvalue": top.values[0],
        "top_eigenvalues": {"values": top.values, "residuals": top.residuals, "products": top.iterations,
                            "converged": top.converged, "seconds": top.elapsed_s, "method": "lanczos"},
        "trace": {"value": trace.value, "standard_error": trace.standard_error, "products": trace.iterations,
                  "converged": trace.converged, "seconds": trace.elapsed_s,
                  "method": f"hutchinson, deflated by {trace_probes // 3} Lanczos vectors"},
        "density": {"nodes": density.nodes, "weights": density.weights, "grid": density.grid,
                    "density": density.density, "sigma": density.sigma, "products": density.iterations,
                    "seconds": density.elapsed_s, "method": "slq"},
        "per_layer": [{"layer": name, "parameters": layer_top[name].dimension,
                       "top_eigenvalue": layer_top[name].values[0], "trace": layer_trace[name].value,
                       "trace_standard_error": layer_trace[name].standard_error} for name in layer_top],
        "input_curvature": {**inputs.to_dict(), "values": inputs.values.tolist()},
        "input_curvature_mean": inputs.mean,
        "seconds": time.perf_counter() - began,
    }
