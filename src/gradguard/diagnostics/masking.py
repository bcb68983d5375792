"""The gradient-masking checklist: automatic sanity checks on a robustness evaluation.

A model can look robust because its gradients are useless to the attacker (saturated softmax, rounding or other
non-differentiable layers, randomness), not because it is robust. Athalye, Carlini & Wagner (ICML 2018, §3.1)
and Carlini et al. ("On Evaluating Adversarial Robustness", 2019, §§4-5) list the tell-tale signs; each becomes
one check here, run on a small subset with small budgets, and reported as PASS / WARN / FAIL with the measured
numbers and one line of advice. The verdict is the worst status.

Thresholds (fractions of the correctly classified samples checked) were tuned on honest and deliberately masked
models (tests/test_masking.py): honest MLPs/CNNs stay well inside them, masked models land far outside.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..attacks import FGSM, PGD
from ..attacks.base import Attack, check_logits, input_gradient, model_guard, positive_int
from ..attacks.losses import cross_entropy
from ..errors import InputError
from ..threat import ThreatModel

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
SEVERITY = {PASS: 0, WARN: 1, FAIL: 2}

# Thresholds: (warn above, fail above), as fractions of the checked samples.
PGD_WORSE_THAN_FGSM = (0.01, 0.05)      # PGD accuracy minus FGSM accuracy
NOT_MONOTONE = (0.02, 0.05)             # largest rise of PGD accuracy when eps grows
UNBOUNDED_ACCURACY = (0.02, 0.10)       # PGD accuracy when the ball covers the whole box
NOT_CONVERGED = (0.05, 0.15)            # accuracy drop when steps and restarts are doubled
SQUARE_STRONGER = (0.02, 0.05)          # PGD accuracy minus Square accuracy
NOISE_ONLY = (0.01, 0.03)               # samples random noise breaks but PGD does not
ZERO_GRADIENTS = (0.10, 0.50)           # samples with a zero or non-finite input gradient
LOSS_FLAT = (0.10, 0.50)                # samples whose loss does not rise along the attack path
NON_DETERMINISM = (1e-6, 1e-4)          # largest relative logit change between two identical forward passes

EPS_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass
class Check:
    """One item of the checklist: ``status`` is PASS, WARN or FAIL; ``evidence`` holds the measured numbers."""

    name: str
    status: str
    evidence: dict
    advice: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MaskingReport:
    """The checklist's outcome: every check, and the verdict (the worst status)."""

    checks: list[Check]
    n_samples: int
    threat: dict
    elapsed_s: float
    settings: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return max((c.status for c in self.checks), key=SEVERITY.__getitem__, default=PASS)

    def check(self, name: str) -> Check:
        for item in self.checks:
            if item.name == name:
                return item
        raise KeyError(f"no check named {name!r}; checks: {[c.name for c in self.checks]}")

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "n_samples": self.n_samples, "threat": self.threat,
                "elapsed_s": self.elapsed_s, "settings": self.settings, "checks": [c.to_dict() for c in self.checks]}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            from ..io import atomic_write_text

            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "MaskingReport":
        from ..evaluation.robustness import _read_json

        data = _read_json(text_or_path)
        return cls(checks=[Check(**c) for c in data["checks"]], n_samples=data["n_samples"], threat=data["threat"],
                   elapsed_s=data["elapsed_s"], settings=data.get("settings", {}))

    def summary(self) -> str:
        lines = [f"gradient-masking checklist: {self.verdict} ({self.n_samples} samples)"]
        for c in self.checks:
            lines.append(f"  {c.status:<5} {c.name}: {c.advice}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _grade(value: float, thresholds: tuple[float, float]) -> str:
    warn, fail = thresholds
    return FAIL if value > fail else WARN if value > warn else PASS


# ------------------------------------------------------------------------------------------------
# The checklist
# ------------------------------------------------------------------------------------------------
def check_masking(model: nn.Module, data: Any, threat: ThreatModel, *, n_samples: int = 200, seed: int = 0,
                  steps: int = 20, square_queries: int = 1000, noise_draws: int = 20,
                  batch_size: int = 256) -> MaskingReport:
    """Run the gradient-masking checklist on the first ``n_samples`` samples of ``data``.

    ``data`` is any form ``evaluate`` takes (tensors, a map-style Dataset, a DataLoader); only the first
    ``n_samples`` samples are read and held (a shuffled loader gives a random subset). ``seed`` fixes the attacks. The white-box reference is PGD with
    ``steps`` steps (CE loss, random start); Square uses ``square_queries`` queries; random noise draws
    ``noise_draws`` uniform points per sample from the ball. The model is left untouched.
    """
    from ..evaluation.robustness import _check_threat, collect_data

    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _check_threat(threat)
    n_samples, steps = positive_int(n_samples, "n_samples"), positive_int(steps, "steps")
    square_queries, noise_draws = positive_int(square_queries, "square_queries"), positive_int(noise_draws, "noise_draws")
    x, y = collect_data(data, threat, max_samples=n_samples)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    x, y = x.to(device), y.to(device)
    probe = _Probe(model, threat, seed, steps, batch_size)
    with model_guard(model):
        checks = [probe.determinism(x)]
        correct = probe.predict(x) == y
        xc, yc = x[correct], y[correct]
        if xc.shape[0] == 0:
            checks.append(Check("correct_samples", FAIL, {"n_correct": 0},
                                "no sample is classified correctly: there is nothing to attack; check the model"))
        else:
            checks += probe.run_all(xc, yc, square_queries, noise_draws)
    settings = {"seed": seed, "steps": steps, "square_queries": square_queries, "noise_draws": noise_draws,
                "n_correct": int(correct.sum())}
    return MaskingReport(checks=checks, n_samples=int(y.shape[0]), threat=threat.to_dict(),
                         elapsed_s=round(time.perf_counter() - started, 3), settings=settings)


class _Probe:
    """The measurements behind the checks; every attack accuracy is a fraction of the samples it is given."""

    def __init__(self, model: nn.Module, threat: ThreatModel, seed: int, steps: int, batch_size: int) -> None:
        self.model, self.threat, self.seed, self.steps, self.batch_size = model, threat, seed, steps, batch_size

    # -- primitives ---------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return torch.cat([check_logits(self.model(b), b.shape[0]).argmax(1) for b in x.split(self.batch_size)])

    def correct_after(self, make_attack: Callable[[], Attack], x: Tensor, y: Tensor) -> Tensor:
        """Per sample: still correct at the attack's point (projected and re-scored by the model)."""
        out = []
        for xb, yb in zip(x.split(self.batch_size), y.split(self.batch_size), strict=True):
            attack = make_attack()
            out.append(self.predict(attack.threat.project(attack.run(xb, yb).x_adv, xb)) == yb)
        return torch.cat(out)

    def pgd(self, threat: ThreatModel, steps: int | None = None, restarts: int = 1) -> Callable[[], Attack]:
        return lambda: PGD(self.model, threat, steps=steps or self.steps, restarts=restarts, seed=self.seed)

    def fgsm(self) -> Callable[[], Attack]:
        return lambda: FGSM(self.model, self.threat)

    def box_eps(self, x: Tensor) -> float:
        """The radius at which the ball contains the whole box around every input."""
        width = self.threat.bounds[1] - self.threat.bounds[0]
        d = x[0].numel()
        return {"linf": width, "l2": width * math.sqrt(d), "l1": width * d}.get(self.threat.norm, width)

    # -- the checks ---------------------------------------------------------------------------------
    def run_all(self, x: Tensor, y: Tensor, square_queries: int, noise_draws: int) -> list[Check]:
        pgd_correct = self.correct_after(self.pgd(self.threat), x, y)
        pgd_acc = _mean(pgd_correct)
        return [
            self.gradients(x, y),
            self.loss_rises(x, y),
            self.iterative_vs_single_step(x, y, pgd_acc),
            self.monotone_in_eps(x, y, pgd_acc),
            self.unbounded(x, y),
            self.convergence(x, y, pgd_acc),
            self.black_box(x, y, pgd_correct, square_queries),
            self.random_noise(x, y, pgd_correct, noise_draws),
        ]

    @torch.no_grad()
    def determinism(self, x: Tensor) -> Check:
        first = torch.cat([self.model(b) for b in x.split(self.batch_size)])
        second = torch.cat([self.model(b) for b in x.split(self.batch_size)])
        scale = float(first.abs().max().clamp_min(1e-12))
        change = float((first - second).abs().max()) / scale if torch.isfinite(first).all() else float("inf")
        flips = float((first.argmax(1) != second.argmax(1)).float().mean())
        status = _grade(change, NON_DETERMINISM)
        return Check("deterministic", status, {"max_relative_logit_change": change, "prediction_flips": flips},
                     "the model gives the same logits twice" if status == PASS else
                     "the model is random at test time: evaluate with EOT (average gradients over the randomness) "
                     "and report the accuracy of the randomised model over several draws")

    def gradients(self, x: Tensor, y: Tensor) -> Check:
        grads = torch.cat([input_gradient(self.model, xb, yb, cross_entropy, False)[0]
                           for xb, yb in zip(x.split(self.batch_size), y.split(self.batch_size), strict=True)])
        flat = grads.reshape(grads.shape[0], -1)
        finite = torch.isfinite(flat).all(dim=1)
        nonzero = finite & (flat.abs().amax(dim=1) > 1e-20)
        bad = 1.0 - _mean(nonzero)
        status = FAIL if not bool(finite.all()) else _grade(bad, ZERO_GRADIENTS)
        return Check("gradients_nonzero", status,
                     {"fraction_zero_or_nonfinite": bad, "fraction_nonfinite": 1.0 - _mean(finite),
                      "median_grad_l1": float(flat.abs().sum(1)[finite].median()) if bool(finite.any()) else None},
                     "input gradients are finite and non-zero" if status == PASS else
                     "input gradients vanish or are not finite (saturated softmax, rounding, non-differentiable "
                     "layers): attack a differentiable approximation (BPDA) or use a margin/DLR loss and Square")

    def loss_rises(self, x: Tensor, y: Tensor) -> Check:
        """Steepest ascent on CE from the clean input, no early stop: does the loss go up?"""
        step = 2.5 * self.threat.eps / self.steps
        rises, curves = [], []
        for xb, yb in zip(x.split(self.batch_size), y.split(self.batch_size), strict=True):
            x_adv, losses = xb.clone(), []
            for _ in range(self.steps):
                grad, _, loss = input_gradient(self.model, x_adv, yb, cross_entropy, False)
                losses.append(loss)
                x_adv = self.threat.project(x_adv + self.threat.ascent_step(grad, step, x_adv), xb)
            with torch.no_grad():
                losses.append(cross_entropy(self.model(x_adv), yb, False))
            path = torch.stack(losses)  # (steps + 1, batch)
            start = path[0]
            rises.append(path.max(0).values > start + 1e-3 * start.abs() + 1e-6)
            curves.append(path)
        rose = torch.cat(rises)
        mean_path = torch.cat(curves, dim=1).mean(1)
        flat = 1.0 - _mean(rose)
        status = _grade(flat, LOSS_FLAT)
        marks = sorted({0, len(mean_path) // 4, len(mean_path) // 2, len(mean_path) - 1})
        return Check("loss_rises_along_path", status,
                     {"fraction_flat": flat, "mean_loss_at_step": {str(i): float(mean_path[i]) for i in marks}},
                     "the attack loss rises along the PGD path" if status == PASS else
                     "the loss does not rise along the gradient path: gradients do not point uphill (masking); "
                     "try BPDA, a smoother surrogate, or gradient-free attacks")

    def iterative_vs_single_step(self, x: Tensor, y: Tensor, pgd_acc: float) -> Check:
        fgsm_acc = _mean(self.correct_after(self.fgsm(), x, y))
        gap = pgd_acc - fgsm_acc
        status = _grade(gap, PGD_WORSE_THAN_FGSM)
        return Check("iterative_beats_single_step", status,
                     {"pgd_accuracy": pgd_acc, "fgsm_accuracy": fgsm_acc, "pgd_steps": self.steps},
                     "PGD is at least as strong as FGSM" if status == PASS else
                     "a single FGSM step beats iterative PGD: the loss surface is locally misleading; use more "
                     "restarts, a smaller step, and gradient-free attacks")

    def monotone_in_eps(self, x: Tensor, y: Tensor, pgd_acc: float) -> Check:
        eps_values = [m * self.threat.eps for m in EPS_MULTIPLIERS]
        accuracies = [pgd_acc if m == 1.0 else _mean(self.correct_after(self.pgd(self.threat.with_eps(e)), x, y))
                      for m, e in zip(EPS_MULTIPLIERS, eps_values, strict=True)]
        rise = max([0.0] + [b - a for a, b in zip(accuracies[:-1], accuracies[1:], strict=True)])
        status = _grade(rise, NOT_MONOTONE)
        return Check("accuracy_decreases_with_eps", status,
                     {"eps": eps_values, "pgd_accuracy": accuracies, "largest_rise": rise},
                     "accuracy falls as eps grows" if status == PASS else
                     "a larger eps gives a higher accuracy: the attack is failing, not the model succeeding; "
                     "use more steps/restarts and check the gradients")

    def unbounded(self, x: Tensor, y: Tensor) -> Check:
        eps = self.box_eps(x)
        accuracy = _mean(self.correct_after(self.pgd(self.threat.with_eps(eps), steps=max(self.steps, 50)), x, y))
        status = _grade(accuracy, UNBOUNDED_ACCURACY)
        return Check("unbounded_attack_succeeds", status, {"eps": eps, "pgd_accuracy": accuracy},
                     "with the whole box allowed, PGD breaks every sample" if status == PASS else
                     "PGD fails even when any input is allowed: the attack does not work on this model; "
                     "its robust accuracy at the real eps means nothing")

    def convergence(self, x: Tensor, y: Tensor, pgd_acc: float) -> Check:
        doubled = _mean(self.correct_after(self.pgd(self.threat, steps=2 * self.steps, restarts=2), x, y))
        drop = pgd_acc - doubled
        status = _grade(drop, NOT_CONVERGED)
        return Check("attack_converged", status,
                     {"pgd_accuracy": pgd_acc, "pgd_doubled_accuracy": doubled, "steps": self.steps,
                      "doubled": {"steps": 2 * self.steps, "restarts": 2}, "drop": drop},
                     "doubling steps and restarts changes little" if status == PASS else
                     "more steps/restarts still lower the accuracy: the attack has not converged; "
                     "raise the budget (or use the 'standard' suite) before trusting the number")

    def black_box(self, x: Tensor, y: Tensor, pgd_correct: Tensor, queries: int) -> Check:
        try:
            from ..attacks.square import Square
        except ImportError:
            return Check("black_box_not_stronger", WARN, {"square": "not available"},
                         "the Square attack is not available in this installation: this check did not run")
        if self.threat.norm not in ("linf", "l2"):
            return Check("black_box_not_stronger", PASS, {"skipped": f"Square has no {self.threat.norm} version"},
                         "not applicable to this norm (Square supports linf and l2)")
        square_correct = self.correct_after(lambda: Square(self.model, self.threat, queries=queries, seed=self.seed), x, y)
        only = _mean(pgd_correct & ~square_correct)
        # Both attacks are heuristics: each misses a few samples the other breaks, so compare success rates.
        status = _grade(_mean(pgd_correct) - _mean(square_correct), SQUARE_STRONGER)
        return Check("black_box_not_stronger", status,
                     {"square_accuracy": _mean(square_correct), "pgd_accuracy": _mean(pgd_correct),
                      "fraction_broken_only_by_square": only, "queries": queries},
                     "gradient-free Square finds nothing PGD misses" if status == PASS else
                     "a black-box attack beats white-box PGD: the gradients are masked; report the worst case "
                     "over both (the 'standard' suite does) and fix the gradient path")

    @torch.no_grad()
    def random_noise(self, x: Tensor, y: Tensor, pgd_correct: Tensor, draws: int) -> Check:
        generator = torch.Generator(device=x.device).manual_seed(int(self.seed) + 1)
        noise_correct = torch.ones_like(y, dtype=torch.bool)
        for _ in range(draws):
            noisy = self.threat.random_start(x, generator)
            noise_correct &= self.predict(noisy) == y
        only = _mean(pgd_correct & ~noise_correct)
        status = _grade(only, NOISE_ONLY)
        return Check("random_noise_not_stronger", status,
                     {"noise_accuracy": _mean(noise_correct), "pgd_accuracy": _mean(pgd_correct),
                      "fraction_broken_only_by_noise": only, "draws": draws},
                     "random noise finds nothing PGD misses" if status == PASS else
                     "random points in the ball beat PGD: the gradients are misleading; evaluate with "
                     "gradient-free attacks and fix the gradient path")


def _mean(mask: Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else float("nan")
