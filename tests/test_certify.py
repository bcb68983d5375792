"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019) against what cannot be fooled: closed forms.

For a linear binary classifier f(x) = [w·x + b > 0], the score under noise is w·(x + δ) + b ~ N(m, σ²‖w‖²) with
m = w·x + b, so the smoothed classifier predicts sign(m) with p_A = Φ(|m| / (σ‖w‖)), and its exact certified
radius σ·Φ⁻¹(p_A) = |m| / ‖w‖ is the distance to the hyperplane. Every test uses fixed seeds, so none can flake;
the statistical ones are sized so that a correct implementation passes with overwhelming probability for any seed.
"""
from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from torch import nn

import gradguard
from gradguard.errors import ConfigError
from gradguard.evaluation.certify import (
    ABSTAIN,
    CertifyResult,
    binomial_two_sided_p_half,
    certified_radius,
    clopper_pearson_lower,
    normal_quantile,
    predict,
)

PHI = statistics.NormalDist()


class LinearBinary(nn.Module):
    """Logits (0, w·x + b): class 1 exactly when w·x + b > 0. Records the largest batch it was given."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.linear = nn.Linear(w.numel(), 1)
        with torch.no_grad():
            self.linear.weight.copy_(w.reshape(1, -1))
            self.linear.bias.fill_(b)
        self.largest_batch = 0
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.largest_batch = max(self.largest_batch, x.shape[0])
        self.rows += x.shape[0]
        score = self.linear(x.reshape(x.shape[0], -1))
        return torch.cat([torch.zeros_like(score), score], dim=1)


W = torch.tensor([3.0, -4.0])  # ‖w‖ = 5
SIGMA = 0.5


def points_with_p(p_values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose smoothed top-class probability is exactly p (signed: p < 0 puts the point on class 0's side)."""
    unit = W / W.norm()
    margins = [math.copysign(SIGMA * float(W.norm()) * PHI.inv_cdf(abs(p)), p) for p in p_values]
    x = torch.stack([unit * m / float(W.norm()) for m in margins])  # w·x = m, b = 0
    y = torch.tensor([1 if p > 0 else 0 for p in p_values])
    return x, y


# ------------------------------------------------------------------------------------------------ statistics
def test_clopper_pearson_matches_its_closed_forms():
    for n, alpha in ((10, 0.05), (1000, 0.001), (100_000, 0.001)):
        assert clopper_pearson_lower(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-9)  # all successes
        assert clopper_pearson_lower(1, n, alpha) == pytest.approx(1 - (1 - alpha) ** (1 / n), rel=1e-6)
        assert clopper_pearson_lower(0, n, alpha) == 0.0
    # a textbook value: 7 of 10 at 95 % one-sided is 0.3933 (the lower end of the 90 % two-sided interval)
    assert clopper_pearson_lower(7, 10, 0.05) == pytest.approx(0.39338, abs=1e-4)


def test_normal_quantile_radius_and_binomial_test():
    assert normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)
    assert certified_radius(0.975, 0.5) == pytest.approx(0.979982, abs=1e-6)
    assert certified_radius(0.5, 0.5) == 0.0 and certified_radius(0.3, 0.5) == 0.0
    assert binomial_two_sided_p_half(5, 10) == pytest.approx(1.0)
    assert binomial_two_sided_p_half(10, 10) == pytest.approx(2 * 0.5 ** 10)
    assert binomial_two_sided_p_half(0, 10) == pytest.approx(2 * 0.5 ** 10)


# ------------------------------------------------------------------------------------------------ closed form
def test_linear_classifier_prediction_bound_and_radius_agree_with_the_closed_form():
    p_true = [0.6, 0.8, 0.95, 0.999, -0.9]
    x, y = points_with_p(p_true)
    model = LinearBinary(W, 0.0)
    n, alpha = 20_000, 0.001
    result = gradguard.certify(model, (x, y), SIGMA, n0=100, n=n, alpha=alpha, batch_size=4096, seed=0)
    assert result.prediction.tolist() == y.tolist()  # sign of the margin, no abstention
    for i, p in enumerate(abs(q) for q in p_true):
        lower = float(result.p_lower[i])
        assert lower == pytest.approx(clopper_pearson_lower(int(result.top_count[i]), n, alpha), rel=1e-12)
        assert lower <= p < lower + 8 * math.sqrt(p * (1 - p) / n) + 5e-4  # brackets p, and tight (3.1 sd + noise)
        assert float(result.radius[i]) == pytest.approx(SIGMA * PHI.inv_cdf(lower), rel=1e-9)
        distance = SIGMA * PHI.inv_cdf(p)  # the exact radius: distance to the hyperplane
        assert float(x[i] @ W).__abs__() / float(W.norm()) == pytest.approx(distance, rel=1e-5)
        assert float(result.radius[i]) <= distance
    assert result.correct.all() and result.certified_accuracy(0.0) == 1.0
    radii = sorted(result.radius.tolist())
    assert result.certified_accuracy(radii[2]) == pytest.approx(3 / 5)  # radius >= r, so the sample at r counts
    assert result.curve([0.0, 10.0]) == {"radius": [0.0, 10.0], "certified_accuracy": [1.0, 0.0]}


def test_point_on_the_decision_boundary_abstains_at_least_as_often_as_alpha_says():
    """p_A = 1/2 exactly: a certificate would be wrong, so it may be issued in at most a fraction alpha of runs.

    300 independent runs (one seeded generator per sample): the count of certificates is Binomial(300, q) with
    q <= alpha = 0.05; P(count > 35) < 2e-6 under q = 0.05, so a correct CERTIFY does not fail this (9 with seed 0).
    """
    x = torch.zeros(300, 2)
    y = torch.ones(300, dtype=torch.int64)
    result = gradguard.certify(LinearBinary(W, 0.0), (x, y), SIGMA, n0=20, n=200, alpha=0.05, batch_size=256)
    certified = int((result.prediction != ABSTAIN).sum())
    assert certified <= 35
    assert float(result.radius[result.prediction == ABSTAIN].abs().sum()) == 0.0
    assert result.abstain_rate == pytest.approx(1 - certified / 300)


def test_lower_bound_exceeds_the_true_probability_in_at_most_alpha_of_runs():
    """Coverage of the Clopper–Pearson bound over 400 independent runs at p_A = 0.7, alpha = 0.1: the number of
    runs whose bound lies above 0.7 is at most Binomial(400, 0.1); P(count > 62) < 3e-4 (25 with seed 0)."""
    x, y = points_with_p([0.7] * 400)
    result = gradguard.certify(LinearBinary(W, 0.0), (x, y), SIGMA, n0=10, n=100, alpha=0.1, batch_size=128)
    too_high = int((result.p_lower > 0.7).sum())
    assert too_high <= 62
    distance = SIGMA * PHI.inv_cdf(0.7)
    assert int((result.radius > distance).sum()) == too_high  # the radius is wrong exactly when the bound is


# ------------------------------------------------------------------------------------------------ streaming
def test_noise_is_streamed_in_batches_and_never_clamped():
    x, y = points_with_p([0.9, 0.9])
    model = LinearBinary(W, 0.0)
    result = gradguard.certify(model, (x, y), SIGMA, n0=50, n=5000, batch_size=333, seed=1)
    assert model.largest_batch == 333
    assert model.rows == 2 + 2 * (50 + 5000)  # one clean forward of the block, then n0 + n draws per sample
    assert result.n == 5000 and int(result.top_count.max()) <= 5000

    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(x.shape[0], 2)

    gradguard.certify(Spy(), (torch.full((1, 1, 4, 4), 0.5), torch.tensor([0])), 1.0, n0=10, n=500, seed=0)
    noisy = torch.cat(seen[1:])
    assert noisy.min() < 0 and noisy.max() > 1  # the paper's unclamped Gaussian
    assert float((noisy - 0.5).std()) == pytest.approx(1.0, abs=0.05)


def test_same_seed_same_result_and_model_left_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 10))
    model.train()
    model[1].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    data = gradguard.open_split("digits")  # a streamed SampleSet, as evaluate takes
    first = gradguard.certify(model, data, 0.25, n0=20, n=300, batch_size=128, seed=7, max_samples=3)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    again = gradguard.certify(model, data, 0.25, n0=20, n=300, batch_size=128, seed=7, max_samples=2)
    # equal votes: a sample's noise depends on its index only, and Dropout was off (eval mode) while certifying
    assert again.top_count.tolist() == first.top_count[:2].tolist()
    restored = CertifyResult.from_dict(json.loads(first.to_json()))
    assert restored.prediction.tolist() == first.prediction.tolist()
    assert restored.certified_accuracy(0.25) == first.certified_accuracy(0.25)


def test_predict_returns_the_class_far_from_the_boundary_and_abstains_on_it():
    x = torch.cat([points_with_p([0.99, -0.99])[0], torch.zeros(1, 2)])
    predictions = predict(LinearBinary(W, 0.0), x, SIGMA, n=2000, alpha=0.001)
    assert predictions.tolist() == [1, 0, ABSTAIN]


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("settings, argument", [
    ({"sigma": 0.0}, "sigma"), ({"sigma": -0.25}, "sigma"), ({"sigma": float("nan")}, "sigma"),
    ({"n0": 200, "n": 100}, "n0"), ({"n0": 0}, "n0"), ({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"),
    ({"alpha": 1.5}, "alpha"), ({"batch_size": 0}, "batch_size"),
])
def test_bad_arguments_get_one_clear_line(settings, argument):
    arguments = {"sigma": 0.25, "n0": 10, "n": 100, **settings}
    sigma = arguments.pop("sigma")
    model = LinearBinary(W, 0.0)
    with pytest.raises(ConfigError) as error:
        gradguard.certify(model, (torch.zeros(1, 2), torch.tensor([1])), sigma, **arguments)
    message = str(error.value)
    assert message.startswith(f"{argument}:") and "\n" not in message
    assert model.rows == 0  # refused before any forward pass


# ------------------------------------------------------------------------------------------------ training
def test_gaussian_method_trains_on_unclamped_noisy_inputs():
    from gradguard.train import METHODS, get_method

    assert "gaussian" in METHODS
    method = get_method("gaussian", sigma=0.5)
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(16, 3)

        def forward(self, x):
            seen.append(x)
            return self.linear(x.flatten(1))

    model = Spy()
    x = torch.full((256, 1, 4, 4), 0.5)
    output = method.compute(model, model, x, torch.zeros(256, dtype=torch.int64), None)
    assert output.loss.requires_grad and output.logits_adv is not None
    assert float((seen[0] - x).std()) == pytest.approx(0.5, abs=0.02) and seen[0].min() < 0
    assert method.config() == {"name": "gaussian", "sigma": 0.5}
    with pytest.raises(ConfigError, match="sigma"):
        get_method("gaussian", sigma=0)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_train_gaussian_certify_and_report(tmp_path, capsys):
    from gradguard.cli import main

    run = tmp_path / "noise"
    assert main(["train", "--out", str(run), "--method", "gaussian", "--method-arg", "sigma=0.25", "--epochs", "1",
                 "--train-samples", "100", "--samples", "16", "--batch-size", "50"]) == 0
    capsys.readouterr()
    code = main(["certify", str(run), "--n", "400", "--n0", "20", "--samples", "6", "--batch-size", "256", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((run / "certify.json").read_text())
    assert printed["sigma"] == stored["sigma"] == 0.25  # from the run's training config
    assert stored["n_samples"] == 6 and stored["n"] == 400 and len(stored["samples"]["radius"]) == 6
    assert "smoothed classifier" in stored["guarantee"] and (run / "certify.png").stat().st_size > 0

    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert '<table id="certified">' in html and "not for the base model" in html
    summary = json.loads((run / "summary.json").read_text())
    assert summary["certified"][0]["smoothed_accuracy"] == stored["smoothed_accuracy"]

    capsys.readouterr()
    assert main(["certify", str(run), "--sigma", "0.25", "--alpha", "2", "--n", "1000"]) != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "alpha" in lines[0] and "Traceback" not in lines[0]
    assert json.loads((run / "certify.json").read_text()) == stored  # a refused run leaves the old result


def test_certify_help_has_examples(capsys):
    from gradguard.cli import main

    with pytest.raises(SystemExit):
        main(["certify", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "gradguard certify" in text and "--sigma" in text
