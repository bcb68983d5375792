"""Threat models: the set of inputs an adversary may choose from.

A threat model is an Lp ball of radius ``eps`` around each input, intersected with the box ``bounds``
(the valid pixel range). It owns all norm geometry — projection, random start, steepest-ascent step,
distance — so an attack is written once and works for every norm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from .errors import ConfigError

_TINY = 1e-12


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a (batch,) tensor so it broadcasts against ``like`` (batch, ...)."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


@dataclass(frozen=True)
class ThreatModel:
    """An Lp ball of radius ``eps`` intersected with the box ``bounds``.

    Subclasses fix the norm. All methods take batched tensors (batch, ...) and work per sample.
    """

    eps: float
    bounds: tuple[float, float] = (0.0, 1.0)
    norm: ClassVar[str] = ""

    def __post_init__(self) -> None:
        try:
            eps = float(self.eps)
        except (TypeError, ValueError):
            raise ConfigError(f"eps: expected a number, got {self.eps!r}") from None
        if not math.isfinite(eps) or eps < 0:
            raise ConfigError(f"eps: must be a finite number >= 0, got {self.eps!r}; pass e.g. eps=0.1")
        try:
            lo, hi = (float(b) for b in self.bounds)
        except (TypeError, ValueError):
            raise ConfigError(f"bounds: expected a pair (low, high), got {self.bounds!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ConfigError(f"bounds: need finite low < high, got {self.bounds!r}; e.g. bounds=(0, 1)")
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "bounds", (lo, hi))

    # -- geometry every norm shares -------------------------------------------------------------
    def clip(self, x: Tensor) -> Tensor:
        """Clamp into the box ``bounds``."""
        return x.clamp(self.bounds[0], self.bounds[1])

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Map ``x_adv`` into the eps-ball around ``x`` and then into the box.

        Clipping to the box after projecting to the ball keeps the point in the ball: ``x`` is inside the
        box, so clipping only shrinks every coordinate of the perturbation.
        """
        return self.clip(x + self._project_delta(x_adv - x))

    def random_start(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A point drawn uniformly from the eps-ball around ``x``, then clipped to the box.

        Without ``generator``, inside ``gradguard.rng.per_sample_generators`` each row is drawn from its sample's
        own generator (training that matches across process counts); otherwise from torch's global RNG."""
        from .rng import draw_per_sample

        return self.clip(x + draw_per_sample(x, self._random_delta, generator))

    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-sample Lp distance, shape (batch,)."""
        return self._norm(_flat(x_adv - x))

    def contains(self, x_adv: Tensor, x: Tensor, tol: float = 1e-6) -> Tensor:
        """Per-sample bool: ``x_adv`` lies in the eps-ball around ``x`` and in the box (within ``tol``)."""
        lo, hi = self.bounds
        in_box = _flat((x_adv >= lo - tol) & (x_adv <= hi + tol)).all(dim=1)
        return in_box & (self.distance(x_adv, x) <= self.eps + tol)

    def with_eps(self, eps: float) -> "ThreatModel":
        """The same threat model with another radius."""
        return replace(self, eps=eps)

    def ascent_step(self, grad: Tensor, step_size: float | Tensor, x_adv: Tensor | None = None) -> Tensor:
        """The steepest-ascent step of length ``step_size`` in this norm for gradient ``grad``.

        ``x_adv`` (optional) lets sparse norms skip coordinates that the box would clip anyway.
        ``step_size`` may be a float or a (batch,) tensor.
        """
        if isinstance(step_size, Tensor):
            step_size = _per_sample(step_size, grad)
        return step_size * self._unit_direction(grad, x_adv)

    def to_dict(self) -> dict:
        return {"norm": self.norm, "eps": self.eps, "bounds": list(self.bounds)}

    # -- what each norm defines -----------------------------------------------------------------
    def _norm(self, flat: Tensor) -> Tensor:
        raise NotImplementedError

    def _project_delta(self, delta: Tensor) -> Tensor:
        raise NotImplementedError

    def _random_delta(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def _unit_direction(self, grad: Tensor, x_adv: Tensor | None) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Linf(ThreatModel):
    """L∞ ball: every pixel moves by at most ``eps``."""

    norm: ClassVar[str] = "linf"

    def _norm(self, flat: Tensor) -> Tensor:
        return flat.abs().amax(dim=1)

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        # Exact projection onto ball ∩ box, both are boxes: two clamps, no temporaries for delta.
        return torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps).clamp_(*self.bounds)

    def _project_delta(self, delta: Tensor) -> Tensor:
        return delta.clamp(-self.eps, self.eps)

    def _random_delta(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * u - 1) * self.eps

    def _unit_direction(self, grad: Tensor, x_adv: Tensor | None) -> Tensor:
        return grad.sign()


@dataclass(frozen=True)
class L2(ThreatModel):
    """L2 ball: the perturbation's Euclidean norm is at most ``eps``."""

    norm: ClassVar[str] = "l2"

    def _norm(self, flat: Tensor) -> Tensor:
        return flat.norm(p=2, dim=1)

    def _project_delta(self, delta: Tensor) -> Tensor:
        norms = self._norm(_flat(delta))
        factor = torch.clamp(self.eps / (norms + _TINY), max=1.0)
        return delta * _per_sample(factor, delta)

    def _random_delta(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        # Uniform in the ball: a uniform direction (normalised Gaussian) times radius eps * u^(1/d).
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _per_sample(self._norm(_flat(direction)) + _TINY, x)
        d = direction[0].numel()
        radius = self.eps * torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / d)
        return direction * _per_sample(radius, x)

    def _unit_direction(self, grad: Tensor, x_adv: Tensor | None) -> Tensor:
        return grad / _per_sample(self._norm(_flat(grad)) + _TINY, grad)


@dataclass(frozen=True)
class L1(ThreatModel):
    """L1 ball: the perturbation's absolute values sum to at most ``eps``.

    The ascent step is sparse (Tramèr & Boneh 2019, "SLIDE"): it moves only the coordinates whose
    gradient magnitude is in the top ``sparsity`` fraction, skipping coordinates the box would clip.
    """

    sparsity: float = 0.01
    norm: ClassVar[str] = "l1"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.sparsity <= 1:
            raise ConfigError(f"sparsity: must be in (0, 1], got {self.sparsity!r}")

    def to_dict(self) -> dict:
        return {**super().to_dict(), "sparsity": self.sparsity}

    def _norm(self, flat: Tensor) -> Tensor:
        return flat.abs().sum(dim=1)

    def _project_delta(self, delta: Tensor) -> Tensor:
        flat = _flat(delta)
        return _project_l1_ball(flat, self.eps).reshape(delta.shape)

    def _random_delta(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        # Uniform in the cross-polytope: Dirichlet(1,...,1) over d+1 coordinates, drop one, random signs.
        n, d = x.shape[0], x[0].numel()
        e = -torch.log(torch.rand((n, d + 1), generator=generator, device=x.device, dtype=x.dtype).clamp_min(_TINY))
        magnitude = (e / e.sum(dim=1, keepdim=True))[:, :d]
        signs = torch.randint(0, 2, (n, d), generator=generator, device=x.device).to(x.dtype) * 2 - 1
        return (self.eps * magnitude * signs).reshape(x.shape)

    def _unit_direction(self, grad: Tensor, x_adv: Tensor | None) -> Tensor:
        flat = _flat(grad)
        movable = flat.abs()
        if x_adv is not None:
            # A coordinate pinned at a bound that the gradient pushes further out cannot move.
            lo, hi = self.bounds
            xa = _flat(x_adv)
            pinned = ((xa <= lo) & (flat < 0)) | ((xa >= hi) & (flat > 0))
            movable = movable.masked_fill(pinned, 0.0)
        k = max(1, int(round(self.sparsity * flat.shape[1])))
        threshold = movable.topk(k, dim=1).values[:, -1:]
        mask = (movable >= threshold) & (movable > 0)
        direction = flat.sign() * mask
        direction = direction / (direction.abs().sum(dim=1, keepdim=True) + _TINY)
        return direction.reshape(grad.shape)


def _project_l1_ball(flat: Tensor, radius: float) -> Tensor:
    """Euclidean projection of each row onto the L1 ball (Duchi et al. 2008, sort-based)."""
    abs_flat = flat.abs()
    outside = abs_flat.sum(dim=1) > radius
    if not bool(outside.any()):
        return flat
    sorted_abs = abs_flat.sort(dim=1, descending=True).values
    cumsum = sorted_abs.cumsum(dim=1)
    ks = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    candidate = sorted_abs - (cumsum - radius) / ks > 0
    rho = (candidate * ks).argmax(dim=1, keepdim=True)  # last index where the condition holds
    theta = (cumsum.gather(1, rho) - radius) / (rho + 1).to(flat.dtype)
    projected = flat.sign() * (abs_flat - theta).clamp_min(0)
    # Float rounding in theta can leave the sum a hair above the radius; a rescale closes the gap.
    projected = projected * (radius / projected.abs().sum(dim=1, keepdim=True).clamp_min(_TINY)).clamp(max=1.0)
    return torch.where(outside.unsqueeze(1), projected, flat)


def threat_from_dict(spec: dict) -> ThreatModel:
    """Inverse of ``ThreatModel.to_dict``."""
    kinds = {"linf": Linf, "l2": L2, "l1": L1}
    norm = str(spec.get("norm", "")).lower()
    if norm not in kinds:
        raise ConfigError(f"norm: unknown threat norm {spec.get('norm')!r}; choose one of {sorted(kinds)}")
    extra = {"sparsity": spec["sparsity"]} if norm == "l1" and "sparsity" in spec else {}
    return kinds[norm](eps=spec["eps"], bounds=tuple(spec.get("bounds", (0.0, 1.0))), **extra)


def make_threat(norm: str, eps: float, bounds: tuple[float, float] = (0.0, 1.0)) -> ThreatModel:
    """Build a threat model from a norm name: "linf", "l2" or "l1"."""
    return threat_from_dict({"norm": norm, "eps": eps, "bounds": bounds})
