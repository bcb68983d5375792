"""Pins of the projected-ascent loops: PGD (and BIM, MI-FGSM on its loop), TRADES' inner maximisation and the
masking checklist's loss-rises probe give, bit for bit, what the hand-written loops they replaced gave.

Each reference below is a verbatim copy of a loop as it stood before the three were served by one primitive. A
recording model keeps every input it is called with, so the pins cover the whole path (every iterate, in order,
and the random start), not only the returned point; the global RNG is compared after each run, so random starts
and restarts draw the same numbers in the same order. The last test holds the loop's own contract (rows dropped by
``on_step``, the path's ``index``, the stop once every row left).
"""
from __future__ import annotations

import math
from typing import Dict

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradguard import L1, L2, Linf
from gradguard.attacks import BIM, MIFGSM, PGD
from gradguard.attacks.result import BestIterate, Iterate

NORMS = {"linf": (Linf, 0.04), "l2": (L2, 0.4), "l1": (L1, 2.0)}


class Recorder(nn.Module):
    """A small CNN that records a copy of every input it is called with."""

    def __init__(self, seed: int = 0, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(seed)
        norm = nn.BatchNorm2d(4)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), norm, nn.Tanh(), nn.Flatten(), nn.Linear(144, classes)).eval()
        assert norm.running_mean is not None and norm.running_var is not None
        with torch.no_grad():  # BatchNorm statistics that are not the identity
            norm.running_mean.uniform_(-0.2, 0.2)
            norm.running_var.uniform_(0.5, 2.0)
        self.calls: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(x.detach().clone())
        return self.net(x) * 4.0  # sharp enough that some samples break part-way along the path


def data(n: int = 12, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=generator, dtype=torch.float64).float()


def same_calls(a: Recorder, b: Recorder) -> bool:
    return len(a.calls) == len(b.calls) and all(torch.equal(p, q) for p, q in zip(a.calls, b.calls, strict=True))


# ------------------------------------------------------------------------------------------------ PGD
class OldLoop:
    """``PGD._perturb`` as it was written before the shared ascent loop (verbatim)."""

    def _perturb(self, x: Tensor, labels: Tensor) -> Iterate:
        x_adv = self._start(x, labels)  # type: ignore[attr-defined]
        best = BestIterate(x_adv)
        index: Tensor | None = None
        state: Dict[str, Tensor] = {}
        for _ in range(self.steps):  # type: ignore[attr-defined]
            grad, logits, objective = self._gradient(x_adv, labels)  # type: ignore[attr-defined]
            success = self._succeeded(logits, labels)  # type: ignore[attr-defined]
            best.update(x_adv, logits, objective, success, index)
            if self.early_stop and bool(success.any()):  # type: ignore[attr-defined]
                keep = ~success
                if not bool(keep.any()):
                    return Iterate(best.x_adv, best.logits, best.objective)
                index = keep.nonzero().squeeze(1) if index is None else index[keep]
                x, x_adv, labels, grad = x[keep], x_adv[keep], labels[keep], grad[keep]
                state = {key: value[keep] for key, value in state.items()}
            direction = self._direction(grad, state)  # type: ignore[attr-defined]
            x_adv = self.threat.project(x_adv + self.threat.ascent_step(direction, self.step_size, x_adv), x)  # type: ignore[attr-defined]
        logits, objective = self._evaluate(x_adv, labels)  # type: ignore[attr-defined]
        best.update(x_adv, logits, objective, self._succeeded(logits, labels), index)  # type: ignore[attr-defined]
        return Iterate(best.x_adv, best.logits, best.objective)


CASES = {
    "random-start": (PGD, dict(steps=6, seed=0)),
    "random-start-restarts": (PGD, dict(steps=6, restarts=3, seed=1)),
    "random-start-global-rng": (PGD, dict(steps=5, restarts=2, seed=None)),
    "no-early-stop": (PGD, dict(steps=6, restarts=2, early_stop=False, seed=2)),
    "zero-start": (PGD, dict(steps=6, init="zero")),
    "fgsm-start-restarts": (PGD, dict(steps=4, init="fgsm", restarts=2, seed=3)),
    "targeted-random": (PGD, dict(steps=6, targeted=True, restarts=2, seed=4)),
    "margin-loss": (PGD, dict(steps=6, loss="margin", seed=5)),
    "bim": (BIM, dict(steps=6)),
    "mifgsm": (MIFGSM, dict(steps=6, restarts=2, seed=6)),
    "mifgsm-no-early-stop": (MIFGSM, dict(steps=6, early_stop=False)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_pgd_loop_is_bitwise_the_hand_written_one(norm, case):
    kind, eps = NORMS[norm]
    attack_class, kwargs = CASES[case]
    old_class = type(f"Old{attack_class.__name__}", (OldLoop, attack_class), {})
    threat = kind(eps)
    x = data()
    with torch.no_grad():
        y = Recorder()(x).argmax(1)  # every sample starts correct: early stop drops them one by one
    runs = []
    for cls in (attack_class, old_class):
        model = Recorder()
        torch.manual_seed(11)
        result = cls(model, threat, **kwargs).run(x, y)
        tensor = cls(model, threat, **kwargs)(x, y)  # the tensor-only path (no final scoring pass)
        runs.append((model, result, tensor, torch.rand(4)))
    (new_model, new, new_tensor, new_rng), (old_model, old, old_tensor, old_rng) = runs
    assert 0 < int(old.success.sum()) or case == "targeted-random"  # samples break: early stop, best iterate
    assert same_calls(new_model, old_model)
    for field in ("x_adv", "success", "logits", "loss", "labels"):
        assert torch.equal(getattr(new, field), getattr(old, field)), field
    assert (new.targets is None) == (old.targets is None)
    assert new.targets is None or torch.equal(new.targets, old.targets)
    assert (new.n_grad, new.n_forward) == (old.n_grad, old.n_forward)
    assert torch.equal(new_tensor, old_tensor) and torch.equal(new_rng, old_rng)


# ------------------------------------------------------------------------------------------------ TRADES
def old_maximise_kl(method, model: nn.Module, x: Tensor, threat) -> Tensor:
    """``TRADES.maximise_kl`` as it was written before the shared ascent loop (verbatim)."""
    from gradguard.attacks.base import input_gradient, model_guard
    from gradguard.rng import noise_like

    step_size = method.step_size if method.step_size is not None else threat.eps / 4
    with model_guard(model):
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)

        def kl_objective(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
            return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="none").sum(dim=1)

        x_adv = threat.project(x + 0.001 * noise_like(x), x)
        dummy_labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for _ in range(method.steps):
            grad, _, _ = input_gradient(model, x_adv, dummy_labels, kl_objective, False)
            x_adv = threat.project(x_adv + threat.ascent_step(grad, step_size, x_adv), x)
    return x_adv.detach()


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("step_size", [None, 0.3])
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_trades_inner_maximisation_is_bitwise_the_hand_written_one(norm, step_size, per_sample):
    from gradguard.rng import per_sample_generators
    from gradguard.train import TRADES

    kind, eps = NORMS[norm]
    threat = kind(eps)
    x = data()
    method = TRADES(threat, steps=5, step_size=None if step_size is None else step_size * eps)
    runs = []
    for maximise in (method.maximise_kl, lambda model, x, threat: old_maximise_kl(method, model, x, threat)):
        model = Recorder().train()
        torch.manual_seed(7)
        if per_sample:  # training's per-sample generators (one process or many give the same points)
            with per_sample_generators(3, 1, list(range(100, 100 + x.shape[0]))):
                x_adv = maximise(model, x, threat)
        else:
            x_adv = maximise(model, x, threat)
        assert model.training
        runs.append((model, x_adv, torch.rand(4)))
    (new_model, new, new_rng), (old_model, old, old_rng) = runs
    assert not torch.equal(new, x)
    assert same_calls(new_model, old_model) and torch.equal(new, old) and torch.equal(new_rng, old_rng)


# ------------------------------------------------------------------------------------------------ masking probe
def old_loss_rises_path(probe, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The ascent of ``_Probe.loss_rises`` as it was written before the shared ascent loop (verbatim): per
    sample, whether the loss rose, and the loss path (steps + 1, batch)."""
    from gradguard.attacks.base import input_gradient
    from gradguard.attacks.losses import cross_entropy
    from gradguard.evaluation.signals import loss_rose

    step = 2.5 * probe.threat.eps / probe.steps
    rises, curves = [], []
    for xb, yb in zip(x.split(probe.batch_size), y.split(probe.batch_size), strict=True):
        x_adv, losses = xb.clone(), []
        for _ in range(probe.steps):
            grad, _, loss = input_gradient(probe.model, x_adv, yb, cross_entropy, False)
            losses.append(loss)
            x_adv = probe.threat.project(x_adv + probe.threat.ascent_step(grad, step, x_adv), xb)
        with torch.no_grad():
            losses.append(cross_entropy(probe.model(x_adv), yb, False))
        path = torch.stack(losses)
        rises.append(loss_rose(path[0], path.max(0).values))
        curves.append(path)
    return torch.cat(rises), torch.cat(curves, dim=1)


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_masking_probe_ascent_is_bitwise_the_hand_written_one(norm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradguard.diagnostics.masking import checks
    from gradguard.evaluation.signals import UNCONVERGED

    kind, eps = NORMS[norm]
    threat = kind(eps)
    x = data(n=10)
    with torch.no_grad():
        y = Recorder()(x).argmax(1)
    seen: list[tuple[Tensor, Tensor]] = []
    loss_rose = checks.loss_rose

    def spy(first: Tensor, highest: Tensor) -> Tensor:
        seen.append((first, highest))
        return loss_rose(first, highest)

    monkeypatch.setattr(checks, "loss_rose", spy)
    new_model, old_model = Recorder(), Recorder()
    check = checks._Probe(new_model, threat, 0, 7, 4).loss_rises(x, y, UNCONVERGED)
    rose, path = old_loss_rises_path(checks._Probe(old_model, threat, 0, 7, 4), x, y)
    assert same_calls(new_model, old_model) and len(new_model.calls) == 3 * (7 + 1)
    assert torch.equal(torch.cat([first for first, _ in seen]), path[0])
    assert torch.equal(torch.cat([highest for _, highest in seen]), path.max(0).values)
    mean_path = path.mean(1)
    marks = sorted({0, len(mean_path) // 4, len(mean_path) // 2, len(mean_path) - 1})
    flat = 1.0 - float(rose.float().mean())
    assert check.evidence == {"fraction_flat": flat, "mean_loss_at_step": {str(i): float(mean_path[i]) for i in marks}}
    assert math.isfinite(flat)


# ------------------------------------------------------------------------------------------------ the primitive
def test_projected_ascent_drops_rows_on_request_and_says_which_are_left():
    """``on_step`` masks rows out; the path's ``index`` and ``labels`` are those of the rows still climbing, and
    dropping every row stops the loop before its last step."""
    from gradguard.core.ascent import objective_gradient, projected_ascent

    threat, x = Linf(0.05), data(n=6)
    labels = torch.arange(6) % 5
    gradient = objective_gradient(Recorder(), lambda logits, labels, targeted: logits.sum(1))
    seen: list[Tensor | None] = []

    def drop_first(x_adv: Tensor, logits: Tensor, objective: Tensor, labels: Tensor, index: Tensor | None) -> Tensor:
        seen.append(index)
        keep = torch.ones(x_adv.shape[0], dtype=torch.bool)
        keep[0] = False
        return keep

    path = projected_ascent(gradient, threat, x, labels, x.clone(), steps=3, step_size=0.01, on_step=drop_first)
    assert seen[0] is None and seen[1] is not None and seen[1].tolist() == [1, 2, 3, 4, 5]
    assert path.index is not None and path.index.tolist() == [3, 4, 5] and not path.stopped
    assert torch.equal(path.labels, labels[3:]) and bool(threat.contains(path.x_adv, x[3:]).all())

    model = Recorder()
    path = projected_ascent(objective_gradient(model, lambda logits, labels, targeted: logits.sum(1)), threat, x,
                            labels, x.clone(), steps=5, step_size=0.01,
                            on_step=lambda x_adv, *_: torch.zeros(x_adv.shape[0], dtype=torch.bool))
    assert path.stopped and path.x_adv.shape[0] == 0 and len(model.calls) == 1
