"""Helpers the command-line tests share: run a command in this process, and stop an evaluation mid-way."""
from __future__ import annotations

import contextlib
from typing import Iterator

import pytest

from gradguard.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``gradguard ARGV`` in this process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@contextlib.contextmanager
def ctrl_c_after_the_first_block() -> Iterator[None]:
    """Inside: an evaluation's journal raises KeyboardInterrupt right after its first finished block (the header,
    then one block), as Ctrl-C there would."""
    from gradguard.evaluation import journal

    append = journal.JournalWriter.append
    calls = []

    def interrupt(self, record):
        append(self, record)
        calls.append(record)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(journal.JournalWriter, "append", interrupt)
        yield


def train_tiny_run(out, *, eps: float, seed: int):
    """``gradguard train`` of a tiny digits MLP into ``out`` (one epoch, 200 training images, no validation
    attack): the run directory the command-line tests work on."""
    assert main(["train", "--out", str(out), "--eps", str(eps), "--epochs", "1", "--train-samples", "200",
                 "--samples", "32", "--val-attack", "none", "--seed", str(seed)]) == 0
    return out


# Script source for the torchrun tests' subprocesses: the digits data as ``d`` and a small MLP ``model`` trained on
# it (5 epochs of Adam on 600 images, seeded), the same in every process. It expects ``torch``, ``nn`` and
# ``load_dataset`` imported.
DIGITS_MLP_SOURCE = """\
d = load_dataset("digits")
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(5):
    for i in range(0, 600, 100):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(d.x_train[i:i + 100]), d.y_train[i:i + 100]).backward()
        optimiser.step()
"""
