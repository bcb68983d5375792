"""Resumable evaluation: a journal of finished blocks, a killed run resumed to exactly the uninterrupted report."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from gradguard import Linf
from gradguard.errors import ConfigError, ResumeMismatchError
from gradguard.evaluation import evaluate
from gradguard.evaluation.journal import model_fingerprint

THREAT = Linf(eps=0.1)
SUITE = ["fgsm", {"name": "pgd", "steps": 3}]
N, BATCH = 96, 8  # 12 blocks


class Counted(Dataset):
    """A map-style dataset with a vectorised reader that records which samples it read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        raise AssertionError("get_batch must be used")

    def get_batch(self, index: range):
        self.read += list(index)
        return self.x[index.start:index.stop], self.y[index.start:index.stop]


@pytest.fixture(scope="module")
def data(digits):
    return digits.x_test[:N], digits.y_test[:N]


@pytest.fixture(scope="module")
def uninterrupted(digits_mlp, data):
    return evaluate(digits_mlp, data, THREAT, SUITE, batch_size=BATCH, seed=5)


def outcome(report) -> dict:
    return {key: value for key, value in report.to_dict().items()
            if key not in ("elapsed_s", "attack_time_s", "elapsed_parts_s")}


def test_model_fingerprint_sees_every_weight_and_dtype(digits_mlp):
    copy = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    copy.load_state_dict(digits_mlp.state_dict())
    assert model_fingerprint(copy) == model_fingerprint(digits_mlp)
    with torch.no_grad():
        copy[3].bias[0] += 1e-6
    assert model_fingerprint(copy) != model_fingerprint(digits_mlp)
    as_float = model_fingerprint(copy)
    assert model_fingerprint(copy.double()) != as_float  # same names and shapes, other dtype


def test_journal_holds_a_header_and_one_line_per_block(digits_mlp, data, uninterrupted, tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text("left over from another run\n")  # without resume an existing journal is replaced
    report = evaluate(digits_mlp, data, THREAT, SUITE, batch_size=BATCH, seed=5, journal=path)
    assert outcome(report) == outcome(uninterrupted)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    header, blocks = lines[0], lines[1:]
    assert header["model"] == model_fingerprint(digits_mlp) and header["batch_size"] == BATCH
    assert header["data"]["n"] == N and header["seed"] == 5 and header["threat"] == THREAT.to_dict()
    assert [b["block"] for b in blocks] == list(range(N // BATCH))
    assert sum(len(b["label"]) for b in blocks) == N


def test_resume_after_a_torn_line_reads_only_unfinished_blocks(digits_mlp, data, uninterrupted, tmp_path):
    path = tmp_path / "journal.jsonl"
    evaluate(digits_mlp, data, THREAT, SUITE, batch_size=BATCH, seed=5, journal=path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:6]) + lines[6][:25])  # header, 5 blocks, then a write cut short by a crash
    dataset = Counted(*data)
    resumed = evaluate(digits_mlp, dataset, THREAT, SUITE, batch_size=BATCH, seed=5, journal=path, resume=True)
    assert outcome(resumed) == outcome(uninterrupted)
    # Block 0 is read for the data fingerprint; blocks 1-4 were finished and are never read.
    assert dataset.read == list(range(BATCH)) + list(range(5 * BATCH, N))
    assert [json.loads(line)["block"] for line in path.read_text().splitlines()[1:]] == list(range(12))


def test_a_resumed_run_counts_the_time_of_every_part(digits_mlp, data, tmp_path):
    path = tmp_path / "journal.jsonl"
    evaluate(digits_mlp, data, THREAT, SUITE, batch_size=BATCH, seed=5, journal=path)
    header, *blocks = [json.loads(line) for line in path.read_text().splitlines()]
    assert [b["part"] for b in blocks] == [1] * len(blocks)
    assert all(a["part_elapsed_s"] <= b["part_elapsed_s"] for a, b in zip(blocks, blocks[1:], strict=False))  # time so far
    for number, block in enumerate(blocks[:5]):  # a first part that ran 100 s before it was killed
        block["part_elapsed_s"] = 20.0 * (number + 1)
    path.write_text("".join(json.dumps(line) + "\n" for line in [header] + blocks[:5]))
    resumed = evaluate(digits_mlp, data, THREAT, SUITE, batch_size=BATCH, seed=5, journal=path, resume=True)
    first, second = resumed.elapsed_parts_s
    assert first == 100.0 and 0 < second < 100 and resumed.elapsed_s == pytest.approx(first + second, abs=2e-3)
    assert {json.loads(line)["part"] for line in path.read_text().splitlines()[6:]} == {2}
    assert resumed.to_dict()["elapsed_parts_s"] == resumed.elapsed_parts_s


KILLED = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    from gradguard import Linf
    from gradguard.evaluation import evaluate
    torch.set_num_threads(1)
    saved = torch.load(sys.argv[1], weights_only=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    model.load_state_dict(saved["state"])
    x, y = saved["x"], saved["y"]
    model.register_forward_pre_hook(lambda module, inputs: time.sleep(0.1))  # slow, same weights
    evaluate(model, (x, y), Linf(0.1), ["fgsm", {"name": "pgd", "steps": 3}], batch_size=8, seed=5, journal=sys.argv[2])
""")


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_report(digits_mlp, data, uninterrupted, tmp_path):
    torch.save({"state": digits_mlp.state_dict(), "x": data[0], "y": data[1]}, tmp_path / "inputs.pt")
    (tmp_path / "run.py").write_text(KILLED)
    path = tmp_path / "journal.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in ("src", os.environ.get("PYTHONPATH", "")) if p))
    process = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "inputs.pt"), str(path)],
                               env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (path.is_file() and path.read_text().count("\n") >= 4):  # header + 3 finished blocks
        assert process.poll() is None, process.stderr.read().decode()[-2000:] if process.stderr else ""
        assert time.monotonic() < deadline, "the evaluation journaled no block in time"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = path.read_text().count("\n") - 1
    assert 3 <= finished < N // BATCH  # killed part-way
    resumed = evaluate(digits_mlp, data, THREAT, SUITE, batch_size=BATCH, seed=5, journal=path, resume=True)
    assert outcome(resumed) == outcome(uninterrupted)


def test_a_journal_of_another_configuration_is_refused(digits_mlp, data, tmp_path):
    path = tmp_path / "journal.jsonl"
    evaluate(digits_mlp, (data[0][:16], data[1][:16]), THREAT, ["fgsm"], batch_size=BATCH, seed=5, journal=path)
    other_model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    changes = {
        "model": dict(model=other_model),
        "suite": dict(suite=["pgd"]),
        "threat": dict(threat=Linf(eps=0.2)),
        "seed": dict(seed=6),
        "batch_size": dict(batch_size=4),
        "data": dict(data=(data[0][16:32], data[1][16:32])),
    }
    base = dict(model=digits_mlp, data=(data[0][:16], data[1][:16]), threat=THREAT, suite=["fgsm"],
                batch_size=BATCH, seed=5)
    for name, change in changes.items():
        arguments = {**base, **change}
        with pytest.raises(ResumeMismatchError, match=f"another .*{name}.*pass resume=False") as refused:
            evaluate(arguments.pop("model"), arguments.pop("data"), arguments.pop("threat"), journal=path,
                     resume=True, **arguments)
        assert name in refused.value.changes and refused.value.where == str(tmp_path)
    with pytest.raises(ResumeMismatchError, match=r"\(threat: recorded linf eps=0\.1, given linf eps=0\.2; seed: "
                       r"recorded 5, given 6\)"):  # the recorded values beside the given ones
        evaluate(digits_mlp, base["data"], Linf(eps=0.2), ["fgsm"], batch_size=BATCH, seed=6, journal=path,
                 resume=True)


def test_resume_needs_a_journal_and_no_adversarial_points(digits_mlp, data, tmp_path):
    with pytest.raises(ConfigError, match="journal=PATH"):
        evaluate(digits_mlp, data, THREAT, ["fgsm"], resume=True)
    with pytest.raises(ConfigError, match="return_adversarial"):
        evaluate(digits_mlp, data, THREAT, ["fgsm"], journal=tmp_path / "j", resume=True, return_adversarial=True)
