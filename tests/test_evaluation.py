"""evaluate / evaluate_curve: the AutoAttack protocol — cascade on survivors, per-sample worst case, honest numbers."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradguard import L1, L2, Linf
from gradguard.attacks import Attack, Iterate
from gradguard.errors import BoundsError, ConfigError, InputError
from gradguard.evaluation import (
    SUITES,
    RobustnessCurve,
    RobustnessReport,
    evaluate,
    evaluate_curve,
    get_suite,
    resolve_suite,
)

THREAT = Linf(eps=0.1)
# Deterministic attacks (no random start): each sample's outcome does not depend on the batch it is in.
DETERMINISTIC = ["fgsm", {"name": "bim", "steps": 10}, {"name": "pgd", "steps": 10, "init": "zero"}, "mifgsm"]


class Recorder(Attack):
    """Returns its input unchanged and remembers how many samples it was given."""

    name = "recorder"

    def __init__(self, model, threat):
        super().__init__(model, threat)
        self.seen = 0

    def _perturb(self, x, labels):
        self.seen += x.shape[0]
        return Iterate(x.clone())


@pytest.fixture(scope="module")
def data(digits):
    return digits.x_test[:200], digits.y_test[:200]


@pytest.fixture(scope="module")
def report(digits_mlp, data):
    return evaluate(digits_mlp, data, THREAT, DETERMINISTIC, batch_size=64, return_adversarial=True)


def test_worst_case_is_at_most_every_single_attack(digits_mlp, data, report):
    for spec, label in zip(DETERMINISTIC, report.suite, strict=False):
        alone = evaluate(digits_mlp, data, THREAT, [spec], batch_size=64)
        assert report.robust_accuracy <= alone.robust_accuracy
        assert bool((report.robust <= alone.robust).all()), label  # per sample: robust to the suite ⇒ robust alone
    assert report.robust_accuracy < report.per_attack["fgsm"]  # the later attacks add something here


def test_per_attack_is_the_cascade_and_ends_at_the_worst_case(report):
    accuracies = list(report.per_attack.values())
    assert list(report.per_attack) == report.suite == ["fgsm", "bim", "pgd", "mifgsm"]
    assert accuracies == sorted(accuracies, reverse=True)
    assert accuracies[-1] == report.robust_accuracy <= report.clean_accuracy
    for k, label in enumerate(report.suite):
        survivors = report.clean_correct & ((report.broken_by > k) | (report.broken_by == -1))
        assert report.per_attack[label] == pytest.approx(float(survivors.float().mean()))


def test_clean_misclassified_samples_are_never_attacked_nor_robust(digits_mlp, data):
    x, y = data
    flipped = y.clone()
    flipped[:50] = (y[:50] + 1) % 10  # 50 samples the model now gets wrong
    recorder = Recorder(digits_mlp, THREAT)
    result = evaluate(digits_mlp, (x, flipped), THREAT, [recorder], batch_size=64)
    assert recorder.seen == int(result.clean_correct.sum())
    assert not bool((result.robust & ~result.clean_correct).any())
    assert not bool(result.robust[:50].any())


def test_each_attack_sees_only_the_samples_still_robust(digits_mlp, data):
    recorder = Recorder(digits_mlp, THREAT)
    result = evaluate(digits_mlp, data, THREAT, ["fgsm", recorder], batch_size=64)
    assert recorder.seen == round(result.per_attack["fgsm"] * result.n_samples)
    assert result.robust_accuracy == result.per_attack["fgsm"]  # the identity "attack" breaks nothing


def test_per_class_numbers_add_up_to_the_totals(report):
    table = report.per_class
    assert sum(row["n"] for row in table.values()) == report.n_samples
    clean = sum(row["n"] * row["clean"] for row in table.values()) / report.n_samples
    robust = sum(row["n"] * row["robust"] for row in table.values()) / report.n_samples
    assert clean == pytest.approx(report.clean_accuracy)
    assert robust == pytest.approx(report.robust_accuracy)
    assert all(row["robust"] <= row["clean"] for row in table.values())


def test_adversarial_examples_are_in_the_ball_and_reproduce_the_result(digits_mlp, data, report):
    x, y = data
    assert bool(THREAT.contains(report.x_adv, x).all())
    with torch.no_grad():
        predictions = digits_mlp(report.x_adv).argmax(1)
    assert torch.equal(predictions, report.predictions_adv)
    broken = report.broken_by >= 0
    assert bool((predictions[broken] != y[broken]).all())
    assert torch.equal(report.x_adv[~broken], x[~broken])
    assert torch.equal(report.robust, report.clean_correct & ~broken)


def test_json_round_trip(report, tmp_path):
    path = tmp_path / "robustness.json"
    text = report.to_json(path)
    again = RobustnessReport.from_json(path)
    assert again.to_json() == text
    assert RobustnessReport.from_json(text).to_dict() == json.loads(text)
    assert torch.equal(again.robust, report.robust) and torch.equal(again.broken_by, report.broken_by)
    assert again.x_adv is None  # the adversarial tensor is not part of the JSON


def test_seed_makes_random_attacks_reproducible(digits_mlp, data):
    suite = [{"name": "pgd", "steps": 5, "restarts": 2}]
    first = evaluate(digits_mlp, data, THREAT, suite, seed=3, batch_size=64)
    second = evaluate(digits_mlp, data, THREAT, suite, seed=3, batch_size=64)
    assert torch.equal(first.robust, second.robust)
    assert first.robust_accuracy == second.robust_accuracy


def test_dataloader_and_tensors_give_the_same_report(digits_mlp, data):
    loader = DataLoader(TensorDataset(*data), batch_size=37, shuffle=False)
    from_loader = evaluate(digits_mlp, loader, THREAT, ["fgsm"], max_samples=150)
    from_tensors = evaluate(digits_mlp, (data[0][:150], data[1][:150]), THREAT, ["fgsm"])
    assert from_loader.n_samples == 150
    assert torch.equal(from_loader.robust, from_tensors.robust)


def test_model_is_left_untouched(data):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.1), nn.ReLU(), nn.Linear(32, 10)).train()
    model[1].weight.requires_grad_(False)
    model[4].bias.grad = torch.ones(10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, data, THREAT, ["fgsm", {"name": "pgd", "steps": 3}])
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True]
    assert torch.equal(model[4].bias.grad, torch.ones(10)) and model[1].bias.grad is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_suites_drop_attacks_without_the_norm_and_say_so(digits_mlp, data):
    result = evaluate(digits_mlp, data, L1(eps=2.0), ["fgsm", {"name": "square", "queries": 10}])
    assert result.suite == ["fgsm"]
    assert result.skipped == [{"label": "square", "reason": "does not support the l1 norm"}]
    assert "skipped square" in result.summary()


def test_a_stage_limited_to_some_norms_runs_only_there_and_says_so(digits_mlp, data):
    suite = ["fgsm", {"name": "pgd", "steps": 3, "label": "pgd-l2-only", "norms": ["l2"]}]
    in_linf = evaluate(digits_mlp, data, Linf(eps=0.1), suite)
    assert in_linf.suite == ["fgsm"] and "pgd-l2-only" not in in_linf.attack_budget
    assert in_linf.skipped == [{"label": "pgd-l2-only", "reason": "runs only in the l2 norm (the suite's choice)"}]
    in_l2 = evaluate(digits_mlp, data, L2(eps=1.0), suite)
    assert in_l2.suite == ["fgsm", "pgd-l2-only"] and in_l2.attack_budget["pgd-l2-only"]["gradients"] > 0
    assert {"label": "pgd-l2-only", "name": "pgd", "steps": 3, "norms": ["l2"]} in in_l2.attacks
    for bad in ([], ["l3"], 2):
        with pytest.raises(ConfigError, match="norms=.*from \\('linf', 'l2', 'l1'\\)"):
            evaluate(digits_mlp, data, L2(eps=1.0), [{"name": "pgd", "norms": bad}])


def test_eps_zero_gives_the_clean_accuracy(digits_mlp, data):
    result = evaluate(digits_mlp, data, Linf(eps=0.0), ["fgsm", "pgd"])
    assert result.robust_accuracy == result.clean_accuracy
    assert torch.equal(result.robust, result.clean_correct)


def test_named_suites_have_the_autoattack_composition():
    assert [s["name"] for s in get_suite("standard")] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert get_suite("standard")[1]["n_target_classes"] == 9 and get_suite("standard")[3]["queries"] == 5000
    assert get_suite("standard")[2]["n_target_classes"] == 9 and get_suite("standard")[2]["steps"] == 100
    assert [s["name"] for s in get_suite("lite")] == ["apgd-ce", "apgd-t", "square"]
    assert [s["name"] for s in get_suite("quick")] == ["apgd-ce"] and get_suite("quick")[0]["steps"] == 100
    fast = get_suite("fast")
    assert [s["name"] for s in fast] == ["apgd-ce", "apgd-t", "square"]
    assert fast[1]["n_target_classes"] == 3 and fast[2]["queries"] == 1000 and fast[1]["steps"] == 100
    get_suite("quick")[0]["steps"] = 1  # a copy: the registry is not changed
    assert SUITES["quick"][0]["steps"] == 100
    assert [s.label for s in resolve_suite(["pgd", {"name": "pgd", "steps": 3}])] == ["pgd", "pgd#2"]


def test_quick_suite_is_at_least_as_strong_as_pgd(digits_mlp, data):
    quick = evaluate(digits_mlp, data, THREAT, "quick", batch_size=100)
    pgd = evaluate(digits_mlp, data, THREAT, [{"name": "pgd", "steps": 20}], batch_size=100)
    assert quick.suite == ["apgd-ce"]
    assert quick.robust_accuracy <= pgd.robust_accuracy + 0.01


def test_standard_composition_runs_on_survivors_and_beats_its_first_attack(digits_mlp, data):
    x, y = data[0][:80], data[1][:80]
    suite = [{"name": "apgd-ce", "steps": 20}, {"name": "apgd-t", "steps": 10, "n_target_classes": 3},
             {"name": "square", "queries": 200}]  # the "standard" composition at small budgets
    result = evaluate(digits_mlp, (x, y), THREAT, suite, batch_size=40)
    assert result.suite == ["apgd-ce", "apgd-t", "square"]
    assert result.robust_accuracy <= result.per_attack["apgd-ce"] <= result.clean_accuracy
    first_only = evaluate(digits_mlp, (x, y), THREAT, suite[:1], batch_size=40)
    assert result.per_attack["apgd-ce"] == first_only.robust_accuracy  # same seeds, same first stage


def test_curve_is_non_increasing_and_reuses_work(digits_mlp, data, tmp_path):
    eps_values = [0.2, 0.0, 0.05, 0.1]
    curve = evaluate_curve(digits_mlp, data, THREAT, eps_values, suite=DETERMINISTIC[:2], batch_size=64)
    n = curve.n_samples
    assert curve.eps == [0.0, 0.05, 0.1, 0.2]
    assert curve.robust_accuracy[0] == curve.clean_accuracy
    assert curve.robust_accuracy == sorted(curve.robust_accuracy, reverse=True)
    # Only samples robust at the previous eps are attacked at the next one.
    assert curve.attacked[1:] == [round(a * n) for a in curve.robust_accuracy[:-1]]
    for eps, accuracy in zip(curve.eps, curve.robust_accuracy, strict=False):
        alone = evaluate(digits_mlp, data, THREAT.with_eps(eps), DETERMINISTIC[:2], batch_size=64)
        assert accuracy <= alone.robust_accuracy  # reuse only ever adds adversarial points that are valid
    png = curve.plot(tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert RobustnessCurve.from_json(curve.to_json()).to_dict() == curve.to_dict()


def test_bad_arguments_raise_clear_errors(digits_mlp, data):
    x, y = data
    with pytest.raises(ConfigError, match="suite"):
        evaluate(digits_mlp, data, THREAT, "strongest")
    with pytest.raises(ConfigError, match="'magic' is neither a suite nor an attack"):
        evaluate(digits_mlp, data, THREAT, ["pgd", "magic"])
    with pytest.raises(BoundsError, match="data"):
        evaluate(digits_mlp, (x * 3, y), THREAT, ["fgsm"])
    with pytest.raises(InputError, match="data"):
        evaluate(digits_mlp, (x, y + 10), THREAT, ["fgsm"])
    with pytest.raises(InputError, match="data"):
        evaluate(digits_mlp, "digits", THREAT, ["fgsm"])
    with pytest.raises(InputError, match="threat"):
        evaluate(digits_mlp, data, 0.1, ["fgsm"])
    with pytest.raises(ConfigError, match="eps_values"):
        evaluate_curve(digits_mlp, data, THREAT, [0.1, -1.0])
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate(digits_mlp, data, L2(eps=1.0), ["fgsm"], batch_size=0)
