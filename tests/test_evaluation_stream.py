"""Streaming evaluation: every data form goes through the same blocks and gives the same per-sample results."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from gradguard import Linf
from gradguard.diagnostics import check_masking
from gradguard.errors import InputError
from gradguard.evaluation import evaluate, evaluate_curve
from gradguard.evaluation.stream import BlockSource

THREAT = Linf(eps=0.1)
# PGD with a random start: its result depends on the seed of each block, so equal results mean equal blocks.
SUITE = ["fgsm", {"name": "pgd", "steps": 3}]
N = 70


class Batched(Dataset):
    """A map-style dataset with a vectorised reader that counts what it reads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.read = x, y, 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        raise AssertionError("get_batch must be used")

    def get_batch(self, index: range):
        self.read += len(index)
        return self.x[index.start:index.stop], self.y[index.start:index.stop]


@pytest.fixture(scope="module")
def data(digits):
    return digits.x_test[:N], digits.y_test[:N]


def per_sample(report) -> dict:
    return {key: value for key, value in report.to_dict().items() if key not in ("elapsed_s", "attack_time_s")}


def test_tensors_dataset_and_loader_give_identical_per_sample_results(digits_mlp, data):
    x, y = data
    forms = {
        "tensors": data,
        "per-item dataset": TensorDataset(x, y),
        "get_batch dataset": Batched(x, y),
        "loader of 7": DataLoader(TensorDataset(x, y), batch_size=7),
        "loader of 50": DataLoader(TensorDataset(x, y), batch_size=50),
    }
    reports = {name: evaluate(digits_mlp, form, THREAT, SUITE, batch_size=16, seed=3) for name, form in forms.items()}
    reference = per_sample(reports["tensors"])
    assert reference["n_samples"] == N and 0 < reference["robust_accuracy"] < reference["clean_accuracy"]
    for name, report in reports.items():
        assert per_sample(report) == reference, name


def test_the_cascade_guarantees_hold_per_block(digits_mlp, data):
    report = evaluate(digits_mlp, data, THREAT, SUITE, batch_size=16, seed=3, return_adversarial=True)
    accuracies = list(report.per_attack.values())
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[-1] == report.robust_accuracy
    assert report.robust_accuracy == int(report.robust.sum()) / N
    assert report.x_adv is not None and report.x_adv.shape == data[0].shape
    assert ((report.x_adv - data[0]).abs().amax() <= THREAT.eps + 1e-6).item()
    with torch.no_grad():  # the kept points reproduce each broken sample's adversarial prediction
        assert torch.equal(digits_mlp(report.x_adv).argmax(1)[report.broken_by >= 0],
                           report.predictions_adv[report.broken_by >= 0])
    zero = evaluate(digits_mlp, data, THREAT.with_eps(0.0), SUITE, batch_size=16)
    assert zero.robust_accuracy == zero.clean_accuracy == report.clean_accuracy


def test_max_samples_caps_every_form(digits_mlp, data):
    x, y = data
    for form in (data, Batched(x, y), DataLoader(TensorDataset(x, y), batch_size=7)):
        report = evaluate(digits_mlp, form, THREAT, ["fgsm"], batch_size=16, max_samples=33)
        assert report.n_samples == 33 and torch.equal(report.labels, y[:33])


def test_a_map_style_dataset_is_read_block_by_block_once(data):
    source = BlockSource(Batched(*data), THREAT, batch_size=16)
    sizes = []
    for _, read in source.blocks():
        sizes.append(read().x.shape[0])
        assert source.data.read == sum(sizes)  # nothing is read ahead of the block being worked on
    assert sizes == [16, 16, 16, 16, 6]


def test_curve_streams_and_matches_tensors(digits_mlp, data):
    loader = DataLoader(TensorDataset(*data), batch_size=7)
    from_tensors = evaluate_curve(digits_mlp, data, THREAT, [0.05, 0.1], SUITE, batch_size=16, seed=1)
    from_loader = evaluate_curve(digits_mlp, loader, THREAT, [0.05, 0.1], SUITE, batch_size=16, seed=1)
    assert from_loader.robust_accuracy == from_tensors.robust_accuracy
    assert from_loader.per_attack == from_tensors.per_attack and from_loader.attacked == from_tensors.attacked
    assert from_tensors.robust_accuracy[1] <= from_tensors.robust_accuracy[0]


def test_check_masking_reads_only_the_first_samples(digits_mlp, data):
    dataset = Batched(*data)
    report = check_masking(digits_mlp, dataset, THREAT, n_samples=20, steps=2, square_queries=10, noise_draws=2,
                           batch_size=16)
    assert report.n_samples == 20 and dataset.read == 20


def test_bad_streams_raise_clear_errors(digits_mlp, data):
    with pytest.raises(InputError, match="no batches"):
        evaluate(digits_mlp, [], THREAT, ["fgsm"])
    with pytest.raises(InputError, match="pair"):
        evaluate(digits_mlp, [data[0]], THREAT, ["fgsm"])
    with pytest.raises(InputError, match="floating"):
        evaluate(digits_mlp, DataLoader(TensorDataset((data[0] * 255).byte(), data[1]), batch_size=8), THREAT, ["fgsm"])
