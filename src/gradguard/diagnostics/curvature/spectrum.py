"""The Hessian's spectrum: the top eigenvalue (power iteration, Lanczos), the top-k eigenvalues (Lanczos with full
reorthogonalisation) and the eigenvalue density (stochastic Lanczos quadrature).

``LANCZOS_BASIS_BYTES`` lives here: patch ``gradguard.diagnostics.curvature.spectrum.LANCZOS_BASIS_BYTES`` (the
package's re-export is a copy) to move the point where ``top_hessian_eigenvalue`` falls back to power iteration.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ...checks import positive_float, positive_int
from ...errors import ConfigError, InputError
from .hvp import LossFn, blocks, hessian_products, random_vector

LANCZOS_BASIS_BYTES = 1 << 30  # above this, top_hessian_eigenvalue runs power iteration (no stored basis)


@dataclass
class EigenEstimate:
    """Result of power iteration: the eigenvalue estimate and how it was reached."""

    value: float
    iterations: int
    converged: bool
    elapsed_s: float
    vector: Tensor | None = field(default=None, repr=False)  # the last iterate, flat: warm-starts the next call


@dataclass
class EigenvaluesEstimate:
    """Top-k eigenvalues (largest magnitude first) with their Lanczos residual bounds ‖H s - θ s‖."""

    values: list[float]
    residuals: list[float]
    iterations: int
    converged: bool
    elapsed_s: float
    dimension: int


@dataclass
class DensityEstimate:
    """Stochastic Lanczos quadrature: per run, Gauss nodes and weights; and a Gaussian-smoothed density on a grid.

    The weights of a run sum to 1, so ``density`` integrates to 1 over the real line; ``moment(p)`` estimates
    tr(Hᵖ) = dimension · mean over runs of Σ wᵢ θᵢᵖ (exact for a probe whenever p ≤ 2·steps - 1).
    """

    nodes: list[list[float]]
    weights: list[list[float]]
    grid: list[float]
    density: list[float]
    sigma: float
    iterations: int
    elapsed_s: float
    dimension: int

    def moment(self, power: int) -> float:
        runs = [sum(w * n ** power for n, w in zip(nodes, weights, strict=True))
                for nodes, weights in zip(self.nodes, self.weights, strict=True)]
        return self.dimension * sum(runs) / len(runs)


def check_tol(tol: float) -> float:
    return positive_float(tol, "tol", allow_zero=True)


def power_iteration(matvec: Callable[[Tensor], Tensor], start: Tensor, iters: int, tol: float,
                     time_limit: float | None, began: float) -> tuple[float, int, bool, Tensor]:
    vector = start / start.norm()
    value, converged, iteration = 0.0, False, 0
    for iteration in range(1, iters + 1):
        product = matvec(vector)
        previous, value = value, float(vector @ product)
        norm = float(product.norm())
        if norm == 0 or not math.isfinite(norm):  # the Hessian annihilates the vector: eigenvalue 0
            converged = norm == 0
            break
        vector = product / norm
        if tol > 0 and iteration > 1 and abs(value - previous) <= tol * max(abs(value), 1e-12):
            converged = True
            break
        if time_limit is not None and time.perf_counter() - began > time_limit:
            break
    return value, iteration, converged, vector


def hessian_power_iteration(model: nn.Module, x: Tensor, y: Tensor, *, loss_fn: LossFn | None = None,
                            iters: int = 20, tol: float = 1e-4, time_limit: float | None = None,
                            batch_size: int | None = None, seed: int = 0,
                            init: Tensor | None = None) -> EigenEstimate:
    """Eigenvalue of largest magnitude of ∇²_θ L, L = mean per-sample loss over (x, y), by power iteration.

    Parameters are those with ``requires_grad=True``. ``batch_size`` splits (x, y) so memory stays bounded;
    the Hessian-vector products are summed over the batches (exactly the full-data Hessian). Stops after
    ``iters`` products, when the Rayleigh quotient changes by at most ``tol`` (relative; ``tol=0`` runs all
    ``iters``), or once ``time_limit`` seconds have passed (then ``converged`` is False). ``init`` (a flat
    vector over the trainable parameters, e.g. the previous call's ``vector``) warm-starts the iteration.
    """
    iters = positive_int(iters, "iters")
    tol = positive_float(tol, "tol", allow_zero=True)
    if time_limit is not None:
        time_limit = positive_float(time_limit, "time_limit")
    began = time.perf_counter()
    with hessian_products(model, x, y, loss_fn, batch_size) as products:
        matvec, size = products.operator()
        if init is not None and (not isinstance(init, Tensor) or init.numel() != size or not bool(init.norm() > 0)):
            raise InputError(f"init: expected a non-zero flat vector of {size} values (one per trainable parameter)")
        start = (init.detach().reshape(-1).to(products.device(), torch.float64) if init is not None else
                 random_vector(size, torch.Generator().manual_seed(seed), products.device(), rademacher=False))
        value, iterations, converged, vector = power_iteration(matvec, start, iters, tol, time_limit, began)
    return EigenEstimate(value, iterations, converged, time.perf_counter() - began, vector)


def top_hessian_eigenvalue(model: nn.Module, x: Tensor, y: Tensor, *, iters: int = 20, tol: float = 1e-4,
                           loss_fn: LossFn | None = None, time_limit: float | None = None,
                           batch_size: int | None = None, seed: int = 0) -> float:
    """Top (largest-magnitude) eigenvalue of the loss Hessian w.r.t. the trainable parameters.

    Lanczos with full reorthogonalisation on double-backward Hessian-vector products (``hessian_eigenvalues``
    with k=1): the same answer as PyHessian's power iteration (Yao et al. 2020) in fewer products. Defaults
    iters=20 products, tol=1e-4 (relative change of the estimate); ``loss_fn(logits, y)`` returns per-sample
    losses (default: cross-entropy). ``hessian_power_iteration`` is the plain power iteration, used instead
    when the Lanczos basis (``iters`` float64 vectors of the parameter count) would pass 1 GiB.
    """
    if isinstance(model, nn.Module) and isinstance(iters, int) and \
            iters * sum(p.numel() for p in model.parameters() if p.requires_grad) * 8 > LANCZOS_BASIS_BYTES:
        return hessian_power_iteration(model, x, y, iters=iters, tol=tol, loss_fn=loss_fn, time_limit=time_limit,
                                       batch_size=batch_size, seed=seed).value
    estimate = hessian_eigenvalues(model, x, y, k=1, iters=iters, tol=tol, loss_fn=loss_fn, time_limit=time_limit,
                                   batch_size=batch_size, seed=seed)
    assert isinstance(estimate, EigenvaluesEstimate)
    return estimate.values[0]


def lanczos(matvec: Callable[[Tensor], Tensor], start: Tensor, steps: int,
             stop: Callable[[list[float], list[float]], bool] | None = None,
             restart: Callable[[], Tensor] | None = None) -> tuple[list[float], list[float], float, str, Tensor]:
    """Lanczos with full reorthogonalisation: (alphas, betas, final β, why it ended: "stop"/"invariant"/"steps",
    the orthonormal basis as rows).

    T = tridiag(betas, alphas, betas). Every new vector is orthogonalised against the whole basis (twice:
    "twice is enough", Parlett), so the Ritz values carry no spurious copies; ``stop(alphas, betas)`` is asked
    after each step. An invariant subspace (β ≈ 0) makes T's eigenvalues exact; it ends the run, or, with
    ``restart`` (a source of random vectors), the run goes on from a fresh vector orthogonal to the basis
    (β = 0 in T), which is how a single Krylov run also finds repeated eigenvalues.
    """
    basis = torch.empty(steps, start.numel(), dtype=torch.float64, device=start.device)
    basis[0] = start / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        w = matvec(basis[j])
        alphas.append(float(basis[j] @ w))
        done = basis[: j + 1]
        for _ in range(2):
            w = w - done.T @ (done @ w)
        beta = float(w.norm())
        if stop is not None and stop(alphas, betas):
            return alphas, betas, beta, "stop", basis[: j + 1]
        scale = max(abs(a) for a in alphas) + (betas[-1] if betas else 0.0)
        if beta <= 1e-10 * scale or beta == 0:
            if restart is None or j == steps - 1:
                return alphas, betas, 0.0, "invariant", basis[: j + 1]
            w, beta = restart(), 0.0
            for _ in range(2):
                w = w - done.T @ (done @ w)
            betas.append(0.0)
            basis[j + 1] = w / w.norm()
            continue
        if j == steps - 1:
            return alphas, betas, beta, "steps", basis[: j + 1]
        betas.append(beta)
        basis[j + 1] = w / beta
    return alphas, betas, 0.0, "steps", basis


def _ritz(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        tridiagonal = tridiagonal + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(tridiagonal)


def hessian_eigenvalues(model: nn.Module, x: Tensor, y: Tensor, *, k: int = 5, iters: int = 100, tol: float = 1e-4,
                        per_layer: bool = False, seed: int = 0, loss_fn: LossFn | None = None,
                        time_limit: float | None = None,
                        batch_size: int | None = None) -> EigenvaluesEstimate | dict[str, EigenvaluesEstimate]:
    """The k eigenvalues of ∇²_θ L of largest magnitude, by Lanczos with full reorthogonalisation.

    Why Lanczos and not PyHessian's deflated power iteration: power iteration converges at the rate
    |λ₂/λ₁| per product and deflation spends a fresh run (and the previous runs' errors) on every eigenvalue,
    while one Lanczos run finds all k extreme eigenvalues at once at the Chebyshev-accelerated rate (Golub &
    Van Loan, ch. 10); full reorthogonalisation keeps the Krylov basis orthogonal, so no ghost copies appear.
    The basis costs ``iters`` float64 vectors of the parameter count. Stops when the top-k Ritz values change
    by at most ``tol`` (relative, the criterion of power iteration and PyHessian) between products, at an
    invariant subspace (exact), after ``iters`` products or ``time_limit`` seconds (``converged`` False).
    One Krylov run holds one copy of each eigenvalue: an exactly repeated eigenvalue (e.g. a multi-output
    linear model's identical blocks) shows its copies only after the run exhausts an invariant subspace and
    restarts from a fresh vector, so ask for ``tol=0`` and enough ``iters`` when multiplicities matter.
    """
    k, iters, tol = positive_int(k, "k"), positive_int(iters, "iters"), check_tol(tol)
    if time_limit is not None:
        time_limit = positive_float(time_limit, "time_limit")
    results: dict[str, EigenvaluesEstimate] = {}
    with hessian_products(model, x, y, loss_fn, batch_size) as products:
        for name, indices in blocks(products, per_layer).items():
            matvec, size = products.operator(indices)
            if k > size:
                raise ConfigError(f"k: the Hessian{' block ' + repr(name) if name else ''} has only {size} "
                                  f"eigenvalues; ask for k <= {size}")
            draw = functools.partial(random_vector, size, torch.Generator().manual_seed(seed), products.device(),
                                     rademacher=False)
            results[name] = _top_k(matvec, draw, size, k, min(iters, size), tol, time_limit)
    return results if per_layer else results[""]


def _top_k(matvec: Callable[[Tensor], Tensor], draw: Callable[[], Tensor], size: int, k: int, steps: int,
           tol: float, time_limit: float | None) -> EigenvaluesEstimate:
    began = time.perf_counter()
    previous: list[float] = []
    state = {"converged": False}

    def top(alphas: list[float], betas: list[float]) -> list[float]:
        values, _ = _ritz(alphas, betas)
        return sorted(values.tolist(), key=abs, reverse=True)[:k]

    def stop(alphas: list[float], betas: list[float]) -> bool:
        nonlocal previous
        current = top(alphas, betas)
        settled = (tol > 0 and len(previous) == k and len(current) == k
                   and all(abs(c - p) <= tol * max(abs(c), 1e-12) for c, p in zip(current, previous, strict=True)))
        previous = current
        state["converged"] = settled
        return settled or (time_limit is not None and time.perf_counter() - began > time_limit)

    alphas, betas, last_beta, ending, _ = lanczos(matvec, draw(), steps, stop, restart=draw)
    converged = state["converged"] or ending == "invariant" or len(alphas) == size
    values, vectors = _ritz(alphas, betas)
    order = sorted(range(len(alphas)), key=lambda i: abs(float(values[i])), reverse=True)[:k]
    return EigenvaluesEstimate([float(values[i]) for i in order],
                               [abs(last_beta * float(vectors[-1, i])) for i in order],
                               len(alphas), bool(converged), time.perf_counter() - began, size)


def hessian_density(model: nn.Module, x: Tensor, y: Tensor, *, n_v: int = 1, m: int = 80, per_layer: bool = False,
                    seed: int = 0, sigma: float | None = None, grid_points: int = 512, loss_fn: LossFn | None = None,
                    batch_size: int | None = None) -> DensityEstimate | dict[str, DensityEstimate]:
    """Eigenvalue density of ∇²_θ L by stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019; PyHessian).

    ``n_v`` runs of ``m`` Lanczos steps from Rademacher probes; each run's tridiagonal matrix gives Gauss
    quadrature nodes θᵢ (Ritz values) and weights wᵢ (squared first components of its eigenvectors). The
    density is their mixture of Gaussians of width ``sigma`` (default 1 % of the node range) on
    ``grid_points`` points, averaged over runs. Use it to see the bulk near 0 and the outliers at once.
    """
    n_v, m = positive_int(n_v, "n_v"), positive_int(m, "m")
    grid_points = positive_int(grid_points, "grid_points")
    if sigma is not None:
        sigma = positive_float(sigma, "sigma")
    results: dict[str, DensityEstimate] = {}
    with hessian_products(model, x, y, loss_fn, batch_size) as products:
        for name, indices in blocks(products, per_layer).items():
            matvec, size = products.operator(indices)
            results[name] = _quadrature(matvec, size, n_v, min(m, size), products.device(), seed, sigma,
                                        grid_points)
    return results if per_layer else results[""]


def _quadrature(matvec: Callable[[Tensor], Tensor], size: int, runs: int, steps: int, device: torch.device,
                seed: int, sigma: float | None, grid_points: int) -> DensityEstimate:
    began = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    nodes: list[list[float]] = []
    weights: list[list[float]] = []
    products = 0
    for _ in range(runs):
        alphas, betas, _, _, _ = lanczos(matvec, random_vector(size, generator, device, rademacher=True), steps)
        products += len(alphas)
        values, vectors = _ritz(alphas, betas)
        nodes.append(values.tolist())
        weights.append((vectors[0] ** 2).tolist())
    low = min(min(run) for run in nodes)
    high = max(max(run) for run in nodes)
    width = sigma if sigma is not None else (0.01 * (high - low) if high > low else max(abs(high), 1.0) * 0.01)
    grid = torch.linspace(low - 4 * width, high + 4 * width, grid_points, dtype=torch.float64)
    density = torch.zeros_like(grid)
    for run_nodes, run_weights in zip(nodes, weights, strict=True):
        centres = torch.tensor(run_nodes, dtype=torch.float64)
        mass = torch.tensor(run_weights, dtype=torch.float64)
        kernel = torch.exp(-0.5 * ((grid[:, None] - centres[None, :]) / width) ** 2) / (width * math.sqrt(2 * math.pi))
        density += kernel @ mass
    density /= runs
    return DensityEstimate(nodes, weights, grid.tolist(), density.tolist(), width, products,
                           time.perf_counter() - began, size)
