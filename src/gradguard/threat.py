"""Threat models: the set of inputs an adversary may choose from.

A threat model is an Lp ball of radius ``eps`` around each input, intersected with the box ``bounds``
(the valid pixel range). It owns all norm geometry — projection, random start, steepest-ascent step,
distance — so an attack is written once and works for every norm.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from .errors import ConfigError, InputError

_TINY = 1e-12
# An eps above this fraction of the box's diameter in the threat's norm gets a LargeEpsWarning: for L∞ on [0, 1]
# that is 0.3, MNIST's customary budget and the largest in common use (CIFAR-10 uses 8/255 ≈ 0.031).
LARGE_EPS_FRACTION = 0.3
_CUSTOMARY = {"linf": "L∞: 0.3 on MNIST, 8/255 = 0.0314 on CIFAR-10", "l2": "L2: 2 on MNIST, 0.5 on CIFAR-10",
              "l1": "L1: 10 on MNIST, 12 on CIFAR-10"}


class LargeEpsWarning(UserWarning):
    """An eps that is allowed but larger than any customary budget: most likely in the wrong units."""


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a (batch,) tensor so it broadcasts against ``like`` (batch, ...)."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


@dataclass(frozen=True)
class ThreatModel:
    """An Lp ball of radius ``eps`` intersected with the box ``bounds``.

    Subclasses fix the norm. All methods take batched tensors (batch, ...) and work per sample.

    An eps whose ball holds the whole box (L∞: eps >= the box width; L2 / L1: eps >= the box's diameter in that
    norm, known once the input size is, see ``check_input_size``) is refused as a units mistake (``8`` meant
    ``8/255``), and one above ``LARGE_EPS_FRACTION`` of it warns (``LargeEpsWarning``). ``check_eps=False``
    turns both off, for deliberate whole-box probes (a minimal-perturbation attack with a huge eps, the
    masking checklist's unbounded attack).
    """

    eps: float
    bounds: tuple[float, float] = (0.0, 1.0)
    check_eps: bool = field(default=True, kw_only=True, compare=False, repr=False)
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
        self._check_eps_size(None, stacklevel=4)  # L∞ here; L2 and L1 once the input size is known

    # -- the eps check: a ball that holds the whole box is a units mistake ----------------------------------
    def diameter(self, size: int | None) -> float | None:
        """The radius at which the ball around any point of the box holds the whole box, for inputs of ``size``
        values per sample; None while the size is not known (L∞ does not need it)."""
        return None

    def check_input_size(self, size: int) -> None:
        """Refuse an eps at or above the box's diameter for inputs of ``size`` elements per sample (ConfigError,
        naming the likely intent); warn above ``LARGE_EPS_FRACTION`` of it. Called on every attack's, evaluation's
        and training's inputs (``attacks.base.check_inputs``), before any work."""
        if self.diameter(None) is None:  # else (L∞) it was checked when built
            self._check_eps_size(int(size), stacklevel=3)

    def check_against(self, x: Tensor) -> None:
        """``check_input_size`` for a batch ``x`` of shape (batch, ...)."""
        self.check_input_size(math.prod(x.shape[1:]))

    def _check_eps_size(self, size: int | None, stacklevel: int) -> None:
        diameter = self.diameter(size)
        if not self.check_eps or diameter is None:
            return
        lo, hi = self.bounds
        box = f"[{lo:g}, {hi:g}]"
        what = (f"width of the box {box}" if size is None else
                f"{self.norm.upper()} diameter of the box {box} for inputs of {size} values ({diameter:.4g})")
        if self.eps >= diameter:
            raise ConfigError(f"eps: {self.eps:g} is at least the {what}, so the {self.norm} ball holds every input "
                              f"and no robust accuracy means anything; {self._likely_intent(diameter)}")
        if self.eps > LARGE_EPS_FRACTION * diameter:
            warnings.warn(f"eps: {self.eps:g} is more than {LARGE_EPS_FRACTION:g} x the {what}, larger than any "
                          f"customary budget ({_CUSTOMARY.get(self.norm, 'see docs/evaluate.md')}); check its units",
                          LargeEpsWarning, stacklevel=stacklevel)

    def _likely_intent(self, diameter: float) -> str:
        """An eps given in 0-255 pixel levels, scaled to the box: the fix the refusal suggests."""
        lo, hi = self.bounds
        guess = self.eps / 255 * (hi - lo)
        if guess <= LARGE_EPS_FRACTION * diameter:
            of_width = "" if hi - lo == 1 else " of the box width"
            return f"did you mean {self.eps:g}/255{of_width} = {guess:.3g}? (eps is in the units of the bounds)"
        return (f"give eps in the units of the bounds [{lo:g}, {hi:g}] (for images in [0, 1]: 8/255 = 0.0314 for 8 "
                "of 255 pixel levels)")

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

    def with_eps(self, eps: float, *, check_eps: bool | None = None) -> "ThreatModel":
        """The same threat model with another radius (``check_eps``: as this one's unless given)."""
        return replace(self, eps=eps) if check_eps is None else replace(self, eps=eps, check_eps=check_eps)

    def ascent_step(self, grad: Tensor, step_size: float | Tensor, x_adv: Tensor | None = None) -> Tensor:
        """The steepest-ascent step of length ``step_size`` in this norm for gradient ``grad``.

        ``x_adv`` (optional) lets sparse norms skip coordinates that the box would clip anyway.
        ``step_size`` may be a float or a (batch,) tensor.
        """
        if isinstance(step_size, Tensor):
            step_size = _per_sample(step_size, grad)
        return step_size * self._unit_direction(grad, x_adv)

    def to_dict(self) -> dict:
        unchecked = {} if self.check_eps else {"check_eps": False}  # a deliberate whole-box ball reads back as one
        return {"norm": self.norm, "eps": self.eps, "bounds": list(self.bounds), **unchecked}

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

    def diameter(self, size: int | None) -> float | None:
        return self.bounds[1] - self.bounds[0]

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

    def diameter(self, size: int | None) -> float | None:
        return None if size is None else (self.bounds[1] - self.bounds[0]) * math.sqrt(size)

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

    def diameter(self, size: int | None) -> float | None:
        return None if size is None else (self.bounds[1] - self.bounds[0]) * size

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
    if spec.get("check_eps") is False:
        extra["check_eps"] = False
    return kinds[norm](eps=spec["eps"], bounds=tuple(spec.get("bounds", (0.0, 1.0))), **extra)


def check_threat(threat: Any) -> None:
    """Refuse anything but a ``ThreatModel`` (evaluate, evaluate_curve and the masking checklist take one)."""
    if not isinstance(threat, ThreatModel):
        raise InputError(f"threat: expected a ThreatModel such as Linf(eps=0.1) or L2(eps=1.0), got {type(threat).__name__}")


def make_threat(norm: str, eps: float, bounds: tuple[float, float] = (0.0, 1.0)) -> ThreatModel:
    """Build a threat model from a norm name: "linf", "l2" or "l1"."""
    return threat_from_dict({"norm": norm, "eps": eps, "bounds": bounds})
