"""Certified L2 robustness by randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019).

The *smoothed* classifier ``g(x) = argmax_c P(f(x + δ) = c)``, ``δ ~ N(0, σ²I)``, built from any base classifier
``f``, is provably constant inside the L2 ball of radius ``σ·Φ⁻¹(p_A)`` around ``x`` when its top class has
probability at least ``p_A ≥ 1/2`` (Theorem 1 of the paper, with ``p_B = 1 − p_A``). ``certify`` is the paper's
CERTIFY: ``n0`` noise draws select the top class, ``n`` fresh draws bound its probability from below with a
one-sided Clopper–Pearson interval at level ``1 − alpha``, and the sample is abstained on (−1) when that bound is
below 1/2. With probability at least ``1 − alpha`` over the noise, every returned radius is a true guarantee for
``g``; it says nothing about ``f`` itself. ``predict`` is the paper's PREDICT (a hypothesis test, no radius).

Noise is added in input space and never clamped to the pixel range, as in the paper: clamping would change the
distribution the theorem is about.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.base import check_logits, model_guard
from ..checks import check_labels, positive_int
from ..errors import ConfigError, InputError, ModelOutputError
from ..io import atomic_write_bytes, atomic_write_text
from ..models.outputs import as_logits_model
from ..threat import L2
from .results import exact_mean
from .stream import BlockSource

ABSTAIN = -1
GUARANTEE = ("certified radii hold for the smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c), each "
             "with probability >= 1 - alpha over the noise; they are not a guarantee for the base model f")
# Any finite input is allowed: smoothing has no pixel bounds (noise is never clamped). BlockSource checks only
# shapes, dtypes and NaN/inf against these bounds.
_UNBOUNDED = L2(eps=0.0, bounds=(-1e30, 1e30))
_DATA_BLOCK = 256  # inputs read at a time; each is then certified with its own noise batches


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 − alpha) Clopper–Pearson lower bound of a binomial proportion: the alpha-quantile of
    Beta(k, n − k + 1), and 0 when k = 0 (Clopper & Pearson 1934; the bound Cohen et al. use)."""
    if successes <= 0:
        return 0.0
    from scipy.special import betaincinv  # scipy comes with scikit-learn, a dependency

    return float(betaincinv(successes, trials - successes + 1, alpha))


def binomial_two_sided_p_half(successes: int, trials: int) -> float:
    """Two-sided p-value of ``successes`` in ``trials`` under Binomial(trials, 1/2) (exact; symmetric case)."""
    if trials <= 0:
        return 1.0
    from scipy.special import betainc

    k = max(successes, trials - successes)
    upper_tail = float(betainc(k, trials - k + 1, 0.5)) if k > 0 else 1.0  # P(X >= k)
    return min(1.0, 2.0 * upper_tail)


def normal_quantile(p: float) -> float:
    """Φ⁻¹(p), the standard normal quantile, for 0 < p < 1."""
    return statistics.NormalDist().inv_cdf(p)


def certified_radius(p_lower: float, sigma: float) -> float:
    """σ·Φ⁻¹(p_lower) for p_lower ≥ 1/2 (Theorem 1 with p_B = 1 − p_A); 0 below 1/2, where CERTIFY abstains."""
    return sigma * normal_quantile(p_lower) if p_lower >= 0.5 else 0.0


# ------------------------------------------------------------------------------------------------
# The result
# ------------------------------------------------------------------------------------------------
@dataclass
class CertifyResult:
    """What ``certify`` found, per sample and in total.

    ``prediction[i]`` is the smoothed classifier's class (−1: abstained), ``radius[i]`` the certified L2 radius
    (0 when abstained), ``p_lower[i]`` the Clopper–Pearson lower bound on the top class's probability under noise,
    ``top_count[i]`` how many of the ``n`` draws voted for it. ``base_prediction`` is the base model's prediction
    on the clean input (for comparison only; nothing is certified about it).
    """

    prediction: Tensor
    radius: Tensor
    labels: Tensor
    p_lower: Tensor
    top_count: Tensor
    base_prediction: Tensor
    sigma: float
    n0: int
    n: int
    alpha: float
    batch_size: int
    seed: int | None
    elapsed_s: float
    time_per_sample_s: float = field(default=math.nan)

    @property
    def correct(self) -> Tensor:
        """Per-sample bool: the smoothed classifier predicted the label (an abstention is never correct)."""
        return self.prediction == self.labels

    @property
    def n_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def abstain_rate(self) -> float:
        return exact_mean(self.prediction == ABSTAIN)

    def certified_accuracy(self, radius: float) -> float:
        """Fraction of samples predicted correctly with a certified radius ≥ ``radius`` (Cohen et al., §4)."""
        return exact_mean(self.correct & (self.radius >= float(radius)))

    def curve(self, radii: Sequence[float] | None = None) -> dict[str, list[float]]:
        """Certified accuracy at each radius (default 0, 0.25, 0.5, ... up to the largest certified radius)."""
        radii = default_radii(self.radius) if radii is None else [float(r) for r in radii]
        return {"radius": radii, "certified_accuracy": [self.certified_accuracy(r) for r in radii]}

    def to_dict(self) -> dict:
        """JSON-ready settings, headline numbers, the curve and the per-sample lists."""
        return {
            "method": "randomized smoothing (Cohen, Rosenfeld & Kolter 2019)", "guarantee": GUARANTEE,
            "norm": "l2", "sigma": self.sigma, "n0": self.n0, "n": self.n, "alpha": self.alpha,
            "batch_size": self.batch_size, "seed": self.seed, "n_samples": self.n_samples,
            "smoothed_accuracy": self.certified_accuracy(0.0), "abstain_rate": self.abstain_rate,
            "base_clean_accuracy": exact_mean(self.base_prediction == self.labels),
            "certified_accuracy": {f"{r:g}": self.certified_accuracy(r) for r in (0.25, 0.5, 0.75, 1.0)},
            "curve": self.curve(), "elapsed_s": self.elapsed_s, "time_per_sample_s": self.time_per_sample_s,
            "samples": {"label": self.labels.tolist(), "prediction": self.prediction.tolist(),
                        "radius": [round(r, 6) for r in self.radius.tolist()],
                        "p_lower": [round(p, 8) for p in self.p_lower.tolist()], "top_count": self.top_count.tolist(),
                        "base_prediction": self.base_prediction.tolist()},
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text of ``to_dict()``, written atomically when ``path`` is given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, data: dict) -> CertifyResult:
        samples = data["samples"]
        return cls(
            prediction=torch.tensor(samples["prediction"], dtype=torch.int64),
            radius=torch.tensor(samples["radius"], dtype=torch.float64),
            labels=torch.tensor(samples["label"], dtype=torch.int64),
            p_lower=torch.tensor(samples["p_lower"], dtype=torch.float64),
            top_count=torch.tensor(samples["top_count"], dtype=torch.int64),
            base_prediction=torch.tensor(samples["base_prediction"], dtype=torch.int64),
            sigma=data["sigma"], n0=data["n0"], n=data["n"], alpha=data["alpha"], batch_size=data["batch_size"],
            seed=data.get("seed"), elapsed_s=data["elapsed_s"], time_per_sample_s=data.get("time_per_sample_s", math.nan))

    def summary(self) -> str:
        """A small text table: smoothed accuracy, abstentions and certified accuracy at a few radii."""
        lines = [f"{self.n_samples} samples, sigma={self.sigma:g}, n0={self.n0}, n={self.n}, alpha={self.alpha:g} "
                 "(guarantee for the smoothed classifier, not the base model)",
                 f"  {'base model, clean':<22}{100 * exact_mean(self.base_prediction == self.labels):7.2f} %",
                 f"  {'smoothed (radius 0)':<22}{100 * self.certified_accuracy(0):7.2f} %   "
                 f"(abstained {100 * self.abstain_rate:.1f} %)"]
        for r in (0.25, 0.5, 0.75, 1.0):
            lines.append(f"  {f'certified, L2 >= {r:g}':<22}{100 * self.certified_accuracy(r):7.2f} %")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def plot(self, path: str | Path, label: str = "smoothed model") -> Path:
        """Write certified accuracy vs L2 radius as a PNG (atomically); returns the path."""
        from ..viz.certify import certified_accuracy

        png = certified_accuracy({label: exact_curve(self.radius, self.correct)}, self.sigma)
        return atomic_write_bytes(path, png)


def default_radii(radius: Tensor, step: float = 0.25) -> list[float]:
    """0, step, 2·step, ... up to the largest certified radius (at least up to 1.0)."""
    largest = max(1.0, float(radius.max()) if radius.numel() else 0.0)
    return [round(k * step, 6) for k in range(int(math.ceil(largest / step + 1e-9)) + 1)]


def exact_curve(radius: Sequence[float] | Tensor, correct: Sequence[bool] | Tensor) -> dict[str, list[float]]:
    """The certified-accuracy step function at every radius where it drops (for plots)."""
    radii = radius.tolist() if isinstance(radius, Tensor) else list(radius)
    flags = correct.tolist() if isinstance(correct, Tensor) else list(correct)
    total = max(1, len(radii))
    held = sorted(float(r) for r, ok in zip(radii, flags, strict=True) if ok)
    xs, ys = [0.0], [len(held) / total]
    for i, r in enumerate(held):
        xs.append(r)
        ys.append((len(held) - i - 1) / total)
    return {"radius": xs, "certified_accuracy": ys}


# ------------------------------------------------------------------------------------------------
# certify and predict
# ------------------------------------------------------------------------------------------------
def certify(
    model: nn.Module,
    data: Any,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    *,
    batch_size: int = 1000,
    seed: int | None = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    max_samples: int | None = None,
) -> CertifyResult:
    """Certify the smoothed version of ``model`` on every sample of ``data`` (CERTIFY of Cohen et al. 2019).

    Per input: ``n0`` draws of ``f(x + δ)`` pick the top class ĉ; ``n`` fresh draws count its votes n_A;
    p_A ≥ the one-sided (1 − alpha) Clopper–Pearson bound of n_A / n; the result is ĉ with radius σ·Φ⁻¹(p_A), or
    an abstention (−1, radius 0) when that bound is below 1/2. The paper's defaults: n0 = 100, n = 100 000,
    alpha = 0.001. The noise is streamed in batches of ``batch_size`` draws and only class votes are kept, so
    memory is set by ``batch_size``, never by ``n``.

    Args:
        data: what ``evaluate`` takes — an ``(x, y)`` pair of tensors, a map-style Dataset such as
            ``gradguard.open_split("digits")``, a DataLoader of ``(x, y)`` batches — or a dataset name ("digits":
            its test split). ``max_samples`` caps it.
        sigma: the noise level σ > 0 (in input units, e.g. pixels in [0, 1]); train the base model with the same
            noise (``Trainer(model, "gaussian", method_kwargs={"sigma": sigma})``) or it abstains almost always.
        seed: each sample draws its noise from a generator seeded by (seed, sample index), so a sample's result
            does not depend on the samples before it; None uses torch's global RNG.
        device: where the noise and the model run; None: the model's own device.

    The model's mode, parameters and ``requires_grad`` flags are left as they were.
    """
    started = time.perf_counter()
    sigma, n0, n, alpha = check_settings(sigma, n0, n, alpha)
    batch_size = positive_int(batch_size, "batch_size")
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    model = as_logits_model(model)  # a dict / tuple / ModelOutput: its logits (gradguard.models.Logits)
    where = _device(model, device)
    source = BlockSource(_as_data(data), _UNBOUNDED, _DATA_BLOCK, max_samples)
    voter = _Voter(model, sigma, batch_size, where)
    rows: list[tuple[int, int, float, int, int]] = []  # prediction, votes, p_lower, base prediction, label
    with model_guard(model), torch.no_grad():
        for x, y, base in _inputs(source, voter, progress):
            generator = _generator(seed, len(rows), where)
            rows.append((*_certify_one(voter, x, base.shape[0], n0, n, alpha, generator), int(base.argmax()), int(y)))
    if not rows:
        raise InputError("data: the loader yielded no batches; pass a non-empty dataset")
    elapsed = time.perf_counter() - started

    def column(k: int, dtype: torch.dtype) -> Tensor:
        return torch.tensor([row[k] for row in rows], dtype=dtype)

    prediction, p_lower = column(0, torch.int64), column(2, torch.float64)
    radius = torch.tensor([certified_radius(float(p), sigma) if c != ABSTAIN else 0.0
                           for c, p in zip(prediction.tolist(), p_lower.tolist(), strict=True)], dtype=torch.float64)
    return CertifyResult(prediction=prediction, radius=radius, labels=column(4, torch.int64), p_lower=p_lower,
                         top_count=column(1, torch.int64), base_prediction=column(3, torch.int64), sigma=sigma, n0=n0,
                         n=n, alpha=alpha, batch_size=batch_size, seed=seed, elapsed_s=round(elapsed, 3),
                         time_per_sample_s=elapsed / len(rows))


def _certify_one(voter: _Voter, x: Tensor, num_classes: int, n0: int, n: int, alpha: float,
                 generator: torch.Generator | None) -> tuple[int, int, float]:
    """CERTIFY for one input: (class or −1, votes for the selected class among the n draws, p_A lower bound)."""
    top = int(voter.counts(x, n0, num_classes, generator).argmax())
    votes = int(voter.counts(x, n, num_classes, generator)[top])
    p_lower = clopper_pearson_lower(votes, n, alpha)
    return (top if p_lower >= 0.5 else ABSTAIN), votes, p_lower


def predict(model: nn.Module, x: Tensor, sigma: float, n: int = 100_000, alpha: float = 0.001, *,
            batch_size: int = 1000, seed: int | None = 0) -> Tensor:
    """PREDICT of Cohen et al. 2019: the smoothed classifier's class per input of ``x`` (batch, ...), or −1.

    ``n`` draws count the votes; the top class is returned when a two-sided binomial test of its count against
    the runner-up's rejects "equally likely" at level ``alpha`` (so a wrong class is returned with probability at
    most ``alpha``), else −1 (abstain).
    """
    sigma, _, n, alpha = check_settings(sigma, 1, n, alpha)
    batch_size = positive_int(batch_size, "batch_size")
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise InputError("x: expected a floating-point (batch, ...) tensor; add a batch dimension with x.unsqueeze(0)")
    model = as_logits_model(model)
    where = _device(model, None)
    voter = _Voter(model, sigma, batch_size, where)
    predictions = []
    with model_guard(model), torch.no_grad():
        num_classes = check_logits(model(x[:1].to(where)), 1).shape[1]
        for index in range(x.shape[0]):
            counts = voter.counts(x[index].to(where), n, num_classes, _generator(seed, index, where))
            top2 = counts.topk(2).values.tolist()
            first = int(counts.argmax())
            significant = binomial_two_sided_p_half(top2[0], top2[0] + top2[1]) <= alpha
            predictions.append(first if significant else ABSTAIN)
    return torch.tensor(predictions, dtype=torch.int64)


def check_settings(sigma: Any, n0: Any, n: Any, alpha: Any) -> tuple[float, int, int, float]:
    """Validated (sigma, n0, n, alpha): one ConfigError line naming the argument and the fix."""
    try:
        sigma_value = float(sigma)
    except (TypeError, ValueError):
        raise ConfigError(f"sigma: expected a noise level > 0 such as 0.25, got {sigma!r}") from None
    if not math.isfinite(sigma_value) or sigma_value <= 0:
        raise ConfigError(f"sigma: the noise level must be a finite number > 0 (e.g. 0.25), got {sigma!r}")
    n0 = positive_int(n0, "n0")
    n = positive_int(n, "n")
    if n0 > n:
        raise ConfigError(f"n0: the selection draws ({n0}) must not exceed the estimation draws n ({n}); "
                          "use e.g. n0=100, n=100000")
    try:
        alpha_value = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"alpha: expected a failure probability in (0, 1) such as 0.001, got {alpha!r}") from None
    if not 0 < alpha_value < 1:
        raise ConfigError(f"alpha: the failure probability must lie strictly between 0 and 1 (e.g. 0.001), "
                          f"got {alpha!r}")
    return sigma_value, n0, n, alpha_value


# ------------------------------------------------------------------------------------------------
# Noise votes
# ------------------------------------------------------------------------------------------------
class _Voter:
    """Counts the base model's votes on ``x + N(0, σ²I)`` in batches of at most ``batch_size`` draws."""

    def __init__(self, model: nn.Module, sigma: float, batch_size: int, device: torch.device) -> None:
        self.model, self.sigma, self.batch_size, self.device = model, sigma, batch_size, device

    def counts(self, x: Tensor, draws: int, num_classes: int, generator: torch.Generator | None) -> Tensor:
        """Votes per class (int64, on the device) of ``draws`` noisy copies of the single input ``x``."""
        counts = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for size in _chunks(draws, self.batch_size):
            noisy = torch.randn((size, *x.shape), generator=generator, device=self.device, dtype=x.dtype)
            noisy.mul_(self.sigma).add_(x)  # never clamped: the theorem is about the unclamped Gaussian
            logits = self.model(noisy)
            if not isinstance(logits, Tensor) or logits.shape != (size, num_classes):
                check_logits(logits, size)
                raise ModelOutputError(f"model: returned {num_classes} classes on the clean input but "
                                       f"{tuple(logits.shape)} logits on noisy ones; make its output shape fixed")
            finite &= torch.isfinite(logits).all()  # checked once per input: no device sync per batch
            counts += torch.bincount(logits.argmax(1), minlength=num_classes)
        if not bool(finite):
            raise ModelOutputError("model: returned NaN or inf logits on noisy inputs; check its weights and "
                                   "input normalisation")
        return counts


def _chunks(total: int, size: int) -> Iterator[int]:
    while total > 0:
        yield min(size, total)
        total -= size


def _inputs(source: BlockSource, voter: _Voter, progress: bool) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(x, y, base logits) per input, read block by block; the clean forward also checks the labels."""
    bar = None
    if progress:
        from ..runtime.progress import progress_bar

        bar = progress_bar(total=source.n, desc="certify", unit="sample")
    try:
        for _, read in source.blocks():
            block = read()
            x, y = block.x.to(voter.device), block.y
            logits = check_logits(voter.model(x), x.shape[0])
            check_labels(y, logits.shape[1], "data")
            for i in range(x.shape[0]):
                yield x[i], y[i], logits[i]
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    """A generator for sample ``index`` seeded from (seed, index); None (torch's global RNG) when seed is None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed((int(seed) * 1_000_003 + index * 0x9E3779B1 + 1) % (2**63 - 1))
    return generator


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    parameter = next(model.parameters(), None)
    own = parameter.device if parameter is not None else torch.device("cpu")
    if device is None:
        return own
    from ..attacks.base import resolve_device

    wanted = resolve_device(device)
    if parameter is not None and (wanted.type != own.type or (wanted.index or 0) != (own.index or 0)):
        raise ConfigError(f"device: the model is on {own} but device={str(device)!r}; move it first with "
                          f"model.to({str(wanted)!r}) or pass device=None")
    return wanted


def _as_data(data: Any) -> Any:
    """A dataset name becomes its streamed test split; gradguard's in-memory Dataset its test tensors."""
    if isinstance(data, str):
        from ..data import open_split

        return open_split(data, "test")
    x_test, y_test = getattr(data, "x_test", None), getattr(data, "y_test", None)
    if isinstance(x_test, Tensor) and isinstance(y_test, Tensor):
        return x_test, y_test
    return data

