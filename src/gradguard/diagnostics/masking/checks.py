"""The gradient-masking checklist itself: ``check_masking`` and the probe whose measurements become the checks.

One algorithm (Athalye et al. 2018, §3.1; Carlini et al. 2019, §§4-5): each tell-tale sign of masking is one
check, run on a small subset with small budgets and graded against the thresholds of
``gradguard.evaluation.signals``; the determinism numbers come from ``gradguard.evaluation.randomness``. The
package docstring (``gradguard.diagnostics.masking``) describes the checks and how their verdicts combine.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ...attacks import APGD, FGSM, PGD
from ...attacks.base import Attack, check_logits, model_guard, positive_int
from ...attacks.losses import cross_entropy
from ...core.ascent import objective_gradient, projected_ascent
from ...errors import InputError
from ...evaluation.randomness import measure_determinism
from ...evaluation.signals import (
    EPS_MULTIPLIERS,
    FAIL,
    LOSS_FLAT,
    MISLEADING,
    NEXT_ATTACK,
    NOISE_ONLY,
    NON_DETERMINISM,
    NOT_CONVERGED,
    NOT_MONOTONE,
    PASS,
    PGD_WORSE_THAN_FGSM,
    RANDOM,
    SATURATED,
    SHATTERED,
    SQUARE_STRONGER,
    UNBOUNDED_ACCURACY,
    UNCONVERGED,
    WARN,
    ZERO_GRADIENTS,
    gradient_health,
    loss_rose,
)
from ...evaluation.stream import collect_data
from ...models.outputs import as_logits_model
from ...threat import ThreatModel, check_threat
from .report import Check, MaskingReport


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
    ``n_samples`` samples are read and held (a shuffled loader gives a random subset). ``seed`` fixes the attacks.
    The white-box reference is PGD with ``steps`` steps (CE loss, random start); APGD-CE with ``2·steps`` steps, FGSM
    and PGD with doubled steps and restarts join it; the strongest of them is what Square (``square_queries``
    queries) and random noise (``noise_draws`` uniform points per sample from the ball) are compared with.
    The model is left untouched.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    model = as_logits_model(model)  # a dict / tuple / ModelOutput: its logits (gradguard.models.Logits)
    check_threat(threat)
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
            checks += probe.run_all(xc, yc, square_queries, noise_draws, deterministic=checks[0])
    settings = {"seed": seed, "steps": steps, "apgd_steps": 2 * steps, "square_queries": square_queries,
                "noise_draws": noise_draws, "n_correct": int(correct.sum())}
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

    def apgd(self) -> Callable[[], Attack]:
        return lambda: APGD(self.model, self.threat, loss="ce", steps=2 * self.steps, seed=self.seed)

    # -- the checks ---------------------------------------------------------------------------------
    def run_all(self, x: Tensor, y: Tensor, square_queries: int, noise_draws: int, deterministic: Check) -> list[Check]:
        white = self.white_box(x, y)
        gradients = self.gradients(x, y)
        loss_rises = self.loss_rises(x, y, _cause(deterministic, gradients, None))
        cause = _cause(deterministic, gradients, loss_rises)
        return [
            gradients,
            loss_rises,
            self.iterative_vs_single_step(white, cause),
            self.monotone_in_eps(x, y, white.pgd_accuracy, cause),
            self.unbounded(x, y, cause),
            self.convergence(white, cause),
            self.black_box(x, y, white, square_queries, cause),
            self.random_noise(x, y, white, noise_draws, cause),
        ]

    def white_box(self, x: Tensor, y: Tensor) -> "_WhiteBox":
        """Every white-box attack the checklist runs at the real eps, per sample."""
        return _WhiteBox(steps=self.steps, pgd=self.correct_after(self.pgd(self.threat), x, y),
                         fgsm=self.correct_after(self.fgsm(), x, y),
                         pgd_doubled=self.correct_after(self.pgd(self.threat, steps=2 * self.steps, restarts=2), x, y),
                         apgd=self.correct_after(self.apgd(), x, y))

    def determinism(self, x: Tensor) -> Check:
        change, flips = measure_determinism(self.model, x, self.batch_size)
        status = _grade(change, NON_DETERMINISM)
        return Check("deterministic", status, {"max_relative_logit_change": change, "prediction_flips": flips},
                     "the model gives the same logits twice" if status == PASS else
                     "the model is random at test time: one gradient sample misleads the attack and one forward "
                     f"pass misjudges it; report its accuracy over several draws; next: {NEXT_ATTACK[RANDOM]}")

    def gradients(self, x: Tensor, y: Tensor) -> Check:
        """Input gradients of CE, and of the logit margin: zero CE but live margin gradients mean a saturated
        softmax (a loss problem); both zero mean shattered gradients (a layer problem)."""
        health = gradient_health(self.model, x, y, self.batch_size)
        flat, finite = health.ce, health.ce_finite
        bad = 1.0 - _mean(health.ce_live)
        margin_bad = 1.0 - _mean(health.margin_live)
        status = FAIL if not bool(finite.all()) else _grade(bad, ZERO_GRADIENTS)
        kind = SATURATED if _grade(margin_bad, ZERO_GRADIENTS) == PASS and bool(finite.all()) else SHATTERED
        return Check("gradients_nonzero", status,
                     {"fraction_zero_or_nonfinite": bad, "fraction_nonfinite": 1.0 - _mean(finite),
                      "fraction_zero_margin_gradient": margin_bad, "kind": None if status == PASS else kind,
                      "median_grad_l1": float(flat.abs().sum(1)[finite].median()) if bool(finite.any()) else None},
                     "input gradients are finite and non-zero" if status == PASS else
                     ("CE input gradients vanish but logit-margin gradients do not: a saturated softmax, "
                      if kind == SATURATED else "input gradients vanish or are not finite for every loss: shattered "
                      "gradients (rounding, quantisation or another non-differentiable layer), ")
                     + f"not robustness; next: {NEXT_ATTACK[kind]}")

    def loss_rises(self, x: Tensor, y: Tensor, cause: str) -> Check:
        """Steepest ascent on CE from the clean input, no early stop: does the loss go up?"""
        rises, curves = [], []
        for xb, yb in zip(x.split(self.batch_size), y.split(self.batch_size), strict=True):
            path = self.ascent_losses(xb, yb)
            rises.append(loss_rose(path[0], path.max(0).values))
            curves.append(path)
        rose = torch.cat(rises)
        mean_path = torch.cat(curves, dim=1).mean(1)
        flat = 1.0 - _mean(rose)
        status = _grade(flat, LOSS_FLAT)
        marks = sorted({0, len(mean_path) // 4, len(mean_path) // 2, len(mean_path) - 1})
        return Check("loss_rises_along_path", status,
                     {"fraction_flat": flat, "mean_loss_at_step": {str(i): float(mean_path[i]) for i in marks}},
                     "the attack loss rises along the PGD path" if status == PASS else
                     "the loss does not rise along the gradient path: the gradients do not point uphill (masking); "
                     f"next: {NEXT_ATTACK[_masked(cause)]}")

    def ascent_losses(self, x: Tensor, y: Tensor) -> Tensor:
        """The CE at each point of ``steps`` steps of 2.5·eps/steps along the ascent loop from ``x``, the last
        iterate's included: (steps + 1, batch)."""
        losses: list[Tensor] = []

        def record(x_adv: Tensor, logits: Tensor, loss: Tensor, labels: Tensor, index: Tensor | None) -> None:
            losses.append(loss)  # every row climbs all the way (no early stop)

        path = projected_ascent(objective_gradient(self.model, cross_entropy), self.threat, x, y, x.clone(),
                                steps=self.steps, step_size=2.5 * self.threat.eps / self.steps, on_step=record)
        with torch.no_grad():
            losses.append(cross_entropy(self.model(path.x_adv), y, False))
        return torch.stack(losses)

    def iterative_vs_single_step(self, white: "_WhiteBox", cause: str) -> Check:
        pgd_acc, fgsm_acc = white.pgd_accuracy, _mean(white.fgsm)
        status = _grade(pgd_acc - fgsm_acc, PGD_WORSE_THAN_FGSM)
        return Check("iterative_beats_single_step", status,
                     {"pgd_accuracy": pgd_acc, "fgsm_accuracy": fgsm_acc, "pgd_steps": self.steps},
                     "PGD is at least as strong as FGSM" if status == PASS else
                     "a single FGSM step beats iterative PGD: the loss surface is locally misleading (small steps "
                     f"get stuck); next: {NEXT_ATTACK[cause]}")

    def monotone_in_eps(self, x: Tensor, y: Tensor, pgd_acc: float, cause: str) -> Check:
        eps_values = [m * self.threat.eps for m in EPS_MULTIPLIERS]
        # up to 4x eps on purpose: no units check (the user's eps was checked)
        accuracies = [pgd_acc if m == 1.0 else
                      _mean(self.correct_after(self.pgd(self.threat.with_eps(e, check_eps=False)), x, y))
                      for m, e in zip(EPS_MULTIPLIERS, eps_values, strict=True)]
        rise = max([0.0] + [b - a for a, b in zip(accuracies[:-1], accuracies[1:], strict=True)])
        status = _grade(rise, NOT_MONOTONE)
        return Check("accuracy_decreases_with_eps", status,
                     {"eps": eps_values, "pgd_accuracy": accuracies, "largest_rise": rise},
                     "accuracy falls as eps grows" if status == PASS else
                     "a larger eps gives a higher accuracy: the attack is failing, not the model succeeding; "
                     f"next: {NEXT_ATTACK[cause]}")

    def unbounded(self, x: Tensor, y: Tensor, cause: str) -> Check:
        eps = self.box_eps(x)
        whole_box = self.threat.with_eps(eps, check_eps=False)  # the ball holds the box on purpose
        accuracy = _mean(self.correct_after(self.pgd(whole_box, steps=max(self.steps, 50)), x, y))
        status = _grade(accuracy, UNBOUNDED_ACCURACY)
        return Check("unbounded_attack_succeeds", status, {"eps": eps, "pgd_accuracy": accuracy},
                     "with the whole box allowed, PGD breaks every sample" if status == PASS else
                     "PGD fails even when any input is allowed: the attack does not work on this model and its "
                     f"robust accuracy at the real eps means nothing; next: {NEXT_ATTACK[_masked(cause)]}")

    def convergence(self, white: "_WhiteBox", cause: str) -> Check:
        pgd_acc, doubled = white.pgd_accuracy, _mean(white.pgd_doubled)
        drop = pgd_acc - doubled
        status = _grade(drop, NOT_CONVERGED)
        return Check("attack_converged", status,
                     {"pgd_accuracy": pgd_acc, "pgd_doubled_accuracy": doubled, "apgd_accuracy": _mean(white.apgd),
                      "steps": self.steps, "doubled": {"steps": 2 * self.steps, "restarts": 2}, "drop": drop},
                     "doubling steps and restarts changes little" if status == PASS else
                     "more steps/restarts still lower the accuracy: the attack has not converged; next: "
                     + NEXT_ATTACK[cause if cause in (RANDOM, SHATTERED) else UNCONVERGED])

    def black_box(self, x: Tensor, y: Tensor, white: "_WhiteBox", queries: int, cause: str) -> Check:
        try:
            from ...attacks.square import Square
        except ImportError:
            return Check("black_box_not_stronger", WARN, {"square": "not available"},
                         "the Square attack is not available in this installation: this check did not run")
        if self.threat.norm not in ("linf", "l2"):
            return Check("black_box_not_stronger", PASS, {"skipped": f"Square has no {self.threat.norm} version"},
                         "not applicable to this norm (Square supports linf and l2)")
        square_correct = self.correct_after(lambda: Square(self.model, self.threat, queries=queries, seed=self.seed), x, y)
        square_acc = _mean(square_correct)
        # Both attacks are heuristics: each misses a few samples the other breaks, so compare success rates.
        status, verdict = _versus_white_box(white.strongest_accuracy - square_acc, white.pgd_accuracy - square_acc)
        evidence = {"square_accuracy": square_acc, "strongest_white_box": white.strongest_name,
                    "strongest_white_box_accuracy": white.strongest_accuracy,
                    "pgd_accuracy": white.pgd_accuracy, "apgd_accuracy": _mean(white.apgd),
                    "fraction_broken_only_by_square": _mean(white.strongest & ~square_correct), "queries": queries,
                    "verdict": verdict}
        found = f"Square-{queries} {square_acc:.0%}"
        return Check("black_box_not_stronger", status, evidence, {
            "none": "Square finds nothing the white-box attacks miss",
            "weak white-box": f"a weak white-box attack, not masking: {found} beats PGD-{self.steps} "
                              f"({white.pgd_accuracy:.0%}) but not {white.strongest_name} ({white.strongest_accuracy:.0%}): "
                              f"the gradients work, PGD-{self.steps} has not converged; next: {NEXT_ATTACK[_weak(cause)]}",
            "masked": f"masked gradients: {found} beats every white-box attack, APGD-CE included (strongest: "
                      f"{white.strongest_name} {white.strongest_accuracy:.0%}); report the worst case over both (the 'standard' suite does); "
                      f"next: {NEXT_ATTACK[_masked(cause)]}",
        }[verdict])

    @torch.no_grad()
    def random_noise(self, x: Tensor, y: Tensor, white: "_WhiteBox", draws: int, cause: str) -> Check:
        generator = torch.Generator(device=x.device).manual_seed(int(self.seed) + 1)
        noise_correct = torch.ones_like(y, dtype=torch.bool)
        for _ in range(draws):
            noisy = self.threat.random_start(x, generator)
            noise_correct &= self.predict(noisy) == y
        only_noise = _mean(white.strongest & ~noise_correct)
        only_noise_not_pgd = _mean(white.pgd & ~noise_correct)
        status, verdict = _versus_white_box(only_noise, only_noise_not_pgd, NOISE_ONLY)
        return Check("random_noise_not_stronger", status,
                     {"noise_accuracy": _mean(noise_correct), "strongest_white_box": white.strongest_name,
                      "strongest_white_box_accuracy": white.strongest_accuracy,
                      "pgd_accuracy": white.pgd_accuracy, "fraction_broken_only_by_noise": only_noise,
                      "fraction_broken_by_noise_not_pgd": only_noise_not_pgd, "draws": draws, "verdict": verdict}, {
            "none": "random noise finds nothing white-box attacks miss",
            "weak white-box": f"a weak white-box attack, not masking: random points break samples PGD-{self.steps} "
                              f"misses but {white.strongest_name} does not; next: {NEXT_ATTACK[_weak(cause)]}",
            "masked": "masked gradients: random points in the ball break samples that not even the strongest "
                      f"white-box attack ({white.strongest_name}) breaks; next: {NEXT_ATTACK[_masked(cause)]}",
        }[verdict])


@dataclass
class _WhiteBox:
    """Per sample, still correct after each white-box attack of the checklist (at the real eps)."""

    steps: int
    pgd: Tensor
    fgsm: Tensor
    pgd_doubled: Tensor
    apgd: Tensor

    @property
    def pgd_accuracy(self) -> float:
        return _mean(self.pgd)

    def by_name(self) -> dict[str, Tensor]:
        """Each attack's per-sample outcome, the most thorough first (it wins ties)."""
        return {f"APGD-CE-{2 * self.steps}": self.apgd, f"PGD-{2 * self.steps}x2": self.pgd_doubled,
                f"PGD-{self.steps}": self.pgd, "FGSM": self.fgsm}

    @property
    def strongest_name(self) -> str:
        outcomes = self.by_name()
        return min(outcomes, key=lambda name: _mean(outcomes[name]))

    @property
    def strongest(self) -> Tensor:
        """Per sample: still correct after the strongest white-box attack (the lowest accuracy)."""
        return self.by_name()[self.strongest_name]

    @property
    def strongest_accuracy(self) -> float:
        return _mean(self.strongest)


def _versus_white_box(gap_to_strongest: float, gap_to_pgd: float,
                      thresholds: tuple[float, float] = SQUARE_STRONGER) -> tuple[str, str]:
    """(status, verdict) of a black-box or noise attack against the white-box ones.

    Beating every white-box attack is masking (WARN / FAIL by the gap); beating only PGD with the base budget is
    a weak white-box attack (WARN, never FAIL: the gradients work); beating neither passes.
    """
    status = _grade(gap_to_strongest, thresholds)
    if status != PASS:
        return status, "masked"
    if _grade(gap_to_pgd, thresholds) != PASS:
        return WARN, "weak white-box"
    return PASS, "none"


def _cause(deterministic: Check, gradients: Check, loss_rises: Check | None) -> str:
    """What the checks point to, in the order that decides the next attack: randomness, then the gradients."""
    if deterministic.status != PASS:
        return RANDOM
    if gradients.status != PASS:
        return SATURATED if gradients.evidence.get("kind") == SATURATED else SHATTERED
    if loss_rises is not None and loss_rises.status != PASS:
        return MISLEADING
    return UNCONVERGED


def _weak(cause: str) -> str:
    """The next attack when only the base PGD lost: more budget, unless the model is random (then EOT)."""
    return RANDOM if cause == RANDOM else UNCONVERGED


def _masked(cause: str) -> str:
    """The next attack once a white-box attack with a converged budget failed too: not more steps."""
    return MISLEADING if cause == UNCONVERGED else cause


def _mean(mask: Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else float("nan")
