"""The Hessian's trace by Hutchinson's estimator, optionally deflated by a Lanczos basis (Hutch++ with a Krylov
sketch), for the whole network or per leaf module's Hessian block.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ...checks import positive_int
from ...errors import ConfigError
from .hvp import LossFn, blocks, hessian_products, random_vector
from .spectrum import check_tol, lanczos


@dataclass
class TraceEstimate:
    """Hutchinson estimate of tr(H): the running mean over probes, its standard error and how it was reached."""

    value: float
    standard_error: float
    iterations: int
    converged: bool
    elapsed_s: float
    dimension: int


def hessian_trace(model: nn.Module, x: Tensor, y: Tensor, *, iters: int = 100, tol: float = 1e-2,
                  per_layer: bool = False, seed: int = 0, deflation: int = 0, loss_fn: LossFn | None = None,
                  batch_size: int | None = None) -> TraceEstimate | dict[str, TraceEstimate]:
    """tr(∇²_θ L) by Hutchinson's estimator E[zᵀHz] with Rademacher probes z (Hutchinson 1990; as in PyHessian).

    Stops once the standard error of the running mean is at most ``tol`` times its magnitude (after at least
    min(10, probes) probes) or after ``iters`` products in all (then ``converged`` is False). With
    ``per_layer=True``, one estimate per leaf module: the trace of that module's diagonal block of the Hessian.

    ``deflation=r`` spends the first r products on a Lanczos basis Q of the dominant directions and estimates
    tr(H) = tr(QᵀHQ) + tr(PHP), P = I - QQᵀ: the first term exactly (the sum of the Lanczos α's), the second by
    Hutchinson on Pz (Hutch++ with a Krylov sketch: Meyer et al. 2021; Chen & Hallman 2023). Still unbiased;
    a Hessian's few outlier eigenvalues carry most of zᵀHz's variance, so the same standard error takes far
    fewer products.
    """
    iters, tol = positive_int(iters, "iters"), check_tol(tol)
    if isinstance(deflation, bool) or not isinstance(deflation, int) or not 0 <= deflation < iters:
        raise ConfigError(f"deflation: expected an integer in [0, iters), got {deflation!r}")
    results: dict[str, TraceEstimate] = {}
    with hessian_products(model, x, y, loss_fn, batch_size) as products:
        for name, indices in blocks(products, per_layer).items():
            results[name] = _hutchinson(*products.operator(indices), iters, tol, products.device(), seed, deflation)
    return results if per_layer else results[""]


def _hutchinson(matvec: Callable[[Tensor], Tensor], size: int, iters: int, tol: float, device: torch.device,
                seed: int, deflation: int) -> TraceEstimate:
    began = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    head, used, basis = 0.0, 0, None
    if deflation:
        alphas, _, _, _, basis = lanczos(matvec, random_vector(size, generator, device, rademacher=True),
                                          min(deflation, size))
        head, used = sum(alphas), len(alphas)
    samples: list[float] = []
    mean, error, converged = 0.0, math.inf, used == size
    while not converged and used < iters:
        probe = random_vector(size, generator, device, rademacher=True)
        if basis is not None:
            probe = probe - basis.T @ (basis @ probe)
        samples.append(float(probe @ matvec(probe)))
        used += 1
        count = len(samples)
        mean = sum(samples) / count
        if count > 1:
            error = math.sqrt(sum((s - mean) ** 2 for s in samples) / (count - 1) / count)
        total = head + mean
        converged = count >= min(10, iters - deflation) and count > 1 and error <= tol * abs(total)
    if used == size and not samples:
        error = 0.0
    return TraceEstimate(head + mean, error, used, converged, time.perf_counter() - began, size)
