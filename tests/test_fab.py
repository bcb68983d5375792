"""FAB and FAB-T: exact hyperplane projections, the closed-form minimal perturbation of a linear classifier,
the threat-model and model-untouched invariants, FAB-T's targets, the suites that run it, and argument errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gradguard import L1, L2, ConfigError, Linf
from gradguard.attacks import FAB
from gradguard.attacks.fab import lp_norm, project_onto_hyperplane
from gradguard.evaluation.suites import ATTACKS, SUITES, resolve_suite
from model_checks import assert_same_state, model_state

NORMS = {"linf": Linf, "l2": L2, "l1": L1}
DUAL = {"linf": "l1", "l2": "l2", "l1": "linf"}
WIDE = (-100.0, 100.0)  # a box that never binds on these problems


def linear_model(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    model = nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.copy_(bias)
    return model.eval()


def binary_problem(seed: int = 0, n: int = 4, d: int = 12):
    """Logits (0, w·x + b) and inputs near the middle of [0, 1]^d, in float64."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=generator, dtype=torch.float64)
    model = linear_model(torch.stack([torch.zeros_like(w), w]), torch.tensor([0.0, 0.3], dtype=torch.float64))
    x = 0.4 + 0.2 * torch.rand(n, d, generator=generator, dtype=torch.float64)
    return model, w, x, x @ w + 0.3


# ------------------------------------------------------------------------------------------------
# The projection onto a hyperplane inside the box
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_projection_without_a_binding_box_is_the_closed_form_distance(norm):
    generator = torch.Generator().manual_seed(1)
    t = torch.rand(6, 20, generator=generator, dtype=torch.float64)
    w = torch.randn(6, 20, generator=generator, dtype=torch.float64)
    b = torch.randn(6, generator=generator, dtype=torch.float64)
    delta = project_onto_hyperplane(t, w, b, norm, WIDE)
    torch.testing.assert_close((w * (t + delta)).sum(1), b, rtol=0, atol=1e-12)
    expected = (b - (w * t).sum(1)).abs() / lp_norm(w, DUAL[norm])
    torch.testing.assert_close(lp_norm(delta, norm), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_saturates_a_coordinate_the_box_stops(norm):
    # w·δ = 0.4 with w = (1, 1): unbounded, both coordinates would move by 0.2; the first has room 0.1 only.
    t = torch.tensor([[0.9, 0.5]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    delta = project_onto_hyperplane(t, w, torch.tensor([1.8], dtype=torch.float64), norm, (0.0, 1.0))
    torch.testing.assert_close(delta, torch.tensor([[0.1, 0.3]], dtype=torch.float64))


def test_projection_l1_moves_the_largest_weight_first_and_spills_over_at_the_box():
    t = torch.tensor([[0.8, 0.5, 0.5]], dtype=torch.float64)
    w = torch.tensor([[3.0, 1.0, -2.0]], dtype=torch.float64)  # gap 1.0: 3·0.2 from x_0, then −2·(−0.2) from x_2
    delta = project_onto_hyperplane(t, w, (w * t).sum(1) + 1.0, "l1", (0.0, 1.0))
    torch.testing.assert_close(delta, torch.tensor([[0.2, 0.0, -0.2]], dtype=torch.float64))


def test_projection_of_an_unreachable_hyperplane_goes_to_the_nearest_corner():
    t = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    w = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    for norm in NORMS:
        delta = project_onto_hyperplane(t, w, torch.tensor([5.0], dtype=torch.float64), norm, (0.0, 1.0))
        torch.testing.assert_close(delta, torch.tensor([[0.5, -0.5]], dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# FAB on linear models: the minimal perturbation is known in closed form
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_fab_finds_the_closed_form_distance_to_a_linear_boundary(norm, targeted):
    model, w, x, f = binary_problem()
    labels = (f > 0).long()
    # eta just above 1: every step lands a hair past the boundary, so the kept point is the exact projection.
    attack = FAB(model, NORMS[norm](eps=50.0, bounds=WIDE), targeted=targeted, eta=1 + 1e-9, steps=10,
                 early_stop=False)
    result = attack.run(x, labels)
    distance = NORMS[norm](eps=0.1).distance(result.x_adv, x)
    expected = f.abs() / lp_norm(w[None], DUAL[norm])
    assert bool(result.success.all())
    torch.testing.assert_close(distance, expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_fab_default_overshoot_converges_just_past_the_boundary(norm):
    # With eta = 1.05, alpha <= 0.1 and beta = 0.9 the kept perturbation settles 0.52 % above the true distance.
    model, w, x, f = binary_problem(seed=3)
    result = FAB(model, NORMS[norm](eps=50.0, bounds=WIDE), early_stop=False, steps=60).run(x, (f > 0).long())
    ratio = NORMS[norm](eps=0.1).distance(result.x_adv, x) / (f.abs() / lp_norm(w[None], DUAL[norm]))
    assert bool(result.success.all())
    assert bool((ratio > 1.0).all()) and bool((ratio < 1.006).all())


def test_fab_t_reaches_its_target_class_on_a_linear_multiclass_model():
    # Class 0 wins at x, class 1 is second and class 2 is far below: the boundary FAB-T crosses leads into class 1.
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-5.0, -5.0, 0.0]], dtype=torch.float64)
    model = linear_model(weight, torch.tensor([0.2, 0.0, 0.0], dtype=torch.float64))
    x = torch.tensor([[0.5, 0.45, 0.3], [0.6, 0.3, 0.9]], dtype=torch.float64)
    labels = torch.zeros(2, dtype=torch.long)
    for norm in NORMS:
        attack = FAB(model, NORMS[norm](eps=2.0, check_eps=False), targeted=True, n_target_classes=1, eta=1 + 1e-9, steps=10,
                     early_stop=False)
        result = attack.run(x, labels)
        assert result.predictions.tolist() == [1, 1], norm
        margin = 0.2 + x[:, 0] - x[:, 1]
        expected = margin / lp_norm((weight[1] - weight[0])[None], DUAL[norm])
        torch.testing.assert_close(NORMS[norm](eps=0.1).distance(result.x_adv, x), expected, rtol=1e-7, atol=0)


def test_fab_counts_a_perturbation_beyond_eps_as_a_failure():
    model, w, x, f = binary_problem()
    eps = float((f.abs() / w.norm()).min()) * 0.5  # half the smallest true L2 distance: nothing can succeed
    attack = FAB(model, L2(eps=eps, bounds=WIDE), steps=20)
    result = attack.run(x, (f > 0).long())
    assert not bool(result.success.any())
    assert bool(L2(eps=eps, bounds=WIDE).contains(result.x_adv, x).all())
    # what it found outside the ball is still measured: the smallest adversarial distance, just past the true one
    # (the adaptive suite's near_boundary evidence reads it)
    assert attack.min_distance is not None
    ratio = attack.min_distance / (f.abs() / w.norm())
    assert bool((ratio >= 1.0).all()) and bool((ratio < 1.06).all())


def test_fab_budget_is_one_gradient_per_class_pair_and_step_while_nothing_is_found():
    # The boundary w·x + 50 = 0 lies outside the box [0, 1]^d: every step stays on the clean side.
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, 12, generator=generator, dtype=torch.float64)
    weight = torch.stack([torch.zeros(12, dtype=torch.float64), torch.ones(12, dtype=torch.float64)])
    model = linear_model(weight, torch.tensor([50.0, 0.0], dtype=torch.float64))
    labels = torch.zeros(3, dtype=torch.long)
    targeted = FAB(model, Linf(eps=1.0, check_eps=False), targeted=True, steps=7).run(x, labels)
    assert not bool(targeted.success.any())
    assert targeted.n_grad == 3 * 7  # one target (2 classes): one gradient per sample and step
    three = linear_model(torch.cat([weight, -weight[1:]]), torch.tensor([50.0, 0.0, 0.0], dtype=torch.float64))
    untargeted = FAB(three, Linf(eps=1.0, check_eps=False), steps=7).run(x, labels)
    assert untargeted.n_grad == 3 * 7 * 2  # every other class's logit difference, each step


# ------------------------------------------------------------------------------------------------
# Invariants on a small CNN
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_fab_stays_in_ball_and_bounds_and_leaves_the_model_untouched(norm, targeted):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
                          nn.Flatten(), nn.Linear(4 * 5 * 5, 4)).train()
    model[0].weight.grad = torch.randn_like(model[0].weight)
    model[1].weight.requires_grad_(False)
    x = torch.rand(5, 1, 5, 5)
    y = torch.randint(0, 4, (5,))
    threat = NORMS[norm](eps={"linf": 0.05, "l2": 0.3, "l1": 1.0}[norm])
    before = model_state(model)
    result = FAB(model, threat, targeted=targeted, n_target_classes=2, steps=8, restarts=2, seed=0).run(x, y)
    assert bool(threat.contains(result.x_adv, x, tol=1e-6).all())
    assert_same_state(before, model_state(model))
    assert torch.equal(result.success, result.logits.argmax(1) != y)


# ------------------------------------------------------------------------------------------------
# Suites and arguments
# ------------------------------------------------------------------------------------------------
def test_standard_suite_is_autoattacks_four_attacks_and_lite_the_three_without_fab_t():
    assert [spec.name for spec in resolve_suite("standard")] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert [spec.name for spec in resolve_suite("lite")] == ["apgd-ce", "apgd-t", "square"]
    fab_t = next(spec for spec in SUITES["standard"] if spec["name"] == "fab-t")
    assert fab_t.get("steps", 100) == 100 and fab_t.get("n_target_classes", 9) == 9
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    for norm, threat_class in NORMS.items():
        built = resolve_suite(["fab-t"])[0].build(model, threat_class(eps=0.1), seed=0)
        assert isinstance(built, FAB) and built.per_target and norm in ATTACKS["fab-t"].norms
        assert not resolve_suite(["fab"])[0].build(model, threat_class(eps=0.1), seed=0).per_target


def test_fab_t_first_target_runs_only_the_later_ranks_and_a_suite_entry_may_set_it_per_norm():
    # Class 0 wins; by clean logit the others rank 1, 2, 3: FAB-T from rank 1 on never steers toward class 1.
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    model = linear_model(weight, torch.tensor([0.5, 0.3, 0.2, 0.1], dtype=torch.float64))
    x = torch.full((1, 3), 0.5, dtype=torch.float64)
    with torch.no_grad():
        order = model(x).argsort(dim=1, descending=True)[0, 1:].tolist()
    labels = torch.zeros(1, dtype=torch.long)
    attack = FAB(model, L2(eps=2.0, check_eps=False), targeted=True, n_target_classes=1, first_target=1, steps=10,
                 early_stop=False)
    result = attack.run(x, labels)
    assert int(result.predictions[0]) == order[1]  # the second-likeliest wrong class, not the first
    with torch.no_grad():
        rounds = attack._target_rounds(model(x), labels)
    assert [int(t[0]) for t in rounds] == [order[1]]
    spec = resolve_suite([{"name": "fab-t", "first_target": {"l2": 2}}])[0]
    assert spec.build(model, L2(0.1), seed=0).first_target == 2
    assert spec.build(model, Linf(0.1), seed=0).first_target == 0
    with pytest.raises(ConfigError, match="first_target"):
        FAB(model, L2(0.1), targeted=True, first_target=-1)


@pytest.mark.parametrize("kwargs,argument", [
    ({"eta": 0.9}, "eta"), ({"beta": 1.5}, "beta"), ({"beta": 0}, "beta"), ({"alpha_max": 2}, "alpha_max"),
    ({"steps": 0}, "steps"), ({"restarts": 0}, "restarts"), ({"n_target_classes": 0}, "n_target_classes"),
    ({"loss": "ce"}, "loss"), ({"target_policy": "random"}, "target_policy"),
])
def test_fab_bad_arguments_raise_one_line_config_errors(kwargs, argument):
    with pytest.raises(ConfigError, match=f"^{argument}:") as caught:
        FAB(nn.Linear(4, 3), Linf(eps=0.1), **kwargs)
    assert "\n" not in str(caught.value)


def test_fab_t_refuses_given_targets():
    model = nn.Linear(4, 3)
    with pytest.raises(Exception, match="^target:"):
        FAB(model, Linf(eps=0.1), targeted=True).run(torch.rand(2, 4), torch.tensor([0, 1]),
                                                     target=torch.tensor([1, 2]))
