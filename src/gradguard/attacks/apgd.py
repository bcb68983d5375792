"""APGD and APGD-T — Auto-PGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks").

PGD with a budget-aware step size: the step starts at 2·eps and is halved at fixed checkpoints whenever the loss
stopped climbing, each time restarting from the best point found; a momentum term (alpha = 0.75) smooths the walk.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor, nn

from ..checks import positive_float, positive_int
from ..errors import ConfigError
from ..threat import ThreatModel
from .base import Attack, BestIterate, Iterate, any_per_owner, expand_mask, input_gradient

MOMENTUM = 0.75
RANKINGS = ("logit", "linearised")
DUAL_NORMS = {"linf": 1.0, "l2": 2.0, "l1": float("inf")}  # the dual of each threat norm: L1, L2, L∞


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations w_j = ceil(p_j · steps) at which APGD may halve its step (duplicates dropped).

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), kept while p_j <= 1.
    Exact fractions, so that 0.22 + 0.19 is 0.41 and not 0.41000000000000003 (whose ceil would be off by one).
    For steps = 100 this is [0, 22, 41, 57, 70, 80, 87, 93, 99].
    """
    steps = positive_int(steps, "steps")
    fractions = [Fraction(0), Fraction(22, 100)]
    while True:
        following = fractions[-1] + max(fractions[-1] - fractions[-2] - Fraction(3, 100), Fraction(6, 100))
        if following > 1:
            break
        fractions.append(following)
    points: list[int] = []
    for p in fractions:
        w = math.ceil(p * steps)
        if w <= steps and (not points or w > points[-1]):
            points.append(w)
    return points


def targeted_dlr(logits: Tensor, pairs: Tensor, targeted: bool = False) -> Tensor:
    """The paper's targeted DLR loss (to maximise): −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2).

    ``pairs`` is (batch, 2): true class y, target class t. With fewer than 4 classes the denominator does not
    exist and the numerator alone, z_t − z_y, is used.
    """
    true_logit = logits.gather(1, pairs[:, :1]).squeeze(1)
    target_logit = logits.gather(1, pairs[:, 1:]).squeeze(1)
    if logits.shape[1] < 4:
        return target_logit - true_logit
    top = logits.sort(dim=1, descending=True).values
    scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12
    return (target_logit - true_logit) / scale


def logit_gap(logits: Tensor, pairs: Tensor, targeted: bool = False) -> Tensor:
    """z_t − z_y for (true class y, target t) pairs: the function whose zero set is the y/t decision boundary."""
    return (logits.gather(1, pairs[:, 1:]) - logits.gather(1, pairs[:, :1])).squeeze(1)


def linearised_distances(model, x: Tensor, labels: Tensor, targets: Tensor, norm: str,
                         amp: torch.dtype | None = None) -> Tensor:
    """(batch, k): for each candidate class t (``targets[:, j]``), the distance to the y/t decision boundary of the
    model linearised at ``x``: (z_y − z_t) / ‖∇_x(z_t − z_y)‖_* in the threat norm's dual norm (L1 for L∞, L2 for
    L2, L∞ for L1), as MALT ranks its targets (Melamed et al., NeurIPS 2024). Exact for a linear model; one
    gradient per candidate; a zero gradient gives +inf (ranked last)."""
    n, k = targets.shape
    pairs = torch.stack([labels.repeat(k), targets.t().reshape(-1)], dim=1)
    grad, logits, gap = input_gradient(model, x.repeat((k,) + (1,) * (x.dim() - 1)), pairs, logit_gap, False, amp)
    dual = grad.reshape(n * k, -1).norm(p=DUAL_NORMS[norm], dim=1)
    distance = torch.where(dual > 0, -gap / dual.clamp_min(1e-30), torch.full_like(gap, float("inf")))
    return distance.reshape(k, n).t()


class APGD(Attack):
    """Auto-PGD: PGD with momentum and a step size that adapts to the budget (Croce & Hein, ICML 2020).

    Defaults (the paper's): 100 steps, initial step 2·eps, momentum alpha = 0.75, rho = 0.75, checkpoints from
    ``apgd_checkpoints``; loss "ce" (APGD-CE) or "dlr" (APGD-DLR; "margin" and callables work too); a uniform
    random start in the ball. At a checkpoint the step is halved, and the walk restarts from the best point, when
    (1) fewer than rho of the steps since the last checkpoint increased the loss, or (2) the step was not halved at
    the last checkpoint and the best loss has not improved since.

    Norms: L∞ and L2 as in the paper; L1 uses the threat model's sparse steepest-ascent step and exact L1
    projection (a plain composition, not the separate APGD-L1 of Croce & Hein 2021).
    Samples that succeed stop being worked on (``early_stop=True``); per sample the best point is returned.
    """

    name = "apgd"
    supported_norms = ("linf", "l2", "l1")

    def __init__(self, model: nn.Module, threat: ThreatModel, *, loss="ce", steps: int = 100, rho: float = 0.75,
                 initial_step: float = 2.0, **kwargs) -> None:
        super().__init__(model, threat, loss=loss, **kwargs)
        self.steps = positive_int(steps, "steps")
        self.rho = positive_float(rho, "rho")
        if self.rho > 1:
            raise ConfigError(f"rho: a fraction of steps in (0, 1], got {rho!r}; the paper uses 0.75")
        self.initial_step = positive_float(initial_step, "initial_step")  # in units of eps
        self.checkpoints = apgd_checkpoints(self.steps)

    def _perturb(self, x: Tensor, labels: Tensor) -> Iterate:
        return self._apgd(x, labels, labels)

    def _apgd(self, x: Tensor, labels: Tensor, success_labels: Tensor, start: Tensor | None = None,
              owner: Tensor | None = None) -> Iterate:
        """One APGD run. ``labels`` go to the objective, ``success_labels`` decide success (they differ for APGD-T).

        ``start``: the starting points (default: a random start drawn here). ``owner``: rows that are copies of one
        sample (APGD-T's targets run side by side) share an owner id; early stop then drops every copy of a sample
        as soon as one copy succeeds. Each row's walk depends only on its own row either way.
        """
        x_adv = self._random_start(x) if start is None else start
        n_owners = x.shape[0]  # owner ids are below the starting row count
        grad, logits, objective = self._gradient(x_adv, labels)
        self.start_objective = objective  # the loss at the start, per row: did the run make it rise?
        best = BestIterate(x_adv)
        success = self._succeeded(logits, success_labels)
        best.update(x_adv, logits, objective, success, None)
        n = x.shape[0]
        state = {
            "x": x, "labels": labels, "success_labels": success_labels, "x_adv": x_adv, "x_prev": x_adv, "grad": grad,
            "step": torch.full((n,), self.initial_step * self.threat.eps, device=x.device, dtype=x.dtype),
            "loss_prev": objective, "loss_best": objective, "x_best": x_adv, "grad_best": grad,
            "increases": torch.zeros(n, device=x.device, dtype=x.dtype),
            "loss_best_at_check": objective, "halved_at_check": torch.ones(n, dtype=torch.bool, device=x.device),
        }
        index: Tensor | None = None  # original positions of the samples still worked on; None = all
        checkpoints = set(self.checkpoints[1:])
        last_checkpoint = 0
        for iteration in range(1, self.steps + 1):
            if self.early_stop and bool(success.any()):
                keep = ~success if owner is None else ~any_per_owner(success, owner, n_owners)
                if not bool(keep.any()):
                    break
                index = keep.nonzero().squeeze(1) if index is None else index[keep]
                state = {key: value[keep] for key, value in state.items()}
                owner = None if owner is None else owner[keep]
            s = state
            x_new = self._momentum_step(s, first=iteration == 1)
            s["x_prev"], s["x_adv"] = s["x_adv"], x_new
            s["grad"], logits, objective = self._gradient(x_new, s["labels"])
            success = self._succeeded(logits, s["success_labels"])
            best.update(x_new, logits, objective, success, index)
            s["increases"] = s["increases"] + (objective > s["loss_prev"]).to(x.dtype)
            s["loss_prev"] = objective
            self._track_best(s, x_new, objective)
            if iteration in checkpoints:
                self._checkpoint(s, iteration - last_checkpoint)
                last_checkpoint = iteration
        return Iterate(best.x_adv, best.logits, best.objective)

    @staticmethod
    def _track_best(s: dict, x_new: Tensor, objective: Tensor) -> None:
        """The restart point: per sample the highest-loss iterate and its gradient (no copy when all or none improve)."""
        improved = objective > s["loss_best"]
        if bool(improved.all()):
            s["x_best"], s["grad_best"] = x_new, s["grad"]
        elif bool(improved.any()):
            mask = expand_mask(improved, x_new)
            s["x_best"] = torch.where(mask, x_new, s["x_best"])
            s["grad_best"] = torch.where(mask, s["grad"], s["grad_best"])
        s["loss_best"] = torch.where(improved, objective, s["loss_best"])

    def _momentum_step(self, s: dict, first: bool) -> Tensor:
        """z = Π(x_k + η·step(∇)); x_{k+1} = Π(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1})); plain step at k = 0."""
        x_adv = s["x_adv"]
        z = self.threat.project(x_adv + self.threat.ascent_step(s["grad"], s["step"], x_adv), s["x"])
        if first:
            return z
        # x + α(z − x) + (1 − α)(x − x_prev) = α·z + (2 − 2α)·x − (1 − α)·x_prev, in place on the fresh z
        moved = z.mul_(MOMENTUM).add_(x_adv, alpha=2 - 2 * MOMENTUM).add_(s["x_prev"], alpha=-(1 - MOMENTUM))
        return self.threat.project(moved, s["x"])

    def _checkpoint(self, s: dict, interval: int) -> None:
        """Halve the step and go back to the best point where condition 1 or condition 2 of the paper holds."""
        too_few_increases = s["increases"] < self.rho * interval
        stalled = ~s["halved_at_check"] & (s["loss_best"] <= s["loss_best_at_check"])
        halve = too_few_increases | stalled
        s["step"] = torch.where(halve, s["step"] / 2, s["step"])
        back = expand_mask(halve, s["x_adv"])
        s["x_adv"] = torch.where(back, s["x_best"], s["x_adv"])
        s["x_prev"] = torch.where(back, s["x_best"], s["x_prev"])  # restart without momentum
        s["grad"] = torch.where(back, s["grad_best"], s["grad"])
        s["halved_at_check"] = halve
        s["loss_best_at_check"] = s["loss_best"]
        s["increases"] = torch.zeros_like(s["increases"])


class APGDT(APGD):
    """APGD-T: targeted APGD with the targeted DLR loss against each of the top ``n_target_classes`` non-true
    classes by clean logits, in turn (Croce & Hein, ICML 2020; AutoAttack's "apgd-t").

    Success is misclassification: an untargeted attack overall, which the per-target runs only steer.
    Defaults (the paper's): 9 target classes, 100 steps per target class, the APGD step-size schedule;
    ``restarts`` are per target class. Loss: −(z_y − z_t)/(z_π1 − (z_π3 + z_π4)/2) (z_t − z_y with < 4 classes).
    The returned ``loss`` is that targeted DLR for the best target found.

    ``ranking="linearised"`` orders the targets by the linearised distance to each boundary instead of by clean
    logit (``linearised_distances``, MALT's choice): the ``candidates`` most likely wrong classes are ranked, one
    gradient each, and the nearest are attacked first. ``first_target`` skips the first ranks (a later stage that
    attacks the targets an earlier one left: ranks ``first_target .. first_target + n_target_classes − 1``).
    """

    name = "apgd-t"

    def __init__(self, model: nn.Module, threat: ThreatModel, *, steps: int = 100, n_target_classes: int = 9,
                 restarts: int = 1, target_batch: int = 256, ranking: str = "logit", candidates: int = 9,
                 first_target: int = 0, **kwargs) -> None:
        if kwargs.get("targeted"):
            raise ConfigError("targeted: APGDT is untargeted overall (it picks its own targets); "
                              "use APGD(..., targeted=True, loss='dlr') to aim at given classes")
        if "loss" in kwargs:
            raise ConfigError("loss: APGDT always uses the targeted DLR loss; use APGD(loss=...) for another loss")
        super().__init__(model, threat, steps=steps, restarts=1, **kwargs)
        self.objective = targeted_dlr
        self.loss = "targeted-dlr"
        self.n_target_classes = positive_int(n_target_classes, "n_target_classes")
        self.target_restarts = positive_int(restarts, "restarts")
        if isinstance(target_batch, bool) or not isinstance(target_batch, int) or target_batch < 0:
            raise ConfigError(f"target_batch: rows per batch up to which target runs go side by side, an integer "
                              f">= 0 (0: one target after the other), got {target_batch!r}")
        self.target_batch = target_batch
        if ranking not in RANKINGS:
            raise ConfigError(f"ranking: expected one of {RANKINGS}, got {ranking!r}")
        self.ranking = ranking
        self.candidates = positive_int(candidates, "candidates")
        if isinstance(first_target, bool) or not isinstance(first_target, int) or first_target < 0:
            raise ConfigError(f"first_target: the first target rank to attack, an integer >= 0, got {first_target!r}")
        self.first_target = first_target

    def target_order(self, x: Tensor, labels: Tensor, clean_logits: Tensor) -> Tensor:
        """(batch, classes − 1): the wrong classes in the order they are attacked (see ``ranking``)."""
        others = clean_logits.scatter(1, labels[:, None], float("-inf")).argsort(dim=1, descending=True)[:, :-1]
        if self.ranking == "logit":
            return others
        k = min(self.candidates, others.shape[1])
        self._n_grad += x.shape[0] * k
        distance = linearised_distances(self.forward_model, x, labels, others[:, :k], self.threat.norm, self.amp_dtype)
        order = distance.argsort(dim=1, stable=True)  # ties (and zero gradients) keep the logit order
        return torch.cat([others[:, :k].gather(1, order), others[:, k:]], dim=1)

    def _perturb(self, x: Tensor, labels: Tensor) -> Iterate:
        """The runs (target rank × restart) in order, several side by side while the samples still robust are few.

        Every run starts from its own random point drawn for *every* sample of the batch, so the random draws — and,
        since each row's walk depends only on its own row, every run's outcome — are the same whether runs go one
        after the other or side by side. Side by side only pays where a pass is cheap next to the per-step
        bookkeeping (few rows); it spends more passes on samples broken early, so it stops at ``target_batch`` rows.
        """
        clean_logits = self._clean_logits(x)
        others = self.target_order(x, labels, clean_logits)
        n_targets = min(self.first_target + self.n_target_classes, clean_logits.shape[1] - 1)
        runs = [rank for rank in range(self.first_target, n_targets) for _ in range(self.target_restarts)]
        best = BestIterate(x)
        done = 0
        while done < len(runs):
            index = None
            if self.early_stop and best.logits is not None:
                index = (~best.success).nonzero().squeeze(1)
                if index.numel() == 0:
                    break
            alive = x.shape[0] if index is None else index.numel()
            group = runs[done:done + max(1, min(len(runs) - done, self.target_batch // max(alive, 1)))]
            done += len(group)
            starts = [self._random_start(x) for _ in group]  # every sample: draws independent of who is alive
            pick = slice(None) if index is None else index
            rows = torch.arange(x.shape[0], device=x.device)[pick]
            found = self._apgd(
                x[pick].repeat((len(group),) + (1,) * (x.dim() - 1)),
                torch.cat([torch.stack([labels[pick], others[pick, rank]], dim=1) for rank in group]),
                labels[pick].repeat(len(group)),
                start=torch.cat([start[pick] for start in starts]),
                owner=rows.repeat(len(group)) if len(group) > 1 else None)
            # _apgd evaluates every point it returns, so its logits and objective are known.
            assert found.logits is not None and found.objective is not None
            n = rows.numel()
            for k in range(len(group)):
                part = slice(k * n, (k + 1) * n)
                logits = found.logits[part]
                best.update(found.x_adv[part], logits, found.objective[part],
                            self._succeeded(logits, labels[pick]), index)
        return Iterate(best.x_adv, best.logits, best.objective)

    @torch.no_grad()
    def _clean_logits(self, x: Tensor) -> Tensor:
        self._n_forward += x.shape[0]
        return self._forward(x)

    def __repr__(self) -> str:
        ranking = "" if self.ranking == "logit" else f", ranking={self.ranking!r}, candidates={self.candidates}"
        first = f", first_target={self.first_target}" if self.first_target else ""
        return (f"APGDT(threat={self.threat!r}, steps={self.steps}, n_target_classes={self.n_target_classes}, "
                f"restarts={self.target_restarts}, target_batch={self.target_batch}{ranking}{first})")
