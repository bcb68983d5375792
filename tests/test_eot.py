"""EOT (expectation over transformation) and majority-vote success on randomised models, against closed forms."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor, nn

from gradguard import Linf
from gradguard.attacks import APGD, PGD, input_gradient
from gradguard.attacks.losses import resolve_objective
from gradguard.errors import ConfigError
from gradguard.evaluation import evaluate, get_suite


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds synchronisation (and waits on a busy CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class NoisyLinear(nn.Module):
    """logits = W (x + sigma·n), n ~ N(0, I) drawn afresh in every forward pass (also in eval mode)."""

    def __init__(self, weight: Tensor, sigma: float) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.linear.weight.data.copy_(weight)
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x + self.sigma * torch.randn_like(x))


def half_square_norm(logits: Tensor, labels: Tensor) -> Tensor:
    return 0.5 * (logits ** 2).sum(1)


def test_eot_gradient_converges_to_the_expected_gradient_as_one_over_sqrt_k():
    # objective ½‖W(x + σn)‖²: its gradient WᵀW(x + σn) has the expectation WᵀWx; the k-sample mean errs by
    # σ‖WᵀW n̄‖ with n̄ ~ N(0, I/k), i.e. ∝ 1/√k.
    torch.manual_seed(0)
    weight = torch.randn(5, 8) / math.sqrt(8)
    model = NoisyLinear(weight, sigma=1.0)
    x, y = torch.rand(400, 8), torch.zeros(400, dtype=torch.long)
    expected = x @ weight.T @ weight
    objective = resolve_objective(half_square_norm)
    errors = {}
    for k in (1, 4, 16, 64, 256):
        torch.manual_seed(k)
        grad, _, _ = input_gradient(model, x, y, objective, False, eot_samples=k)
        errors[k] = float((grad - expected).norm(dim=1).mean())
    for k in (4, 16, 64, 256):
        assert errors[k] * math.sqrt(k) == pytest.approx(errors[1], rel=0.15), errors


def test_eot_budget_counts_every_draw_and_shows_in_repr():
    torch.manual_seed(0)
    model = NoisyLinear(torch.randn(3, 4), sigma=0.1)
    x, y = torch.rand(6, 4), torch.zeros(6, dtype=torch.long)
    attack = PGD(model, Linf(eps=1e-3), steps=3, eot_samples=5, early_stop=False, seed=0)
    result = attack.run(x, y)
    assert result.n_grad == 6 * 3 * 5
    assert "eot_samples=5" in repr(attack) and "success_votes" not in repr(attack)
    with pytest.raises(ConfigError, match="eot_samples"):
        PGD(model, Linf(eps=0.1), eot_samples=0)
    with pytest.raises(ConfigError, match="success_votes"):
        PGD(model, Linf(eps=0.1), success_votes=1.5)


class ShatteredRandomLogits(nn.Module):
    """A linear classifier plus a small random-sign term of huge slope: a ± a·sin(ω·Ux) per class, sign redrawn in
    every pass. Its value stays within ±a, but one pass's input gradient is dominated by ±aω·U — a random
    direction — so single-sample PGD walks at random; the expectation of that term is zero, so EOT recovers W."""

    weight: Tensor  # buffers
    mixing: Tensor

    def __init__(self, dim: int = 20, classes: int = 4, a: float = 0.05, omega: float = 150.0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("weight", torch.randn(classes, dim, generator=generator))
        self.register_buffer("mixing", torch.randn(classes, dim, generator=generator))
        self.a, self.omega = a, omega

    def forward(self, x: Tensor) -> Tensor:
        signs = torch.randint(0, 2, (x.shape[0], self.weight.shape[0]), device=x.device) * 2 - 1
        return x @ self.weight.T + self.a * signs * torch.sin(self.omega * (x @ self.mixing.T))


def test_eot_pgd_breaks_a_randomised_defence_that_fools_single_sample_pgd():
    torch.manual_seed(0)
    model = ShatteredRandomLogits()
    x = torch.rand(64, 20)
    with torch.no_grad():
        y = (x @ model.weight.T).argmax(1)  # the deterministic part is right everywhere: clean accuracy ~100 %
    threat = Linf(eps=0.4)
    plain = PGD(model, threat, steps=20, success_votes=7, seed=0).run(x, y)
    eot = PGD(model, threat, steps=20, eot_samples=40, success_votes=7, seed=0).run(x, y)
    undefended = PGD(lambda_module(lambda v: v @ model.weight.T), threat, steps=20, seed=0).run(x, y)
    assert undefended.success.float().mean() > 0.8  # eps is large enough to break the classifier itself
    assert plain.success.float().mean() < 0.5 * undefended.success.float().mean()
    assert eot.success.float().mean() >= undefended.success.float().mean() - 0.1


class lambda_module(nn.Module):  # noqa: N801 — a tiny helper used like a function
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class Flaky(nn.Module):
    """A fixed linear classifier whose prediction moves to another class in 30 % of the passes, per sample."""

    weight: Tensor  # a buffer

    def __init__(self, weight: Tensor, flip: float = 0.3) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.flip = flip

    def forward(self, x: Tensor) -> Tensor:
        logits = x @ self.weight.T
        flipped = torch.rand(x.shape[0], 1, device=x.device) < self.flip
        return torch.where(flipped, logits.roll(1, dims=1), logits)


def test_success_is_judged_by_the_majority_of_the_votes():
    torch.manual_seed(0)
    model = Flaky(torch.randn(3, 10))
    x = torch.rand(300, 10)
    with torch.no_grad():
        y = (x @ model.weight.T).argmax(1)
    threat = Linf(eps=1e-4)  # far too small to move any prediction: nothing is really broken
    single = APGD(model, threat, steps=2, seed=0).run(x, y)
    voted = APGD(model, threat, steps=2, seed=0, success_votes=15).run(x, y)
    # one pass per judgement: the 30 % flips count as successes (more than 30 %: several chances per sample)
    assert single.success.float().mean() > 0.3
    # majority of 15 passes: a 30 % flip wins the vote with probability P(Bin(15, 0.3) >= 8) = 5 %
    assert voted.success.float().mean() < 0.1
    assert voted.success_votes == 15 and "success_votes=15" in repr(APGD(model, threat, success_votes=15))
    assert torch.equal(voted.correct, ~voted.success)  # the reported logits agree with the verdict
    # the other way round: points that really are misclassified stay broken under the vote
    wrong = (y + 1) % 3
    flipped_labels = APGD(model, threat, steps=2, seed=0, success_votes=15).run(x, wrong)
    assert flipped_labels.success.float().mean() > 0.9


def test_rand_suite_is_apgd_ce_and_dlr_with_eot_20_and_votes():
    suite = get_suite("rand")
    assert [s["name"] for s in suite] == ["apgd-ce", "apgd-dlr"]
    assert all(s["eot_samples"] == 20 and s["success_votes"] % 2 == 1 for s in suite)


def test_evaluate_on_a_randomised_model_points_at_the_rand_suite():
    torch.manual_seed(0)
    model = Flaky(torch.randn(3, 10), flip=0.3)
    x = torch.rand(40, 10)
    with torch.no_grad():
        y = (x @ model.weight.T).argmax(1)
    with pytest.warns(UserWarning, match="suite='rand'"):
        report = evaluate(model, (x, y), Linf(eps=1e-4), suite="quick")
    assert any("suite='rand'" in w for w in report.warnings)
    assert "suite='rand'" in report.summary()
    deterministic = evaluate(lambda_module(lambda v: v @ model.weight.T), (x, y), Linf(eps=1e-4), suite="quick")
    assert deterministic.warnings == []


def test_the_html_report_shows_the_randomness_warning(tmp_path):
    from gradguard.report import build_report

    torch.manual_seed(0)
    model = Flaky(torch.randn(3, 10))
    x = torch.rand(20, 10)
    with torch.no_grad():
        y = (x @ model.weight.T).argmax(1)
    with pytest.warns(UserWarning):
        report = evaluate(model, (x, y), Linf(eps=1e-4), suite="quick")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"label": "flaky", "dataset": "digits", "method": "standard",
                                              "threat": {"norm": "linf", "eps": 1e-4}}))
    report.to_json(run / "robustness.json")
    html = build_report(run).read_text()
    assert "Warning:</b> the model is randomised" in html and "suite=&#x27;rand&#x27;" in html


def test_evaluate_rescores_each_attack_by_its_votes():
    torch.manual_seed(0)
    model = Flaky(torch.randn(3, 10))
    x = torch.rand(200, 10)
    with torch.no_grad():
        y = (x @ model.weight.T).argmax(1)
    threat = Linf(eps=1e-4)  # nothing can really be broken
    voted = evaluate(model, (x, y), threat, suite=[{"name": "apgd-ce", "steps": 2, "success_votes": 15}])
    single = evaluate(model, (x, y), threat, suite=[{"name": "apgd-ce", "steps": 2}])
    assert voted.robust_accuracy > 0.9 * voted.clean_accuracy  # the flips lose the vote
    assert single.robust_accuracy < 0.8 * single.clean_accuracy  # one draw counts a flip as a break
    assert voted.warnings == []  # a list of specs is the user's own protocol: no advice
