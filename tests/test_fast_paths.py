"""The fast paths give the plain path's per-sample outcomes: Square's lean query loop, torch.compile (with its
eager fallback), and the per-attack budget the evaluation reports."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradguard import L2, Linf, evaluate
from gradguard.attacks import APGD, PGD, Square
from gradguard.attacks.base import BestIterate, CompileFallbackWarning, Iterate
from gradguard.attacks.square import _as_image, square_p_schedule


def conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def images(n: int = 24, seed: int = 1, model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images labelled by ``model``'s own predictions (every sample starts correctly classified)."""
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, (model or conv_model()).eval()(x).argmax(1)


class PlainSquare(Square):
    """Square as the paper writes it: every query projected onto the ball, every query offered to the per-sample
    best tracker. Same random draws as the fast loop, so the two must agree sample by sample."""

    def _perturb(self, x, labels):
        shape, image = x.shape, _as_image(x)
        init = self._linf_init if self.threat.norm == "linf" else self._l2_init
        current = self.threat.project(init(image).reshape(shape), x)
        logits, loss = self._evaluate(current, labels)
        best, success = BestIterate(x), self._succeeded(logits, labels)
        best.update(current, logits, loss, success)
        index, current = torch.arange(x.shape[0]), _as_image(current)
        step = self._linf_step if self.threat.norm == "linf" else self._l2_step
        for iteration in range(1, self.queries):
            if self.early_stop and bool(success.any()):
                keep = ~success
                if not bool(keep.any()):
                    break
                index, image, current, loss, labels = (t[keep] for t in (index, image, current, loss, labels))
            candidate = step(image, current, square_p_schedule(self.p_init, iteration, self.queries))
            candidate = self.threat.project(candidate.reshape((-1,) + shape[1:]), image.reshape((-1,) + shape[1:]))
            logits, new_loss = self._evaluate(candidate, labels)
            success = self._succeeded(logits, labels)
            best.update(candidate, logits, new_loss, success, index)
            improved = new_loss > loss
            current = torch.where(improved[:, None, None, None], _as_image(candidate), current)
            loss = torch.where(improved, new_loss, loss)
        return Iterate(best.x_adv, best.logits, best.objective)


@pytest.mark.parametrize("threat", [Linf(0.1), L2(1.0)], ids=["linf", "l2"])
@pytest.mark.parametrize("early_stop", [True, False])
def test_square_fast_loop_matches_the_plain_loop(threat, early_stop):
    model, (x, y) = conv_model(), images()
    fast = Square(model, threat, queries=60, seed=3, early_stop=early_stop).run(x, y)
    plain = PlainSquare(model, threat, queries=60, seed=3, early_stop=early_stop).run(x, y)
    assert 0 < int(fast.success.sum()) < len(y)  # both outcomes occur, so the comparison means something
    assert torch.equal(fast.success, plain.success)
    assert torch.allclose(fast.x_adv, plain.x_adv)
    assert torch.allclose(fast.loss, plain.loss)
    assert fast.n_forward == plain.n_forward
    assert bool(threat.contains(fast.x_adv, x, tol=1e-6).all())


class _BrokenCompiled:
    def __call__(self, x):
        raise RuntimeError("backend compiler failed: no C++ toolchain")


def test_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    model, (x, y) = conv_model(), images()
    eager = APGD(model, Linf(0.1), steps=8, seed=0).run(x, y)
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: _BrokenCompiled())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = APGD(model, Linf(0.1), steps=8, seed=0, compile=True).run(x, y)
        second = PGD(model, Linf(0.1), steps=4, seed=0, compile=True).run(x, y)  # same model: no second warning
    fallbacks = [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
    assert len(fallbacks) == 1
    assert "compile" in str(fallbacks[0].message) and "eagerly" in str(fallbacks[0].message)
    assert torch.equal(first.x_adv, eager.x_adv) and torch.equal(first.success, eager.success)
    assert second.x_adv.shape == x.shape


def test_compile_refused_at_wrap_time_falls_back_too(monkeypatch):
    def refuse(module, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refuse)
    model = conv_model(1)
    x, y = images(model=model)
    with pytest.warns(CompileFallbackWarning, match="not supported"):
        result = PGD(model, Linf(0.1), steps=3, seed=0, compile=True).run(x, y)
    assert torch.equal(result.x_adv, PGD(model, Linf(0.1), steps=3, seed=0).run(x, y).x_adv)


def test_a_model_error_still_surfaces_under_compile(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: _BrokenCompiled())
    model = nn.Sequential(nn.Flatten(), nn.Linear(7, 10))  # wrong input width for 8x8 images
    x, y = images()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompileFallbackWarning)
        with pytest.raises(RuntimeError, match="shapes"):
            PGD(model, Linf(0.1), steps=2, compile=True).run(x, y)


def test_compiled_model_gives_the_eager_outcomes():
    """A real torch.compile (or, where this machine cannot compile, the warned fallback): same successes."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    x, y = images(16, seed=4, model=model)
    eager = PGD(model, Linf(0.1), steps=3, seed=0, early_stop=False).run(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompileFallbackWarning)
        compiled = PGD(model, Linf(0.1), steps=3, seed=0, early_stop=False, compile=True).run(x, y)
    assert torch.equal(compiled.success, eager.success)
    assert torch.allclose(compiled.x_adv, eager.x_adv, atol=1e-5)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_evaluate_reports_what_each_attack_spent():
    model, (x, y) = conv_model(), images(20)
    suite = [{"name": "pgd", "steps": 5}, {"name": "square", "queries": 30}]
    report = evaluate(model, (x, y), Linf(0.1), suite, batch_size=8, seed=0)
    clean = int(report.clean_correct.sum())
    after_pgd = round(report.per_attack["pgd"] * len(y))
    spent = report.attack_budget
    assert 0 < spent["pgd"]["gradients"] <= 5 * clean  # early stop: never more than the fixed budget
    assert spent["square"]["gradients"] == 0
    assert after_pgd <= spent["square"]["forwards"] <= 30 * after_pgd + after_pgd
    assert report.to_dict()["attack_budget"] == spent
    assert "gradients" in report.summary() and "queries" in report.summary()


def test_evaluate_compile_option_reaches_every_named_attack(monkeypatch):
    built = []
    original = PGD.__init__

    def spy(self, *args, **kwargs):
        built.append(kwargs.get("compile"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(PGD, "__init__", spy)
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: _BrokenCompiled())
    model = conv_model(3)
    x, y = images(8, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompileFallbackWarning)
        evaluate(model, (x, y), Linf(0.1), [{"name": "pgd", "steps": 2}], batch_size=8, compile=True)
    assert built == [True]


@pytest.mark.parametrize("threat", [Linf(0.04), L2(0.4)], ids=["linf", "l2"])
def test_apgdt_targets_side_by_side_match_one_after_the_other(threat):
    """Same seed: the runs draw the same starts and each row walks alone, so the per-sample outcomes agree."""
    from gradguard.attacks import APGDT

    model = mlp()
    x, y = images(30, seed=5, model=model)
    one_by_one = APGDT(model, threat, steps=12, n_target_classes=4, seed=7, target_batch=0).run(x, y)
    side_by_side = APGDT(model, threat, steps=12, n_target_classes=4, seed=7, target_batch=10_000).run(x, y)
    assert 0 < int(one_by_one.success.sum()) < len(y)
    assert torch.equal(side_by_side.success, one_by_one.success)
    assert bool(threat.contains(side_by_side.x_adv, x, tol=1e-6).all())
    # robust samples run every target in both; only broken ones may cost more side by side
    assert side_by_side.n_grad >= one_by_one.n_grad


def test_apgdt_target_batch_is_checked():
    from gradguard import ConfigError
    from gradguard.attacks import APGDT

    with pytest.raises(ConfigError, match="target_batch"):
        APGDT(conv_model(), Linf(0.1), target_batch=-1)


@pytest.mark.parametrize("threat", [Linf(0.04), L2(0.2)], ids=["linf", "l2"])
def test_fabt_targets_side_by_side_match_one_after_the_other(threat):
    from gradguard.attacks import FAB

    model = mlp()
    x, y = images(30, seed=6, model=model)
    one_by_one = FAB(model, threat, targeted=True, steps=10, n_target_classes=4, seed=7, target_batch=0).run(x, y)
    side_by_side = FAB(model, threat, targeted=True, steps=10, n_target_classes=4, seed=7,
                       target_batch=10_000).run(x, y)
    assert 0 < int(one_by_one.success.sum()) < len(y)
    assert torch.equal(side_by_side.success, one_by_one.success)
    assert bool(threat.contains(side_by_side.x_adv, x, tol=1e-6).all())
