"""FAB and FAB-T — the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020, "Minimally distorted adversarial
examples with a fast adaptive boundary attack").

A minimal-distortion attack: at each step the decision boundary between the true class and one other class is
linearised at the current point, both the current point and the original input are projected onto that
hyperplane (in the threat's norm, inside the box), and the next point is a convex combination of the two
projections, biased toward the original input so the perturbation stays small. Every adversarial point found is
pulled back toward the input (the backward step), so the search keeps shrinking the smallest perturbation so far.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import positive_float, positive_int
from ..errors import ConfigError, InputError
from ..threat import ThreatModel
from .base import Attack, Iterate, any_per_owner, expand_mask, input_gradient
from .deepfool import logit_difference

MIN_STEP_NORM = 1e-8  # the reference's floor on the projection lengths, so alpha stays defined
_TINY = 1e-12
DUAL_NORMS = {"linf": "l1", "l2": "l2", "l1": "linf"}  # the distance to a hyperplane w·z = b is |w·x − b| / ‖w‖_dual


def lp_norm(flat: Tensor, norm: str) -> Tensor:
    """Per-row Lp norm of a (..., d) tensor for ``norm`` in "linf", "l2", "l1"."""
    if norm == "linf":
        return flat.abs().amax(dim=-1)
    if norm == "l2":
        return flat.norm(dim=-1)
    return flat.abs().sum(dim=-1)


def project_onto_hyperplane(t: Tensor, w: Tensor, b: Tensor, norm: str, bounds: tuple[float, float]) -> Tensor:
    """The smallest step δ (in ``norm``) with w·(t + δ) = b and t + δ inside ``bounds``, per row.

    ``t`` and ``w`` are (n, d), ``b`` is (n,), ``t`` lies in the box. Where the box cannot reach the hyperplane, δ
    moves every coordinate as far toward it as the box allows (the box point closest to the hyperplane).
    Closed form per norm: each useful coordinate i moves by s_i >= 0 in the direction of sign(w_i), with room m_i
    to the box and Σ |w_i| s_i = r (the gap to close). L∞: s_i = min(λ, m_i); L2: s_i = min(λ|w_i|, m_i) (both a
    "water filling" with λ found from the sorted breakpoints); L1: fill the coordinates in decreasing |w_i| order.
    """
    lo, hi = bounds
    gap = b - (w * t).sum(dim=1)
    w = w * torch.where(gap >= 0, 1.0, -1.0).to(w.dtype)[:, None]  # orient w so the gap is non-negative
    gap = gap.abs()
    weight = w.abs()
    room = torch.where(w > 0, hi - t, torch.where(w < 0, t - lo, torch.zeros_like(t))).clamp_min(0)
    if norm == "l1":
        moved = _fill_largest_first(weight, room, gap)
    else:
        speed = weight if norm == "l2" else torch.ones_like(weight)
        moved = _water_fill(weight, speed, room, gap)
    return w.sign() * moved


def _water_fill(weight: Tensor, speed: Tensor, room: Tensor, gap: Tensor) -> Tensor:
    """s_i = min(λ·speed_i, room_i) with Σ weight_i·s_i = gap (or s = room where even that falls short)."""
    breakpoint = torch.where(speed > 0, room / speed.clamp_min(_TINY), torch.full_like(room, float("inf")))
    order = breakpoint.argsort(dim=1)
    point, w, v, m = (t.gather(1, order) for t in (breakpoint, weight, speed, room))
    filled = (w * m).cumsum(dim=1) - w * m                    # Σ_{j<k} w_j m_j: saturated before breakpoint k
    slope = (w * v).flip(1).cumsum(dim=1).flip(1)             # Σ_{j>=k} w_j v_j: still growing at breakpoint k
    reached = torch.where(torch.isinf(point), torch.full_like(point, float("inf")), filled + point * slope)
    k = (reached < gap[:, None]).sum(dim=1, keepdim=True).clamp(max=point.shape[1] - 1)
    level = (gap[:, None] - filled.gather(1, k)) / slope.gather(1, k).clamp_min(_TINY)
    moved = torch.minimum(level.clamp_min(0) * speed, room)
    capacity = (weight * room).sum(dim=1, keepdim=True)
    return torch.where(gap[:, None] >= capacity, room * (weight > 0), moved)


def _fill_largest_first(weight: Tensor, room: Tensor, gap: Tensor) -> Tensor:
    """L1: saturate the coordinates of largest weight first, the last one only as far as the gap needs."""
    order = weight.argsort(dim=1, descending=True)
    w, m = weight.gather(1, order), room.gather(1, order)
    reach = (w * m).cumsum(dim=1)
    k = (reach < gap[:, None]).sum(dim=1, keepdim=True)       # the coordinate that closes the gap
    positions = torch.arange(w.shape[1], device=w.device)[None, :]
    before = reach.gather(1, (k - 1).clamp(min=0)) * (k > 0)
    partial = (gap[:, None] - before) / w.gather(1, k.clamp(max=w.shape[1] - 1)).clamp_min(_TINY)
    moved_sorted = torch.where(positions < k, m, torch.where(positions == k, partial.clamp_min(0), torch.zeros_like(m)))
    moved_sorted = torch.minimum(moved_sorted, m)
    return torch.zeros_like(weight).scatter(1, order, moved_sorted)


class FAB(Attack):
    """FAB, the Fast Adaptive Boundary attack, and FAB-T, its targeted version (Croce & Hein, ICML 2020).

    Each step linearises f = z_k − z_y at the current point x_i (k: the class whose linearised boundary is closest,
    or the target class for FAB-T), projects x_i and the input x_0 onto {z: f(x_i) + ∇f·(z − x_i) = 0} ∩ box
    (giving steps δ_i, δ_0), and moves to
        x_{i+1} = clip((1 − α)(x_i + η δ_i) + α(x_0 + η δ_0)),  α = min(‖δ_i‖ / (‖δ_i‖ + ‖δ_0‖), α_max).
    Whenever x_{i+1} is adversarial, the smallest such perturbation is kept and x_{i+1} is pulled back to
    x_0 + β(x_{i+1} − x_0). Norms: L∞, L2 and L1 (closed-form projections: ``project_onto_hyperplane``).

    Defaults (AutoAttack's "standard" FAB-T): 100 steps, α_max = 0.1, η = 1.05, β = 0.9, 1 restart (later restarts
    start from a random point in the eps/2-ball); ``targeted=True`` (FAB-T) runs against each of the top
    ``n_target_classes`` = 9 non-true classes by clean logits in turn, one gradient per step each, where untargeted
    FAB needs one gradient per class and step. ``first_target`` skips the likeliest ranks (a later stage that runs
    the targets an earlier one left: ranks ``first_target .. first_target + n_target_classes − 1``, as APGD-T's).

    Success is misclassification within eps for both versions (FAB-T only steers toward its targets, like
    AutoAttack's): the minimal-distortion search runs unconstrained inside, and a perturbation larger than eps
    counts as a failure — its point is projected into the ball and re-checked there. ``early_stop`` (default)
    stops a sample once it has a point within eps; ``early_stop=False`` keeps shrinking the perturbation for
    every step, target and restart (the paper's minimal-distortion mode).
    """

    name = "fab"
    supported_norms = ("linf", "l2", "l1")

    def __init__(self, model: nn.Module, threat: ThreatModel, *, targeted: bool = False, n_target_classes: int = 9,
                 steps: int = 100, restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 target_batch: int = 256, first_target: int = 0, **kwargs) -> None:
        if "loss" in kwargs:
            raise ConfigError("loss: FAB follows logit differences and takes no loss; drop the loss argument")
        if "target_policy" in kwargs:
            raise ConfigError("target_policy: FAB-T picks the top n_target_classes by clean logits; "
                              "set n_target_classes instead")
        super().__init__(model, threat, loss="margin", restarts=1, **kwargs)
        self.per_target = bool(targeted)
        self.n_target_classes = positive_int(n_target_classes, "n_target_classes")
        self.steps = positive_int(steps, "steps")
        self.fab_restarts = positive_int(restarts, "restarts")
        self.alpha_max = positive_float(alpha_max, "alpha_max", allow_zero=True)
        if self.alpha_max > 1:
            raise ConfigError(f"alpha_max: the largest weight of the input's projection, in [0, 1], got {alpha_max!r}; "
                              "the paper uses 0.1")
        self.eta = positive_float(eta, "eta")
        if self.eta < 1:
            raise ConfigError(f"eta: the overshoot past the linearised boundary must be >= 1, got {eta!r}; "
                              "the paper uses 1.05")
        self.beta = positive_float(beta, "beta")
        if self.beta > 1:
            raise ConfigError(f"beta: the backward step toward the input, in (0, 1], got {beta!r}; the paper uses 0.9")
        if isinstance(target_batch, bool) or not isinstance(target_batch, int) or target_batch < 0:
            raise ConfigError(f"target_batch: rows per batch up to which FAB-T's target runs go side by side, an "
                              f"integer >= 0 (0: one target after the other), got {target_batch!r}")
        self.target_batch = target_batch
        if isinstance(first_target, bool) or not isinstance(first_target, int) or first_target < 0:
            raise ConfigError(f"first_target: the first target rank to attack, an integer >= 0, got {first_target!r}")
        self.first_target = first_target
        self._classes = 0  # the model's class count, set per batch from the clean logits
        self.min_distance: Tensor | None = None  # set by each run (``_perturb``)

    def _attack_labels(self, x: Tensor, y: Tensor, target: Tensor | None, num_classes: int) -> Tensor:
        if target is not None:
            raise InputError("target: FAB and FAB-T pick their own classes (FAB-T: the top n_target_classes by "
                             "clean logits); call run(x, y) without target=")
        return y

    # -- one batch: targets x restarts, keeping the smallest successful perturbation ------------------
    def _perturb(self, x: Tensor, labels: Tensor) -> Iterate:
        with torch.no_grad():
            self._n_forward += x.shape[0]
            clean_logits = self._forward(x)
        self._classes = int(clean_logits.shape[1])
        best_adv = x.clone()
        best_norm = torch.full((x.shape[0],), float("inf"), device=x.device, dtype=x.dtype)
        best_norm[clean_logits.argmax(dim=1) != labels] = 0.0  # already misclassified: x itself is minimal
        rounds = self._target_rounds(clean_logits, labels)
        done = 0
        while done < len(rounds):
            open_ = best_norm > self.threat.eps if self.early_stop else best_norm > 0
            index = open_.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            # FAB-T's first-restart runs go side by side while few samples are open (as APGD-T's targets do):
            # no random draw, and each row's walk is its own, so the outcome is that of one run after the other.
            width = 1 if self.fab_restarts > 1 or rounds[0] is None else self.target_batch // index.numel()
            group = rounds[done:done + max(1, min(len(rounds) - done, width))]
            done += len(group)
            for restart in range(self.fab_restarts):
                if restart > 0:
                    open_ = best_norm > self.threat.eps if self.early_stop else best_norm > 0
                    index = open_.nonzero().squeeze(1)
                    if index.numel() == 0:
                        break
                copies = len(group)
                found, norm = self._search(
                    x[index].repeat((copies,) + (1,) * (x.dim() - 1)), labels[index].repeat(copies),
                    None if group[0] is None else torch.cat([t[index] for t in group]),  # type: ignore[index]
                    random_start=restart > 0,
                    owner=torch.arange(index.numel(), device=x.device).repeat(copies) if copies > 1 else None)
                for k in range(copies):
                    part = slice(k * index.numel(), (k + 1) * index.numel())
                    better = norm[part] < best_norm[index]
                    best_adv[index[better]] = found[part][better]
                    best_norm[index[better]] = norm[part][better]
        self.min_distance = best_norm  # per row: the smallest adversarial perturbation found (inf: none), any size
        x_adv = torch.where(expand_mask(torch.isfinite(best_norm), x), self.threat.project(best_adv, x), x)
        logits, objective = self._evaluate(x_adv, labels)
        return Iterate(x_adv, logits, objective)

    def _target_rounds(self, clean_logits: Tensor, labels: Tensor) -> list[Tensor | None]:
        """[None] for FAB (closest class each step); the k-th most likely non-true classes for FAB-T."""
        if not self.per_target:
            return [None]
        others = clean_logits.scatter(1, labels[:, None], float("-inf")).argsort(dim=1, descending=True)
        n_targets = min(self.first_target + self.n_target_classes, clean_logits.shape[1] - 1)
        return [others[:, rank] for rank in range(self.first_target, n_targets)]

    # -- one FAB run ------------------------------------------------------------------------------
    def _search(self, x0: Tensor, labels: Tensor, targets: Tensor | None, random_start: bool,
                owner: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(smallest adversarial point found, its norm — inf where none) over ``steps`` FAB steps from x0.

        ``owner``: rows that are copies of one sample (targets side by side) share an id; with early stop every
        copy of a sample stops once one copy has a point within eps."""
        norm, bounds = self.threat.norm, self.threat.bounds
        x_i = self.threat.clip(x0 + 0.5 * (self._random_start(x0) - x0)) if random_start else x0.clone()
        best_adv = x0.clone()
        best_norm = torch.full((x0.shape[0],), float("inf"), device=x0.device, dtype=x0.dtype)
        active = torch.arange(x0.shape[0], device=x0.device)
        for _ in range(self.steps):
            xa, x0a = x_i[active], x0[active]
            f, grad = self._linearise(xa, labels[active], None if targets is None else targets[active])
            n = xa.shape[0]
            w = grad.reshape(n, -1)
            b = (w * xa.reshape(n, -1)).sum(dim=1) - f          # the hyperplane w·z = b where f would be 0
            steps = project_onto_hyperplane(torch.cat([xa.reshape(n, -1), x0a.reshape(n, -1)]),
                                            torch.cat([w, w]), torch.cat([b, b]), norm, bounds)
            lengths = lp_norm(steps, norm).clamp_min(MIN_STEP_NORM)
            from_current, from_input = steps[:n].reshape(xa.shape), steps[n:].reshape(xa.shape)
            alpha = (lengths[:n] / (lengths[:n] + lengths[n:])).clamp(0, self.alpha_max)
            alpha = expand_mask(alpha, xa)
            moved = self.threat.clip((1 - alpha) * (xa + self.eta * from_current)
                                     + alpha * (x0a + self.eta * from_input))
            adversarial = self._misclassified(moved, labels[active])
            distance = lp_norm((moved - x0a).reshape(n, -1), norm)
            improved = adversarial & (distance < best_norm[active])
            best_adv[active[improved]] = moved[improved]
            best_norm[active[improved]] = distance[improved]
            # the backward step: an adversarial point is pulled toward the input to look for a smaller one
            moved = torch.where(expand_mask(adversarial, moved), x0a + self.beta * (moved - x0a), moved)
            x_i[active] = moved
            if self.early_stop:
                open_rows = best_norm > self.threat.eps
                if owner is not None:
                    open_rows = ~any_per_owner(~open_rows, owner)
                active = active[open_rows[active]]
                if active.numel() == 0:
                    break
        return best_adv, best_norm

    def _linearise(self, x: Tensor, labels: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        """(f, ∇f) at ``x`` with f = z_k − z_y: k = the target, or the class whose linearised boundary is closest."""
        if targets is not None:
            pairs = torch.stack([labels, targets], dim=1)
            self._n_grad += x.shape[0]
            grad, _, f = input_gradient(self.forward_model, x, pairs, logit_difference, False, amp=self.amp_dtype)
            return f, grad
        n = x.shape[0]
        others = _other_classes(labels, self._classes)               # (n, K − 1)
        k = others.shape[1]
        pairs = torch.stack([labels.repeat_interleave(k), others.reshape(-1)], dim=1)
        self._n_grad += n * k
        grad, _, f = input_gradient(self.forward_model, x.repeat_interleave(k, dim=0), pairs, logit_difference,
                                    False, amp=self.amp_dtype)
        f, grad = f.reshape(n, k), grad.reshape((n, k) + x.shape[1:])
        dual = lp_norm(grad.reshape(n, k, -1), DUAL_NORMS[self.threat.norm])
        closest = (f.abs() / (dual + _TINY)).argmin(dim=1)
        rows = torch.arange(n, device=x.device)
        return f[rows, closest], grad[rows, closest]

    @torch.no_grad()
    def _misclassified(self, x: Tensor, labels: Tensor) -> Tensor:
        self._n_forward += x.shape[0]
        return self._forward(x).argmax(dim=1) != labels

    def __repr__(self) -> str:
        first = f", first_target={self.first_target}" if self.first_target else ""
        version = f"FAB-T, n_target_classes={self.n_target_classes}{first}" if self.per_target else "FAB"
        return (f"FAB(threat={self.threat!r}, {version}, steps={self.steps}, restarts={self.fab_restarts}, "
                f"alpha_max={self.alpha_max}, eta={self.eta}, beta={self.beta})")


def _other_classes(labels: Tensor, num_classes: int) -> Tensor:
    """(n, K − 1): for each row, every class but its label, in increasing order."""
    classes = torch.arange(num_classes, device=labels.device).expand(labels.shape[0], num_classes)
    keep = classes != labels[:, None]
    return classes[keep].reshape(labels.shape[0], num_classes - 1)
