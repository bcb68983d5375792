"""Threat-model geometry: projection, random start, steps, distance, contains."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard import L1, L2, ConfigError, Linf, make_threat
from gradguard.threat import _project_l1_ball, threat_from_dict

NORMS = [Linf, L2, L1]


def _batch(seed: int, shape=(4, 1, 5, 5)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", NORMS)
@settings(max_examples=25, deadline=None)
@given(eps=st.floats(0.0, 3.0), seed=st.integers(0, 10_000), scale=st.floats(0.01, 10.0))
def test_project_lands_in_ball_and_box(kind, eps, seed, scale):
    threat = kind(eps=eps, check_eps=False)  # the geometry holds for any radius, also one past the box
    x = _batch(seed)
    wild = x + scale * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    projected = threat.project(wild, x)
    assert bool(threat.contains(projected, x).all())
    # Projection is idempotent: a point already inside does not move.
    assert torch.allclose(threat.project(projected, x), projected, atol=1e-6)


@pytest.mark.parametrize("kind", NORMS)
@settings(max_examples=20, deadline=None)
@given(eps=st.floats(0.0, 2.0), seed=st.integers(0, 10_000))
def test_random_start_inside_ball_and_box(kind, eps, seed):
    threat = kind(eps=eps, check_eps=False)
    x = _batch(seed)
    start = threat.random_start(x, torch.Generator().manual_seed(seed))
    assert bool(threat.contains(start, x).all())


def test_random_start_is_seeded():
    x = _batch(0)
    a = L2(eps=1.0).random_start(x, torch.Generator().manual_seed(3))
    b = L2(eps=1.0).random_start(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_linf_random_start_fills_the_ball():
    x = torch.full((2000, 8), 0.5)
    delta = Linf(eps=0.1).random_start(x, torch.Generator().manual_seed(0)) - x
    assert delta.abs().max() <= 0.1 + 1e-7
    assert delta.abs().max() > 0.099  # reaches the faces
    assert abs(float(delta.mean())) < 2e-3  # centred


@pytest.mark.parametrize("kind,expected", [(Linf, 1.0), (L2, 1.0), (L1, 1.0)])
def test_ascent_step_has_the_requested_length(kind, expected):
    threat = kind(eps=1.0, check_eps=False)
    grad = torch.randn(6, 3, 4, 4)
    step = threat.ascent_step(grad, 0.5)
    norms = threat.distance(step, torch.zeros_like(step))
    assert torch.allclose(norms, torch.full((6,), 0.5 * expected), atol=1e-5)
    # and it ascends: positive inner product with the gradient
    assert bool(((step * grad).flatten(1).sum(1) > 0).all())


def test_l1_step_is_sparse_and_skips_pinned_coordinates():
    threat = L1(eps=1.0, sparsity=0.1)
    grad = torch.zeros(1, 100)
    grad[0, 0] = 10.0  # largest, but the point is pinned at the upper bound: cannot move
    grad[0, 1:11] = torch.arange(1.0, 11.0)
    x_adv = torch.full((1, 100), 0.5)
    x_adv[0, 0] = 1.0
    step = threat.ascent_step(grad, 1.0, x_adv)
    assert step[0, 0] == 0
    assert int((step != 0).sum()) == 10
    assert math.isclose(float(step.abs().sum()), 1.0, rel_tol=1e-5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), radius=st.floats(0.01, 5.0))
def test_l1_projection_is_the_euclidean_projection(seed, radius):
    v = torch.randn(3, 20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    p = _project_l1_ball(v, radius)
    assert bool((p.abs().sum(1) <= radius + 1e-9).all())
    # KKT: inside points are untouched; outside points are soft-thresholded onto the sphere.
    for row_v, row_p in zip(v, p, strict=False):
        if row_v.abs().sum() <= radius:
            assert torch.equal(row_v, row_p)
        else:
            assert math.isclose(float(row_p.abs().sum()), radius, rel_tol=1e-9)
            theta = (row_v.abs() - row_p.abs())[row_p != 0]
            assert torch.allclose(theta, theta[0].expand_as(theta), atol=1e-9)
            assert bool((row_v.abs()[row_p == 0] <= theta[0] + 1e-9).all())


def test_distance_per_norm():
    x = torch.zeros(1, 4)
    x_adv = torch.tensor([[0.3, -0.4, 0.0, 0.0]])
    assert math.isclose(float(Linf(eps=0.1).distance(x_adv, x)), 0.4, rel_tol=1e-6)
    assert math.isclose(float(L2(eps=1).distance(x_adv, x)), 0.5, rel_tol=1e-6)
    assert math.isclose(float(L1(eps=1).distance(x_adv, x)), 0.7, rel_tol=1e-6)


def test_contains_rejects_points_outside_ball_or_box():
    threat = Linf(eps=0.1)
    x = torch.full((3, 2), 0.5)
    candidates = torch.tensor([[0.55, 0.45], [0.7, 0.5], [0.5, 0.5]])
    assert threat.contains(candidates, x).tolist() == [True, False, True]
    assert not bool(Linf(eps=0.3).contains(torch.tensor([[1.2, 0.5]]), torch.tensor([[0.9, 0.5]])))


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf"), "abc"])
def test_bad_eps_raises_config_error_naming_eps(eps):
    with pytest.raises(ConfigError, match="eps"):
        Linf(eps=eps)


@pytest.mark.parametrize("bounds", [(1, 0), (0, float("inf")), (0,), "x"])
def test_bad_bounds_raise_config_error_naming_bounds(bounds):
    with pytest.raises(ConfigError, match="bounds"):
        L2(eps=0.1, bounds=bounds)


def test_threat_round_trips_through_dict():
    for threat in (Linf(eps=0.1), L2(eps=1.5, bounds=(-1, 1)), L1(eps=3.0), L1(eps=2.0, sparsity=0.2)):
        assert threat_from_dict(threat.to_dict()) == threat
    assert make_threat("l2", 0.5) == L2(eps=0.5)
    with pytest.raises(ConfigError, match="norm"):
        make_threat("l7", 0.5)


# ------------------------------------------------------------------------------------------------
# The eps check: a ball that holds the whole box is a units mistake
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps,intent", [(8, "did you mean 8/255 = 0.0314?"), (2, "did you mean 2/255 = 0.00784?"),
                                        (1.0, "did you mean 1/255")])
def test_linf_eps_that_covers_the_box_is_refused_naming_the_likely_intent(eps, intent):
    with pytest.raises(ConfigError, match="eps: ") as refused:
        Linf(eps=eps)
    message = str(refused.value)
    assert intent in message and "width of the box [0, 1]" in message and "\n" not in message
    with pytest.raises(ConfigError, match="eps: "):
        make_threat("linf", eps)  # the spelling the command line takes
    with pytest.raises(ConfigError, match="eps: "):
        Linf(eps=0.1).with_eps(eps)  # a curve's or a schedule's eps too


def test_linf_eps_is_measured_against_the_box_width():
    with pytest.raises(ConfigError, match=r"did you mean 8/255 of the box width = 0\.0627\?"):
        Linf(eps=8, bounds=(-1, 1))
    with pytest.raises(ConfigError, match="units of the bounds"):  # not a pixel level either: no guess
        Linf(eps=300)
    assert Linf(eps=8, bounds=(0, 255)).eps == 8  # pixel levels on a [0, 255] box are fine


def test_large_linf_eps_warns_and_customary_budgets_do_not():
    from gradguard.threat import LargeEpsWarning

    with pytest.warns(LargeEpsWarning, match=r"eps: 0\.5 is more than 0\.3 x the width of the box \[0, 1\]"):
        Linf(eps=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for eps in (0.0, 8 / 255, 0.1, 0.3):  # 0.3: MNIST's customary budget, the largest in common use
            assert Linf(eps=eps).eps == eps
        L2(eps=0.5).check_against(torch.rand(2, 3, 32, 32))
        L1(eps=12.0).check_against(torch.rand(2, 3, 32, 32))


def test_l2_and_l1_eps_past_the_boxs_diameter_are_refused_on_the_first_input():
    x = torch.rand(2, 1, 4, 4)  # 16 values: L2 diameter 4, L1 diameter 16
    l2 = L2(eps=4.0)  # built: the input size is not known yet
    with pytest.raises(ConfigError, match=r"L2 diameter of the box \[0, 1\] for inputs of 16 values \(4\)"):
        l2.check_against(x)
    with pytest.raises(ConfigError, match=r"did you mean 20/255 = 0\.0784\?"):
        L1(eps=20.0).check_against(x)
    from gradguard.threat import LargeEpsWarning

    with pytest.warns(LargeEpsWarning, match="L2 diameter"):
        L2(eps=2.0).check_against(x)
    L2(eps=1.0).check_against(x)


def test_every_attack_and_evaluation_checks_the_eps_against_its_inputs():
    from gradguard import evaluate
    from gradguard.attacks import PGD

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ConfigError, match="L2 diameter"):
        PGD(model, L2(eps=5.0), steps=2).run(x, y)
    with pytest.raises(ConfigError, match="L1 diameter"):
        evaluate(model, (x, y), L1(eps=16.0), ["fgsm"])
    assert PGD(model, L2(eps=0.5), steps=2).run(x, y).x_adv.shape == x.shape  # valid usage still works


def test_check_eps_false_allows_a_deliberate_whole_box_ball():
    threat = Linf(eps=1.0, check_eps=False)
    threat.check_against(torch.rand(2, 5))
    L2(eps=100.0, check_eps=False).check_against(torch.rand(2, 5))
    assert threat == Linf(eps=1.0, check_eps=False) and threat_from_dict(threat.to_dict()).check_eps is False
    assert Linf(eps=0.1).to_dict() == {"norm": "linf", "eps": 0.1, "bounds": [0.0, 1.0]}  # as before
    assert Linf(eps=0.1).with_eps(2.0, check_eps=False).eps == 2.0


def test_an_eps_warmup_warns_once_not_at_every_step_of_its_ramp():
    from gradguard.threat import LargeEpsWarning
    from gradguard.train import Trainer

    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Trainer(model, "fgsm", threat=Linf(eps=0.5), epochs=2, batch_size=8, eps_warmup_epochs=1, progress=False,
                val_attack=None).fit((x, y))
    assert sum(issubclass(w.category, LargeEpsWarning) for w in seen) == 1  # the full eps, when it was built
    with pytest.raises(ConfigError, match="L2 diameter"):  # and the full eps is checked against the data
        Trainer(model, "fgsm", threat=L2(eps=8.0), epochs=1, eps_warmup_epochs=1, progress=False).fit((x, y))


def test_check_threat_refuses_anything_but_a_threat_model():
    """One check for evaluate, evaluate_curve and the masking checklist (it lived privately in evaluation)."""
    from gradguard import InputError
    from gradguard.threat import check_threat

    check_threat(L2(eps=0.5))
    with pytest.raises(InputError, match=r"^threat: expected a ThreatModel such as Linf\(eps=0.1\) or L2\(eps=1.0\), "
                                         r"got float$"):
        check_threat(0.1)
