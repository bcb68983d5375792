"""The gradient-masking checklist: masked models FAIL, an honest model PASSes, every check carries evidence."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gradguard import L2, Linf
from gradguard.diagnostics import Check, MaskingReport, check_masking
from gradguard.errors import ConfigError, InputError

N_SAMPLES = 120


class Rounding(nn.Module):
    """Quantises the input: x -> round(k·x)/k. Its gradient is zero almost everywhere (shattered gradients)."""

    def __init__(self, levels: int = 4):
        super().__init__()
        self.levels = levels

    def forward(self, x):
        return torch.round(x * self.levels) / self.levels


class ScaledLogits(nn.Module):
    """Multiplies the logits by 1e4: the softmax saturates and the cross-entropy gradient underflows to zero."""

    def __init__(self, base: nn.Module, scale: float = 1e4):
        super().__init__()
        self.base, self.scale = base, scale

    def forward(self, x):
        return self.base(x) * self.scale


class AlwaysDropout(nn.Module):
    """Dropout that ignores eval mode: a randomised model."""

    def forward(self, x):
        return nn.functional.dropout(x, 0.3, training=True)


def square_available() -> bool:
    try:
        from gradguard.attacks.square import Square  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def test_data(digits):
    return digits.x_test, digits.y_test


@pytest.fixture(scope="module")
def honest_report(digits_mlp, test_data):
    return check_masking(digits_mlp, test_data, Linf(eps=0.1), n_samples=N_SAMPLES, seed=0, square_queries=300)


def test_honest_mlp_passes_every_check(honest_report):
    statuses = {c.name: c.status for c in honest_report.checks}
    expected_black_box = "PASS" if square_available() else "WARN"  # WARN only while Square is not installed
    assert statuses.pop("black_box_not_stronger") == expected_black_box
    assert set(statuses.values()) == {"PASS"}, honest_report.summary()
    assert honest_report.verdict in ("PASS", "WARN")
    if square_available():
        assert honest_report.verdict == "PASS"


def test_honest_mlp_evidence_holds_the_measured_numbers(honest_report):
    sweep = honest_report.check("accuracy_decreases_with_eps").evidence
    assert sweep["pgd_accuracy"] == sorted(sweep["pgd_accuracy"], reverse=True)
    assert sweep["pgd_accuracy"][-1] <= 0.05  # at 4·eps the honest model is broken
    iterative = honest_report.check("iterative_beats_single_step").evidence
    assert iterative["pgd_accuracy"] <= iterative["fgsm_accuracy"]
    assert honest_report.check("unbounded_attack_succeeds").evidence["pgd_accuracy"] == 0.0
    assert honest_report.check("gradients_nonzero").evidence["fraction_zero_or_nonfinite"] == 0.0
    assert honest_report.settings["n_correct"] <= honest_report.n_samples == N_SAMPLES


def fgsm_trained_mlp(digits, eps: float = 0.3) -> nn.Module:
    """A digits MLP adversarially trained with plain FGSM (no random start): its PGD-20 number is weak, although
    its gradients work (APGD-CE goes much lower) — the issue's fast-FGSM Fashion-MNIST case in miniature."""
    torch.manual_seed(4)  # 10 of 12 seeds × eps in {0.25, 0.3} show the pattern, none is "masked"; this one by most
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        order = torch.randperm(len(digits.y_train))
        for start in range(0, len(order), 128):
            xb, yb = digits.x_train[order[start:start + 128]], digits.y_train[order[start:start + 128]]
            x_leaf = xb.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(x_leaf), yb), x_leaf)
            x_adv = (xb + eps * grad.sign()).clamp(0, 1)
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x_adv), yb).backward()
            optimiser.step()
    return model.eval()


@pytest.mark.skipif(not square_available(), reason="needs the Square attack")
def test_black_box_beating_only_pgd20_is_a_weak_white_box_attack_not_masking(digits, test_data):
    report = check_masking(fgsm_trained_mlp(digits), test_data, Linf(eps=0.3), n_samples=300, seed=0,
                           square_queries=300)
    check = report.check("black_box_not_stronger")
    evidence = check.evidence
    assert evidence["pgd_accuracy"] - evidence["square_accuracy"] > 0.05  # the old PGD-only rule said FAIL here
    assert evidence["apgd_accuracy"] <= evidence["square_accuracy"] + 0.02  # APGD-CE: the gradients work
    assert (check.status, evidence["verdict"]) == ("WARN", "weak white-box")
    assert "not masking" in check.advice and "APGD-CE" in check.advice and "more steps" in check.advice
    assert report.check("gradients_nonzero").status == report.check("loss_rises_along_path").status == "PASS"
    assert report.verdict != "FAIL", report.summary()


def test_rounding_input_layer_fails(digits_mlp, test_data):
    masked = nn.Sequential(Rounding(4), digits_mlp)
    report = check_masking(masked, test_data, Linf(eps=0.1), n_samples=N_SAMPLES, seed=0, square_queries=100)
    assert report.verdict == "FAIL"
    assert report.check("gradients_nonzero").status == "FAIL"
    assert report.check("gradients_nonzero").evidence["fraction_zero_or_nonfinite"] == 1.0
    assert report.check("loss_rises_along_path").status == "FAIL"
    noise = report.check("random_noise_not_stronger")  # vs the strongest white-box attack: PGD-40 with 2 restarts,
    assert noise.status != "PASS" and noise.evidence["verdict"] == "masked"  # whose random starts break a few too


def test_shattered_gradients_are_masking_and_every_fail_names_bpda(digits_mlp, test_data):
    report = check_masking(nn.Sequential(Rounding(8), digits_mlp), test_data, Linf(eps=0.1), n_samples=80, seed=0,
                           square_queries=100, noise_draws=10)
    gradients = report.check("gradients_nonzero")
    assert gradients.evidence["kind"] == "shattered" and gradients.evidence["fraction_zero_margin_gradient"] == 1.0
    fails = [c for c in report.checks if c.status == "FAIL"]
    assert {"gradients_nonzero", "loss_rises_along_path"} <= {c.name for c in fails}
    assert all("BPDA" in c.advice for c in fails), report.summary()
    if square_available():
        black_box = report.check("black_box_not_stronger")
        assert (black_box.status, black_box.evidence["verdict"]) == ("FAIL", "masked")
        assert black_box.advice.startswith("masked gradients") and "APGD-CE included" in black_box.advice


def test_saturated_softmax_fails_under_l2(digits_mlp, test_data):
    report = check_masking(ScaledLogits(digits_mlp), test_data, L2(eps=1.0), n_samples=N_SAMPLES, seed=0,
                           square_queries=100)
    assert report.verdict == "FAIL"
    assert report.check("gradients_nonzero").status == "FAIL"
    assert report.check("unbounded_attack_succeeds").status == "FAIL"
    assert report.check("unbounded_attack_succeeds").evidence["pgd_accuracy"] > 0.1
    if square_available():  # Square's margin loss ignores the logit scale: the black-box attack wins
        assert report.check("black_box_not_stronger").status == "FAIL"
    gradients = report.check("gradients_nonzero")  # CE gradients underflow, logit-margin gradients do not
    assert gradients.evidence["kind"] == "saturated" and gradients.evidence["fraction_zero_margin_gradient"] == 0.0
    assert "margin loss" in gradients.advice and "APGD-DLR" in gradients.advice


def test_random_model_fails_determinism(digits_mlp, test_data):
    randomised = nn.Sequential(nn.Flatten(), AlwaysDropout(), *list(digits_mlp.children())[1:])
    report = check_masking(randomised, test_data, Linf(eps=0.1), n_samples=40, seed=0, steps=5,
                           square_queries=50, noise_draws=2)
    check = report.check("deterministic")
    assert check.status == "FAIL"
    assert check.evidence["max_relative_logit_change"] > 1e-3
    fails = [c for c in report.checks if c.status == "FAIL"]
    assert all("EOT" in c.advice and "'rand' suite" in c.advice for c in fails), report.summary()


def test_checklist_leaves_the_model_untouched(digits_mlp, test_data):
    model = nn.Sequential(nn.Linear(64, 10)).train()
    model[0].weight.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    flat = nn.Sequential(nn.Flatten(), model)
    check_masking(flat, test_data, Linf(eps=0.1), n_samples=20, steps=3, square_queries=20, noise_draws=2)
    assert model.training and flat.training
    assert [p.requires_grad for p in model.parameters()] == [False, True]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_report_json_round_trip(honest_report, tmp_path):
    path = tmp_path / "masking.json"
    text = honest_report.to_json(path)
    again = MaskingReport.from_json(path)
    assert again.to_json() == text == MaskingReport.from_json(text).to_json()
    assert again.verdict == honest_report.verdict
    assert all(isinstance(c, Check) and c.advice for c in again.checks)


def test_verdict_is_the_worst_status():
    report = MaskingReport(checks=[Check("a", "PASS", {}, "ok"), Check("b", "WARN", {}, "hm")], n_samples=1,
                           threat={}, elapsed_s=0.0)
    assert report.verdict == "WARN"
    report.checks.append(Check("c", "FAIL", {}, "bad"))
    assert report.verdict == "FAIL"


def test_bad_arguments_raise_clear_errors(digits_mlp, test_data):
    with pytest.raises(ConfigError, match="n_samples"):
        check_masking(digits_mlp, test_data, Linf(eps=0.1), n_samples=0)
    with pytest.raises(InputError, match="threat"):
        check_masking(digits_mlp, test_data, 0.1)
    with pytest.raises(InputError, match="model"):
        check_masking("not a model", test_data, Linf(eps=0.1))
