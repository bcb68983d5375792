"""The strong attacks: APGD, APGD-T, CW-L2, DeepFool, Square — invariants, the papers' schedules, closed forms on
linear models, and strength on a trained digits MLP."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradguard import L1, L2, ConfigError, Linf
from gradguard.attacks import APGD, APGDT, CW, PGD, DeepFool, Square, apgd_checkpoints, square_p_schedule
from gradguard.attacks.apgd import targeted_dlr
from model_checks import ExplodingModel, assert_same_state, model_state

NORMS = {"linf": Linf, "l2": L2, "l1": L1}
# name -> (builder with a small budget, supported norms, supports targeted)
ATTACKS = {
    "apgd-ce": (lambda m, t, **kw: APGD(m, t, steps=6, **kw), ("linf", "l2", "l1"), True),
    "apgd-margin": (lambda m, t, **kw: APGD(m, t, loss="margin", steps=6, **kw), ("linf", "l2", "l1"), True),
    "apgd-t": (lambda m, t, **kw: APGDT(m, t, steps=4, n_target_classes=2, **kw), ("linf", "l2", "l1"), False),
    "cw": (lambda m, t, **kw: CW(m, t, steps=5, binary_search_steps=2, **kw), ("l2",), True),
    "deepfool": (lambda m, t, **kw: DeepFool(m, t, steps=5, **kw), ("linf", "l2"), False),
    "square": (lambda m, t, **kw: Square(m, t, queries=15, **kw), ("linf", "l2"), True),
}
SUPPORTED = [(name, norm) for name, (_, norms, _) in sorted(ATTACKS.items()) for norm in norms]
UNSUPPORTED = [(name, norm) for name, (_, norms, _) in sorted(ATTACKS.items()) for norm in NORMS if norm not in norms]


def small_cnn(channels: int, classes: int, side: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
        nn.Flatten(), nn.Linear(4 * side * side, classes),
    )


def binary_linear(w: torch.Tensor, b: float) -> nn.Module:
    """Logits (0, w·x + b): class 1 iff w·x + b > 0."""
    model = nn.Linear(w.numel(), 2)
    with torch.no_grad():
        model.weight.copy_(torch.stack([torch.zeros_like(w), w]))
        model.bias.copy_(torch.tensor([0.0, b]))
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Invariants, for every attack x supported norm x random shapes / eps
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,norm", SUPPORTED)
@settings(max_examples=3, deadline=None)
@given(
    batch=st.integers(1, 4), channels=st.integers(1, 2), side=st.integers(3, 6), classes=st.integers(2, 6),
    eps=st.floats(0.0, 2.0), seed=st.integers(0, 1000), targeted=st.booleans(), restarts=st.integers(1, 2),
    early_stop=st.booleans(),
)
def test_strong_attack_stays_in_ball_and_bounds_and_leaves_model_untouched(
    name, norm, batch, channels, side, classes, eps, seed, targeted, restarts, early_stop
):
    build, _, can_target = ATTACKS[name]
    torch.manual_seed(seed)
    model = small_cnn(channels, classes, side).train()  # attacks must use eval mode and restore train mode
    model[0].weight.grad = torch.randn_like(model[0].weight)  # a stale .grad must survive
    model[1].weight.requires_grad_(False)  # and a frozen parameter must stay frozen
    x = torch.rand(batch, channels, side, side)
    y = torch.randint(0, classes, (batch,))
    threat = NORMS[norm](eps=eps, check_eps=False)  # the invariants hold for any radius, also past the box
    before = model_state(model)
    attack = build(model, threat, targeted=targeted and can_target, restarts=restarts, early_stop=early_stop, seed=seed)
    result = attack.run(x, y)
    assert result.x_adv.shape == x.shape
    assert bool(threat.contains(result.x_adv, x, tol=1e-6).all())
    assert_same_state(before, model_state(model))
    assert result.success.shape == (batch,) and result.logits.shape == (batch, classes)
    assert torch.equal(result.success, result.logits.argmax(1) != y) or (targeted and can_target)


@pytest.mark.parametrize("name,norm", SUPPORTED)
def test_strong_attack_on_flat_inputs_stays_in_ball(name, norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))
    x, y = torch.rand(6, 20), torch.randint(0, 5, (6,))
    threat = NORMS[norm](eps=0.3)
    adversarial = ATTACKS[name][0](model, threat, seed=0)(x, y)
    assert bool(threat.contains(adversarial, x, tol=1e-6).all())


@pytest.mark.parametrize("name,norm", [(n, norms[0] if n != "cw" else "l2") for n, (_, norms, _) in sorted(ATTACKS.items())])
def test_model_restored_after_an_exception(name, norm):
    model = ExplodingModel(classes=5).train()
    model.linear.weight.grad = torch.ones_like(model.linear.weight)
    model.linear.bias.requires_grad_(False)
    before = model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        ATTACKS[name][0](model, NORMS[norm](eps=0.1), early_stop=False)(torch.rand(4, 16), torch.zeros(4, dtype=torch.long))
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("name,norm", UNSUPPORTED)
def test_unsupported_norm_raises_config_error_naming_threat(name, norm):
    with pytest.raises(ConfigError, match="threat"):
        ATTACKS[name][0](nn.Linear(4, 3), NORMS[norm](eps=0.1))


def test_bad_arguments_raise_config_errors_naming_them():
    model = nn.Linear(4, 3)
    with pytest.raises(ConfigError, match="rho"):
        APGD(model, Linf(eps=0.1), rho=1.5)
    with pytest.raises(ConfigError, match="targeted"):
        APGDT(model, Linf(eps=0.1), targeted=True)
    with pytest.raises(ConfigError, match="targeted"):
        DeepFool(model, L2(eps=0.1), targeted=True)
    with pytest.raises(ConfigError, match="p_init"):
        Square(model, Linf(eps=0.1), p_init=1.5)
    with pytest.raises(ConfigError, match="binary_search_steps"):
        CW(model, L2(eps=0.1), binary_search_steps=0)


# ------------------------------------------------------------------------------------------------
# The papers' schedules and losses
# ------------------------------------------------------------------------------------------------
def test_apgd_checkpoints_match_the_paper_for_100_steps():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (then 1.05 > 1): w_j = ceil(p_j * 100).
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]


def test_apgd_checkpoints_scale_with_the_budget_and_stay_inside_it():
    assert apgd_checkpoints(1000) == [0, 220, 410, 570, 700, 800, 870, 930, 990]
    for steps in (1, 2, 5, 13):
        points = apgd_checkpoints(steps)
        assert points[0] == 0 and points == sorted(set(points)) and points[-1] <= steps


def test_square_p_schedule_halves_at_the_papers_iterations():
    assert square_p_schedule(0.8, 10, 10000) == 0.8
    assert square_p_schedule(0.8, 11, 10000) == 0.4
    assert square_p_schedule(0.8, 51, 10000) == 0.2
    assert square_p_schedule(0.8, 8001, 10000) == pytest.approx(0.8 / 512)
    assert square_p_schedule(0.8, 6, 5000) == 0.4  # rescaled: 6 / 5000 of 10 000 = 12 > 10


def test_targeted_dlr_is_the_papers_formula():
    logits = torch.tensor([[4.0, 1.0, 3.0, 0.0, -2.0]])
    pairs = torch.tensor([[0, 2]])  # y = 0, t = 2; sorted: 4, 3, 1, 0, -2
    expected = -(4.0 - 3.0) / (4.0 - (1.0 + 0.0) / 2)
    assert targeted_dlr(logits, pairs).item() == pytest.approx(expected)
    shifted_scaled = targeted_dlr(3 * logits + 7, pairs)
    assert shifted_scaled.item() == pytest.approx(expected)  # invariant to shift and scale, like DLR


# ------------------------------------------------------------------------------------------------
# Closed forms on linear models
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def linear_problem():
    torch.manual_seed(3)
    w = torch.randn(12)
    model = binary_linear(w, 0.3)
    x = torch.rand(5, 12) * 2 - 1
    labels = (model(x).argmax(1)).long()  # every point correctly classified
    return model, w, 0.3, x, labels


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_deepfool_matches_the_minimal_perturbation_on_a_linear_model(linear_problem, norm):
    model, w, b, x, labels = linear_problem
    threat = NORMS[norm](eps=100.0, bounds=(-50.0, 50.0), check_eps=False)  # no budget: the raw minimum
    result = DeepFool(model, threat).run(x, labels)
    margin = (x @ w + b).abs()
    dual = w.norm() if norm == "l2" else w.abs().sum()
    # one linearisation step reaches the boundary exactly: (|f| + 1e-4) / ‖w‖_dual, times (1 + overshoot)
    expected = (margin + 1e-4) / dual * 1.02
    assert bool(result.success.all())
    assert torch.allclose(threat.distance(result.x_adv, x), expected, rtol=1e-4, atol=1e-5)
    assert result.n_grad == 2 * x.shape[0]  # one step, then one pass that sees the flip (one candidate class)


def test_cw_finds_nearly_the_minimal_l2_perturbation_on_a_linear_model(linear_problem):
    model, w, b, x, labels = linear_problem
    threat = L2(eps=100.0, bounds=(-1.5, 1.5), check_eps=False)  # no budget: the raw minimum
    result = CW(model, threat, steps=200).run(x, labels)  # default lr 0.01, 9 binary-search steps
    minimal = (x @ w + b).abs() / w.norm()
    distance = threat.distance(result.x_adv, x)
    assert bool(result.success.all())
    assert bool((distance >= minimal - 1e-4).all()), "crossed the boundary with less than the minimal distance?"
    # Adam's step granularity (its first steps move every coordinate by about lr in tanh space) limits how
    # close it gets on tiny distances: within 5 % or 0.02 absolute.
    assert bool((distance <= torch.maximum(minimal * 1.05, minimal + 0.02)).all()), (distance, minimal)


def test_cw_points_beyond_eps_are_projected_and_rescored(linear_problem):
    model, w, b, x, labels = linear_problem
    minimal = (x @ w + b).abs() / w.norm()
    threat = L2(eps=float(minimal.min()) * 0.5, bounds=(-1.5, 1.5))  # too small for every sample
    result = CW(model, threat, steps=100, binary_search_steps=3).run(x, labels)
    assert bool(threat.contains(result.x_adv, x, tol=1e-6).all())
    assert not bool(result.success.any())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_reaches_the_closed_form_optimum_on_a_linear_model(linear_problem, norm):
    model, w, b, x, labels = linear_problem
    threat = NORMS[norm](eps=0.05, bounds=(-5.0, 5.0))  # small eps: no sample can be flipped
    result = APGD(model, threat, steps=20, early_stop=False, seed=0).run(x, labels)
    toward_boundary = torch.where(labels == 1, -1.0, 1.0)[:, None]  # move w·x + b toward the other class
    step = w.sign() * 0.05 if norm == "linf" else w / w.norm() * 0.05
    optimum = x + toward_boundary * step
    # L∞: the first 2·eps step lands on the optimal corner. L2: the walk converges along the sphere.
    assert torch.allclose(result.x_adv, optimum, atol=1e-6 if norm == "linf" else 1e-4)


# ------------------------------------------------------------------------------------------------
# Strength on a trained model
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_batch(digits):
    return digits.x_test[:100], digits.y_test[:100]


@pytest.mark.parametrize("threat", [Linf(eps=0.1), L2(eps=0.8)], ids=["linf", "l2"])
def test_apgd_ce_is_at_least_as_strong_as_pgd(digits_mlp, digits_batch, threat):
    x, y = digits_batch
    pgd = PGD(digits_mlp, threat, steps=30, seed=0).run(x, y).accuracy
    apgd = APGD(digits_mlp, threat, steps=30, seed=0).run(x, y).accuracy
    assert apgd <= pgd + 0.02, (apgd, pgd)


def test_apgd_t_is_at_least_as_strong_as_apgd_ce(digits_mlp, digits_batch):
    x, y = digits_batch
    threat = Linf(eps=0.1)
    clean = (digits_mlp(x).argmax(1) == y).float().mean().item()
    apgd = APGD(digits_mlp, threat, steps=30, seed=0).run(x, y).accuracy
    apgdt = APGDT(digits_mlp, threat, steps=30, n_target_classes=3, seed=0).run(x, y).accuracy
    assert apgd < clean - 0.2  # the attack does something at this eps
    assert apgdt <= apgd + 0.03, (apgdt, apgd)


def test_apgd_dlr_runs_and_lowers_accuracy(digits_mlp, digits_batch):
    x, y = digits_batch
    clean = (digits_mlp(x).argmax(1) == y).float().mean().item()
    assert APGD(digits_mlp, Linf(eps=0.1), loss="dlr", steps=30, seed=0).run(x, y).accuracy < clean - 0.2


@pytest.mark.parametrize("threat", [Linf(eps=0.3), L2(eps=3.0)], ids=["linf", "l2"])
def test_square_breaks_an_undefended_model_without_gradients(digits_mlp, digits_batch, threat):
    x, y = digits_batch[0][:50], digits_batch[1][:50]
    result = Square(digits_mlp, threat, queries=300, seed=0).run(x, y)
    assert result.accuracy <= 0.1, result.accuracy
    assert result.n_grad == 0
    assert 0 < result.n_forward <= 300 * x.shape[0]
    assert bool(threat.contains(result.x_adv, x, tol=1e-6).all())


def test_square_is_reproducible_with_a_seed(digits_mlp, digits_batch):
    x, y = digits_batch[0][:20], digits_batch[1][:20]
    first = Square(digits_mlp, L2(eps=1.0), queries=40, seed=5)(x, y)
    second = Square(digits_mlp, L2(eps=1.0), queries=40, seed=5)(x, y)
    assert torch.equal(first, second)


def test_deepfool_and_cw_flip_most_digits_with_a_generous_l2_budget(digits_mlp, digits_batch):
    x, y = digits_batch[0][:30], digits_batch[1][:30]
    threat = L2(eps=3.0)
    assert DeepFool(digits_mlp, threat).run(x, y).accuracy <= 0.05
    # digits have many pixels at 0 or 1, slow to move in tanh space: a larger Adam step for a short run
    assert CW(digits_mlp, threat, steps=100, binary_search_steps=4, lr=0.05).run(x, y).accuracy <= 0.05


def test_cw_confidence_is_met_when_the_budget_allows(digits_mlp, digits_batch):
    x, y = digits_batch[0][:15], digits_batch[1][:15]
    unbounded = L2(eps=10.0, check_eps=False)  # past the box's L2 diameter (8): no budget
    result = CW(digits_mlp, unbounded, steps=100, binary_search_steps=5, confidence=2.0, lr=0.05).run(x, y)
    assert bool(result.success.all())
    assert bool((result.loss >= 2.0 - 1e-4).all())  # the margin max_{i≠y} z_i − z_y at the returned point
    assert math.isfinite(float(result.loss.sum()))


def test_square_lays_its_schedule_out_for_schedule_queries(monkeypatch):
    """AutoAttack's Square runs 5 000 queries on the schedule of 10 000 (its windows stay large twice as long); the
    default rescales the schedule to the budget."""
    import gradguard.attacks.square as square

    seen: list[int] = []
    schedule = square.square_p_schedule
    monkeypatch.setattr(square, "square_p_schedule", lambda p, it, q: seen.append(q) or schedule(p, it, q))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    Square(model, Linf(0.01), queries=20, schedule_queries=10000, seed=0, early_stop=False).run(x, y)
    Square(model, Linf(0.01), queries=20, seed=0, early_stop=False).run(x, y)
    assert set(seen[:19]) == {10000} and set(seen[19:]) == {20}
    with pytest.raises(ConfigError, match="schedule_queries"):
        Square(model, Linf(0.01), schedule_queries=0)
