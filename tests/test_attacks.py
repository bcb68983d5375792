"""The foundation attacks: FGSM, BIM, PGD, MI-FGSM — invariants, closed forms, monotonicity, targets."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradguard import L1, L2, Linf, Normalized
from gradguard.attacks import BIM, FGSM, MIFGSM, PGD
from gradguard.attacks.bim import kurakin_defaults
from model_checks import ExplodingModel, assert_same_state, model_state

ATTACKS = {
    "fgsm": lambda m, t, **kw: FGSM(m, t, **kw),
    "fgsm-rs": lambda m, t, **kw: FGSM(m, t, random_start=True, step_size=1.25 * t.eps, **kw),
    "bim": lambda m, t, **kw: BIM(m, t, steps=5, **kw),
    "pgd": lambda m, t, **kw: PGD(m, t, steps=5, **kw),
    "pgd-fgsm-init": lambda m, t, **kw: PGD(m, t, steps=3, init="fgsm", **kw),
    "mifgsm": lambda m, t, **kw: MIFGSM(m, t, steps=5, **kw),
}
NORMS = {"linf": Linf, "l2": L2, "l1": L1}


def small_cnn(channels: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
        nn.Flatten(), nn.LazyLinear(classes),
    )


# ------------------------------------------------------------------------------------------------
# Invariants, for every attack x norm x random shapes / eps
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("name", sorted(ATTACKS))
@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 5), channels=st.integers(1, 3), side=st.integers(3, 7), classes=st.integers(2, 6),
    eps=st.floats(0.0, 2.0), seed=st.integers(0, 1000), targeted=st.booleans(), restarts=st.integers(1, 2),
    early_stop=st.booleans(),
)
def test_attack_stays_in_ball_and_bounds_and_leaves_model_untouched(
    name, norm, batch, channels, side, classes, eps, seed, targeted, restarts, early_stop
):
    torch.manual_seed(seed)
    model = small_cnn(channels, classes)
    model(torch.rand(2, channels, side, side))  # materialise the lazy layer
    model.train()  # attacks must put it in eval mode and restore train mode afterwards
    model[0].weight.grad = torch.randn_like(model[0].weight)  # a stale .grad must survive
    model[1].weight.requires_grad_(False)  # and a frozen parameter must stay frozen
    x = torch.rand(batch, channels, side, side)
    y = torch.randint(0, classes, (batch,))
    threat = NORMS[norm](eps=eps, check_eps=False)  # the invariants hold for any radius, also past the box
    before = model_state(model)
    attack = ATTACKS[name](model, threat, targeted=targeted, restarts=restarts, early_stop=early_stop, seed=seed)
    result = attack.run(x, y)
    assert result.x_adv.shape == x.shape
    assert bool(threat.contains(result.x_adv, x, tol=1e-6).all())
    assert_same_state(before, model_state(model))
    assert result.success.shape == (batch,) and result.logits.shape == (batch, classes)


@pytest.mark.parametrize("name", ["pgd", "bim", "mifgsm"])
def test_model_restored_after_an_exception(name):
    model = ExplodingModel().train()
    model.linear.weight.grad = torch.ones_like(model.linear.weight)
    before = model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        ATTACKS[name](model, Linf(eps=0.1), early_stop=False)(torch.rand(4, 16), torch.zeros(4, dtype=torch.long))
    assert_same_state(before, model_state(model))


# ------------------------------------------------------------------------------------------------
# Closed forms on linear models
# ------------------------------------------------------------------------------------------------
def binary_linear(w: torch.Tensor, b: float) -> nn.Module:
    """Logits (0, w·x + b): class 1 iff w·x + b > 0."""
    model = nn.Linear(w.numel(), 2)
    with torch.no_grad():
        model.weight.copy_(torch.stack([torch.zeros_like(w), w]))
        model.bias.copy_(torch.tensor([0.0, b]))
    return model


@pytest.fixture
def linear_problem():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(20, generator=gen)
    x = 0.3 + 0.4 * torch.rand(16, 20, generator=gen)  # away from the bounds: no clipping
    b = -float((x @ w).median()) + 1e-3  # about half the samples in each class
    y = (x @ w + b > 0).long()  # the model is correct everywhere
    return binary_linear(w, b), w, x, y


def test_fgsm_linf_matches_closed_form_on_linear_model(linear_problem):
    model, w, x, y = linear_problem
    eps = 0.05
    sign_of_label = (2 * y - 1).float()[:, None]
    optimal = x - eps * sign_of_label * w.sign()  # minimises the margin s·(w·x) over the L∞ ball
    assert torch.allclose(FGSM(model, Linf(eps=eps))(x, y), optimal, atol=1e-6)


def test_pgd_l2_converges_to_minimum_margin_point(linear_problem):
    model, w, x, y = linear_problem
    eps = 0.2
    sign_of_label = (2 * y - 1).float()[:, None]
    optimal = x - eps * sign_of_label * w / w.norm()
    x_adv = PGD(model, L2(eps=eps), steps=100, step_size=0.05, early_stop=False, seed=0)(x, y)
    margin = (2 * y - 1).float() * (x_adv @ w)
    optimal_margin = (2 * y - 1).float() * (optimal @ w)
    assert torch.allclose(margin, optimal_margin, atol=1e-5)  # the objective reaches its analytic optimum
    # The position converges too; float32 flatness of the objective at the optimum limits it to ~1e-4.
    assert torch.allclose(x_adv, optimal, atol=5e-4)


def test_pgd_l1_reaches_the_optimal_l1_margin(linear_problem):
    model, w, x, y = linear_problem
    eps = 0.1  # the optimum moves the largest-|w| coordinate by eps: margin drops by eps·max|w|
    sign_of_label = (2 * y - 1).float()
    margin_before = sign_of_label * (x @ w)
    x_adv = PGD(model, L1(eps=eps, sparsity=0.05), steps=50, step_size=0.02, early_stop=False, seed=0)(x, y)
    margin_after = sign_of_label * (x_adv @ w)
    assert torch.allclose(margin_before - margin_after, torch.full_like(margin_after, eps * float(w.abs().max())),
                          rtol=1e-3)


@pytest.mark.parametrize("steps", [5, 20])
def test_robust_accuracy_falls_with_eps_on_linear_model(linear_problem, steps):
    model, _, x, y = linear_problem
    accuracies = [PGD(model, Linf(eps=eps), steps=steps, seed=0).run(x, y).accuracy
                  for eps in (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)]
    assert accuracies == sorted(accuracies, reverse=True)
    assert accuracies[0] == 1.0 and accuracies[-1] < accuracies[0]


# ------------------------------------------------------------------------------------------------
# Monotonicity on a trained model: more steps / restarts / eps never help the defender
# ------------------------------------------------------------------------------------------------
def test_more_steps_never_raise_robust_accuracy(digits, digits_mlp):
    x, y = digits.x_test[:200], digits.y_test[:200]
    successes = [PGD(digits_mlp, Linf(eps=0.05), steps=s, step_size=0.01, seed=1).run(x, y).success
                 for s in (1, 3, 10, 30)]
    for fewer, more in zip(successes, successes[1:], strict=False):
        assert bool((more | ~fewer).all()), "a sample broken with fewer steps survived more steps"
    assert successes[-1].sum() > successes[0].sum()


def test_more_restarts_never_raise_robust_accuracy(digits, digits_mlp):
    x, y = digits.x_test[:200], digits.y_test[:200]
    successes = [PGD(digits_mlp, L2(eps=0.6), steps=5, restarts=r, seed=2).run(x, y).success for r in (1, 2, 4)]
    for fewer, more in zip(successes, successes[1:], strict=False):
        assert bool((more | ~fewer).all())


def test_larger_eps_never_raises_robust_accuracy(digits, digits_mlp):
    x, y = digits.x_test[:200], digits.y_test[:200]
    accuracies = [PGD(digits_mlp, Linf(eps=e), steps=20, seed=0).run(x, y).accuracy for e in (0.0, 0.02, 0.05, 0.1, 0.2)]
    assert accuracies == sorted(accuracies, reverse=True)
    assert accuracies[-1] < 0.05 < 0.9 < accuracies[0]


def test_iterative_attacks_beat_fgsm(digits, digits_mlp):
    x, y = digits.x_test[:300], digits.y_test[:300]
    threat = Linf(eps=0.05)
    fgsm = FGSM(digits_mlp, threat).run(x, y).accuracy
    for attack in (BIM(digits_mlp, threat), PGD(digits_mlp, threat, steps=20), MIFGSM(digits_mlp, threat)):
        assert attack.run(x, y).accuracy <= fgsm


def test_best_iterate_is_returned_not_the_last(digits, digits_mlp):
    """With a step far too large the last iterate oscillates; the best one is kept."""
    x, y = digits.x_test[:100], digits.y_test[:100]
    threat = L2(eps=1.0)
    result = PGD(digits_mlp, threat, steps=10, step_size=3.0, early_stop=False, seed=0).run(x, y)
    logits = digits_mlp(result.x_adv)
    losses = nn.functional.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(result.loss, losses, atol=1e-5)  # the reported loss belongs to the returned point


# ------------------------------------------------------------------------------------------------
# Targets and early stop
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["random", "least-likely"])
def test_targeted_pgd_reaches_targets(digits, digits_mlp, policy):
    x, y = digits.x_test[:200], digits.y_test[:200]
    result = PGD(digits_mlp, Linf(eps=0.3), steps=40, targeted=True, target_policy=policy, seed=0).run(x, y)
    assert result.targets is not None and bool((result.targets != y).all() or policy == "least-likely")
    assert float((result.predictions == result.targets).float().mean()) >= 0.95


def test_targeted_attack_with_given_targets(digits, digits_mlp):
    x, y = digits.x_test[:100], digits.y_test[:100]
    target = (y + 3) % 10
    result = MIFGSM(digits_mlp, L2(eps=3.0), steps=20, targeted=True).run(x, y, target=target)
    assert torch.equal(result.targets, target)
    assert float(result.success.float().mean()) >= 0.95


def test_early_stop_saves_gradient_work_without_losing_successes(digits, digits_mlp):
    x, y = digits.x_test[:200], digits.y_test[:200]
    threat = Linf(eps=0.1)
    eager = PGD(digits_mlp, threat, steps=20, seed=0, early_stop=True).run(x, y)
    full = PGD(digits_mlp, threat, steps=20, seed=0, early_stop=False).run(x, y)
    assert eager.n_grad < full.n_grad == 20 * 200
    assert torch.equal(eager.success, full.success)  # the iterates agree until a sample succeeds


def test_bim_uses_kurakin_defaults():
    steps, step_size = kurakin_defaults(Linf(eps=8 / 255))
    assert steps == 10 and step_size == pytest.approx(1 / 255)  # min(8 + 4, 1.25 * 8) = 10
    attack = BIM(nn.Linear(4, 2), Linf(eps=16 / 255))
    assert attack.steps == 20 and attack.init == "zero"


def test_normalized_keeps_eps_in_pixel_space(digits, digits_mlp):
    mean, std = 0.3, 0.4
    inner = digits_mlp
    wrapped = Normalized(nn.Sequential(nn.Identity()), mean, std)
    wrapped.model = nn.Sequential(_Affine(std, mean), inner)  # undoes the normalisation: same function
    x, y = digits.x_test[:50], digits.y_test[:50]
    assert torch.allclose(wrapped(x), inner(x), atol=1e-5)
    threat = Linf(eps=0.05)
    x_adv = PGD(wrapped, threat, steps=10, seed=0)(x, y)
    assert bool(threat.contains(x_adv, x).all())


class _Affine(nn.Module):
    def __init__(self, scale, shift):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x):
        return x * self.scale + self.shift


def test_attack_is_reproducible_with_a_seed(digits, digits_mlp):
    x, y = digits.x_test[:50], digits.y_test[:50]
    a = PGD(digits_mlp, L2(eps=0.5), steps=5, restarts=2, seed=7)(x, y)
    b = PGD(digits_mlp, L2(eps=0.5), steps=5, restarts=2, seed=7)(x, y)
    assert torch.equal(a, b)


def test_empty_batch_returns_empty_result(digits_mlp):
    result = PGD(digits_mlp, Linf(eps=0.1)).run(torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    assert result.x_adv.shape == (0, 1, 8, 8) and result.n_grad == 0


# ------------------------------------------------------------------------------------------------
# Objectives
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targeted", [False, True])
def test_margin_is_positive_exactly_when_the_attack_succeeded(targeted):
    from gradguard.attacks.losses import margin

    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(1))
    predicted = logits.argmax(1)
    succeeded = predicted == labels if targeted else predicted != labels
    assert torch.equal(margin(logits, labels, targeted) > 0, succeeded)


@pytest.mark.parametrize("targeted", [False, True])
def test_dlr_is_invariant_to_shifting_and_scaling_logits(targeted):
    from gradguard.attacks.losses import dlr

    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.randint(0, 10, (50,), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(dlr(logits, labels, targeted), dlr(7.5 * logits + 3.0, labels, targeted))


def test_targeted_cross_entropy_is_minus_the_ce_of_the_target():
    from gradguard.attacks.losses import cross_entropy

    logits = torch.randn(5, 4)
    target = torch.tensor([0, 1, 2, 3, 0])
    expected = -nn.functional.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(cross_entropy(logits, target, True), expected)
