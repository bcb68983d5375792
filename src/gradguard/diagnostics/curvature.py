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
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..checks import positive_float, positive_int
from ..core.gradient import input_gradient
from ..core.guard import model_guard
from ..errors import ConfigError, InputError, ShapeError
from ..models.outputs import select_logits

LossFn = Callable[[Tensor, Tensor], Tensor]
LANCZOS_BASIS_BYTES = 1 << 30  # above this, top_hessian_eigenvalue runs power iteration (no stored basis)


def per_sample_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


@dataclass
class EigenEstimate:
    """Result of power iteration: the eigenvalue estimate and how it was reached."""

    value: float
    iterations: int
    converged: bool
    elapsed_s: float
    vector: Tensor | None = field(default=None, repr=False)  # the last iterate, flat: warm-starts the next call


def _check_data(model: nn.Module, x: Tensor, y: Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise InputError(f"x: expected a floating-point torch.Tensor of inputs, got {type(x).__name__}"
                         + (f" of {x.dtype}" if isinstance(x, Tensor) else ""))
    if x.dim() < 1 or x.shape[0] == 0:
        raise ShapeError(f"x: expected a non-empty batch (batch, ...), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InputError("x: contains NaN or inf; clean the inputs first")
    if not isinstance(y, Tensor) or y.dim() < 1 or y.shape[0] != x.shape[0]:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ShapeError(f"y: expected a tensor with one target per input ({x.shape[0]}, ...), got {shape}")


def _summed_loss(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """Sum of per-sample losses (a 0-dim loss is read as a batch mean)."""
    values = loss_fn(select_logits(model(x)), y)  # a dict / ModelOutput with .logits: its logits
    if values.dim() == 0:
        return values * x.shape[0]
    if values.shape[0] != x.shape[0]:
        raise ShapeError(f"loss_fn: expected per-sample losses of shape ({x.shape[0]},), got {tuple(values.shape)}")
    return values.sum()


# ------------------------------------------------------------------------------------------------
# Hessian-vector products on flat vectors
# ------------------------------------------------------------------------------------------------
def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("model: no parameter has requires_grad=True, so the parameter Hessian is empty")
    return params


def _grad(outputs: Sequence[Tensor], inputs: Sequence[Tensor], grad_outputs: Sequence[Tensor] | None = None,
          **kwargs: bool) -> list[Tensor]:
    """``torch.autograd.grad`` that reads a constant output or an unused input as a zero derivative."""
    weights: list[Tensor | None] = list(grad_outputs) if grad_outputs is not None else [None] * len(outputs)
    live = [(out, weight) for out, weight in zip(outputs, weights, strict=True) if out.requires_grad]
    if not live:
        return [torch.zeros_like(p) for p in inputs]
    return list(torch.autograd.grad([out for out, _ in live], inputs,
                                    grad_outputs=[w for _, w in live] if grad_outputs is not None else None,
                                    allow_unused=True, materialize_grads=True, **kwargs))


class _HessianProducts:
    """H·v for L = mean per-sample loss over (x, y), on flat float64 vectors, for all or a block of the parameters.

    With one batch the gradient graph is built once and every product is one backward pass through it (what
    PyHessian does); with ``batch_size`` the products are summed over the batches (the exact full-data Hessian).
    Use inside ``model_guard(model, freeze=False)`` with gradients enabled.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, batch_size: int):
        self.model, self.loss_fn, self.total = model, loss_fn, x.shape[0]
        self.params = _trainable(model)
        self.chunks = list(zip(x.split(batch_size), y.split(batch_size), strict=True))
        self.products = 0
        self._cached: list[Tensor] | None = None
        if len(self.chunks) == 1:
            self._cached = _grad([_summed_loss(model, x, y, loss_fn) / self.total], self.params, create_graph=True)

    def groups(self) -> dict[str, list[int]]:
        """Positions of each leaf module's own trainable parameters, keyed by module name (shared ones once)."""
        position = {id(p): i for i, p in enumerate(self.params)}
        groups: dict[str, list[int]] = {}
        seen: set[int] = set()
        for name, module in self.model.named_modules():
            own = [position[id(p)] for p in module.parameters(recurse=False) if id(p) in position and id(p) not in seen]
            seen.update(id(self.params[i]) for i in own)
            if own:
                groups[name or type(module).__name__] = own
        return groups

    def operator(self, indices: list[int] | None = None) -> tuple[Callable[[Tensor], Tensor], int]:
        """(matvec, dimension) of the Hessian block of the parameters at ``indices`` (all when None)."""
        indices = list(range(len(self.params))) if indices is None else indices
        params = [self.params[i] for i in indices]
        sizes = [p.numel() for p in params]

        def matvec(flat: Tensor) -> Tensor:
            pieces = [piece.view_as(p).to(p.dtype) for piece, p in zip(flat.split(sizes), params, strict=True)]
            if self._cached is not None:
                parts = _grad([self._cached[i] for i in indices], params, pieces, retain_graph=True)
            else:
                parts = [torch.zeros_like(p) for p in params]
                for xb, yb in self.chunks:
                    grads = _grad([_summed_loss(self.model, xb, yb, self.loss_fn) / self.total], params,
                                  create_graph=True)
                    for acc, part in zip(parts, _grad(grads, params, pieces), strict=True):
                        acc.add_(part)
            self.products += 1
            return torch.cat([part.detach().reshape(-1) for part in parts]).to(flat.dtype)

        return matvec, sum(sizes)

    def device(self) -> torch.device:
        return self.params[0].device


@contextlib.contextmanager
def _products(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None,
              batch_size: int | None) -> Iterator[_HessianProducts]:
    _check_data(model, x, y)
    _trainable(model)
    size = positive_int(batch_size, "batch_size") if batch_size is not None else x.shape[0]
    with model_guard(model, freeze=False), torch.enable_grad():
        yield _HessianProducts(model, x, y, loss_fn or per_sample_cross_entropy, size)


def _blocks(products: _HessianProducts, per_layer: bool) -> dict[str, list[int] | None]:
    return dict(products.groups()) if per_layer else {"": None}


def _random_vector(size: int, generator: torch.Generator, device: torch.device, *, rademacher: bool) -> Tensor:
    if rademacher:
        vector = torch.randint(0, 2, (size,), generator=generator, dtype=torch.float64) * 2 - 1
    else:
        vector = torch.randn(size, generator=generator, dtype=torch.float64)
    return vector.to(device)


def _power_iteration(matvec: Callable[[Tensor], Tensor], start: Tensor, iters: int, tol: float,
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
    with _products(model, x, y, loss_fn, batch_size) as products:
        matvec, size = products.operator()
        if init is not None and (not isinstance(init, Tensor) or init.numel() != size or not bool(init.norm() > 0)):
            raise InputError(f"init: expected a non-zero flat vector of {size} values (one per trainable parameter)")
        start = (init.detach().reshape(-1).to(products.device(), torch.float64) if init is not None else
                 _random_vector(size, torch.Generator().manual_seed(seed), products.device(), rademacher=False))
        value, iterations, converged, vector = _power_iteration(matvec, start, iters, tol, time_limit, began)
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


# ------------------------------------------------------------------------------------------------
# Trace (Hutchinson), top-k eigenvalues (Lanczos), spectral density (stochastic Lanczos quadrature)
# ------------------------------------------------------------------------------------------------
@dataclass
class TraceEstimate:
    """Hutchinson estimate of tr(H): the running mean over probes, its standard error and how it was reached."""

    value: float
    standard_error: float
    iterations: int
    converged: bool
    elapsed_s: float
    dimension: int


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


def _check_tol(tol: float) -> float:
    return positive_float(tol, "tol", allow_zero=True)


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
    iters, tol = positive_int(iters, "iters"), _check_tol(tol)
    if isinstance(deflation, bool) or not isinstance(deflation, int) or not 0 <= deflation < iters:
        raise ConfigError(f"deflation: expected an integer in [0, iters), got {deflation!r}")
    results: dict[str, TraceEstimate] = {}
    with _products(model, x, y, loss_fn, batch_size) as products:
        for name, indices in _blocks(products, per_layer).items():
            results[name] = _hutchinson(*products.operator(indices), iters, tol, products.device(), seed, deflation)
    return results if per_layer else results[""]


def _hutchinson(matvec: Callable[[Tensor], Tensor], size: int, iters: int, tol: float, device: torch.device,
                seed: int, deflation: int) -> TraceEstimate:
    began = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    head, used, basis = 0.0, 0, None
    if deflation:
        alphas, _, _, _, basis = _lanczos(matvec, _random_vector(size, generator, device, rademacher=True),
                                          min(deflation, size))
        head, used = sum(alphas), len(alphas)
    samples: list[float] = []
    mean, error, converged = 0.0, math.inf, used == size
    while not converged and used < iters:
        probe = _random_vector(size, generator, device, rademacher=True)
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


def _lanczos(matvec: Callable[[Tensor], Tensor], start: Tensor, steps: int,
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
    k, iters, tol = positive_int(k, "k"), positive_int(iters, "iters"), _check_tol(tol)
    if time_limit is not None:
        time_limit = positive_float(time_limit, "time_limit")
    results: dict[str, EigenvaluesEstimate] = {}
    with _products(model, x, y, loss_fn, batch_size) as products:
        for name, indices in _blocks(products, per_layer).items():
            matvec, size = products.operator(indices)
            if k > size:
                raise ConfigError(f"k: the Hessian{' block ' + repr(name) if name else ''} has only {size} "
                                  f"eigenvalues; ask for k <= {size}")
            draw = functools.partial(_random_vector, size, torch.Generator().manual_seed(seed), products.device(),
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

    alphas, betas, last_beta, ending, _ = _lanczos(matvec, draw(), steps, stop, restart=draw)
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
    with _products(model, x, y, loss_fn, batch_size) as products:
        for name, indices in _blocks(products, per_layer).items():
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
        alphas, betas, _, _, _ = _lanczos(matvec, _random_vector(size, generator, device, rademacher=True), steps)
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


def input_curvature(model: nn.Module, x: Tensor, y: Tensor, *, h: float = 1e-3, method: str = "finite-difference",
                    loss_fn: LossFn | None = None, batch_size: int | None = None) -> Tensor:
    """Per-sample curvature of the loss along its input gradient: ĝᵀ ∇²_x ℓ ĝ, ĝ = g/‖g‖, shape (batch,).

    ``method="finite-difference"`` (default, as in CURE, Moosavi-Dezfooli et al. 2019) uses
    (∇ℓ(x + hĝ) - ∇ℓ(x - hĝ))·ĝ / 2h, which also sees the kinks of ReLU networks at scale ``h``;
    ``method="hvp"`` is the exact double-backward value at x. A sample whose gradient is zero has no
    direction and gets 0. Parameters get no gradient; their ``requires_grad`` flags are left alone.
    """
    _check_data(model, x, y)
    h = positive_float(h, "h")
    if method not in ("finite-difference", "hvp"):
        raise ConfigError(f"method: expected 'finite-difference' or 'hvp', got {method!r}")
    loss_fn = loss_fn or per_sample_cross_entropy
    batch_size = positive_int(batch_size, "batch_size") if batch_size is not None else x.shape[0]
    parts = []
    with model_guard(model, freeze=False), torch.enable_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            parts.append(_input_curvature_batch(model, xb.detach(), yb, h, method, loss_fn))
    return torch.cat(parts)


def _input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn,
                    create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """(∇ₓ of the summed loss, the leaf ``x`` to differentiate it again in) through the core ``input_gradient``."""
    batch = x.shape[0]

    def objective(logits: Tensor, targets: Tensor, targeted: bool) -> Tensor:
        values = loss_fn(logits, targets)
        if values.dim() == 0:  # a batch mean, as in _summed_loss
            return values * batch
        if values.shape[0] != batch:
            raise ShapeError(f"loss_fn: expected per-sample losses of shape ({batch},), got {tuple(values.shape)}")
        return values

    x = x.detach().requires_grad_(True)
    grad, _, _ = input_gradient(model, x, y, objective, False, create_graph=create_graph, checked=False)
    return grad, x


def _input_curvature_batch(model: nn.Module, x: Tensor, y: Tensor, h: float, method: str, loss_fn: LossFn) -> Tensor:
    # Samples are independent in eval mode, so the gradient of the summed loss holds each sample's own
    # gradient, and a per-sample direction gives each sample's own curvature.
    if method == "hvp":
        grad, leaf = _input_gradient(model, x, y, loss_fn, create_graph=True)
        flat = grad.flatten(1)
        norms = flat.norm(dim=1)
        direction = (flat / norms.clamp_min(1e-30).unsqueeze(1)).detach()
        (product,) = torch.autograd.grad((flat * direction).sum(), leaf)
        curvature = (product.flatten(1) * direction).sum(1)
    else:
        grad, _ = _input_gradient(model, x, y, loss_fn)
        flat = grad.flatten(1)
        norms = flat.norm(dim=1)
        direction = flat / norms.clamp_min(1e-30).unsqueeze(1)
        step = (h * direction).view_as(x)
        ahead, _ = _input_gradient(model, x + step, y, loss_fn)
        behind, _ = _input_gradient(model, x - step, y, loss_fn)
        curvature = ((ahead - behind).flatten(1) * direction).sum(1) / (2 * h)
    return torch.where(norms > 0, curvature, torch.zeros_like(curvature)).detach()


@dataclass
class InputCurvatureSummary:
    """Per-sample input curvature over a dataset (``values``, in data order) and its distribution."""

    values: Tensor
    mean: float
    quantiles: dict[str, float]
    elapsed_s: float

    def to_dict(self) -> dict:
        return {"n_samples": int(self.values.numel()), "mean": self.mean, "quantiles": self.quantiles,
                "elapsed_s": self.elapsed_s}


def input_curvature_distribution(model: nn.Module, data: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]], *,
                                 batch_size: int = 256, h: float = 1e-3, method: str = "finite-difference",
                                 loss_fn: LossFn | None = None,
                                 quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> InputCurvatureSummary:
    """``input_curvature`` of every sample of a dataset, batch by batch, with its mean and quantiles.

    ``data`` is a pair of tensors (x, y) or an iterable of (x, y) batches (e.g. a DataLoader; batches stream,
    only the per-sample values are kept). A robust model has a narrow distribution near 0; a long right tail
    marks the samples where linear attacks (FGSM) underestimate the loss.
    """
    batch_size = positive_int(batch_size, "batch_size")
    levels = [float(q) for q in quantiles]
    if not all(0 <= q <= 1 for q in levels):
        raise ConfigError(f"quantiles: expected numbers in [0, 1], got {list(quantiles)!r}")
    began = time.perf_counter()
    batches: Iterable[tuple[Tensor, Tensor]]
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor) and isinstance(data[1], Tensor):
        batches = zip(data[0].split(batch_size), data[1].split(batch_size), strict=True)
    else:
        batches = data  # an iterable of (x, y) batches
    parts = [input_curvature(model, xb, yb, h=h, method=method, loss_fn=loss_fn).cpu() for xb, yb in batches]
    if not parts:
        raise InputError("data: no batches; pass (x, y) tensors or an iterable of (x, y) batches")
    values = torch.cat(parts).double()
    points = torch.quantile(values, torch.tensor(levels, dtype=torch.float64)).tolist() if levels else []
    named = {f"q{round(q * 100):02d}": value for q, value in zip(levels, points, strict=True)}
    return InputCurvatureSummary(values, float(values.mean()), named, time.perf_counter() - began)


# ------------------------------------------------------------------------------------------------
# Edge of stability while training
# ------------------------------------------------------------------------------------------------
class SharpnessTracker:
    """The top Hessian eigenvalue of the training batch against the optimiser's stability threshold.

    Plain gradient descent on a quadratic diverges once lr·λ_max > 2; with heavy-ball momentum μ the bound is
    λ_max < (2 + 2μ)/lr, and networks trained at a fixed lr hover at that "edge of stability" (Cohen et al.
    2021). Adam steps along P⁻¹g with P = diag(√v̂ + ε), so the quantity that matters is the preconditioned
    sharpness λ_max(P⁻¹H) against (2 + 2β₁)/((1 - β₁)·lr) = 38/lr for β₁ = 0.9 (Cohen et al. 2022, "Adaptive
    gradient methods at the edge of stability"). ``ratio`` = quantity / threshold; above 1 the run is heading
    for instability. Each measurement is a few power-iteration products, warm-started from the last vector.
    """

    def __init__(self, model: nn.Module, every: int, *, optimizer: torch.optim.Optimizer | None = None,
                 lr: float | None = None, iters: int = 5, loss_fn: LossFn | None = None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.every = positive_int(every, "curvature_every")
        self.iters = positive_int(iters, "curvature_iters")
        if optimizer is None and lr is None:
            raise ConfigError("curvature_every: needs the learning rate; pass optimizer= or lr=")
        self.lr = positive_float(lr, "lr") if lr is not None else None
        self.records: list[dict] = []
        self._vector: Tensor | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def measure(self, step: int, x: Tensor, targets: Tensor | None) -> dict:
        """Measure on (x, targets); without targets the model's own predictions stand in (the Gauss-Newton part
        of the cross-entropy Hessian, which carries its top eigenvalue, does not depend on the labels)."""
        began = time.perf_counter()
        x = x.detach()
        if targets is None:
            with torch.no_grad(), model_guard(self.model, freeze=False):
                targets = select_logits(self.model(x)).argmax(1)
        lr, threshold, scale, measure = self._threshold()
        with _products(self.model, x, targets.detach(), self.loss_fn, None) as products:
            matvec, size = products.operator()
            if scale is not None:
                scale = scale.to(products.device())
                plain = matvec
                matvec = lambda v: scale * plain(scale * v)  # noqa: E731  (P^-1/2 H P^-1/2)
            start = self._vector if self._vector is not None and self._vector.numel() == size else \
                _random_vector(size, torch.Generator().manual_seed(step), products.device(), rademacher=False)
            value, iterations, _, self._vector = _power_iteration(matvec, start, self.iters, 0.0, None, began)
        record = {"step": step, "quantity": measure, "top_eigenvalue": value, "lr": lr, "threshold": threshold,
                  "ratio": value / threshold, "iterations": iterations, "seconds": time.perf_counter() - began}
        self.records.append(record)
        return record

    def _threshold(self) -> tuple[float, float, Tensor | None, str]:
        """(lr, threshold, P^-1/2 as a flat vector or None, name of the quantity)."""
        if self.optimizer is None:
            assert self.lr is not None
            return self.lr, 2.0 / self.lr, None, "sharpness"
        group = self.optimizer.param_groups[0]
        lr = float(group["lr"])
        if isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            beta1, beta2 = group["betas"]
            scale = self._adam_scale(beta2, float(group["eps"]))
            if scale is not None:
                return lr, (2 + 2 * beta1) / ((1 - beta1) * lr), scale, "preconditioned sharpness"
        momentum = float(group.get("momentum", 0.0) or 0.0)
        return lr, (2 + 2 * momentum) / lr, None, "sharpness"

    def _adam_scale(self, beta2: float, eps: float) -> Tensor | None:
        pieces = []
        for p in _trainable(self.model):
            state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            if "exp_avg_sq" not in state:
                return None  # before Adam's first step: no preconditioner yet
            steps = float(state["step"])
            denominator = (state["exp_avg_sq"] / (1 - beta2 ** steps)).sqrt() + eps
            pieces.append(denominator.detach().reshape(-1).double().rsqrt())
        return torch.cat(pieces)

    def unstable(self) -> list[dict]:
        """Records whose ratio exceeds 1 (the quantity is past the optimiser's stability threshold)."""
        return [record for record in self.records if record["ratio"] > 1]


# ------------------------------------------------------------------------------------------------
# Everything at once (``gradguard diagnose --curvature``)
# ------------------------------------------------------------------------------------------------
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
