"""runtime/progress.py: the one tqdm policy — a transient bar on stderr, shown when the caller asks (evaluate,
certify, Trainer), or only on a terminal (the workflow's loops); nothing on stdout."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gradguard import Linf, certify, evaluate
from gradguard.runtime.progress import progress_bar
from gradguard.train import Trainer
from gradguard.workflow import progress

X = torch.rand(8, 4)
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def test_a_requested_bar_goes_to_stderr_even_off_a_terminal(capsys):
    assert list(progress_bar(range(3), desc="demo")) == [0, 1, 2]
    out, err = capsys.readouterr()
    assert out == "" and "demo" in err and err.endswith("\r")  # leave=False: the bar clears its line at the end


def test_a_terminal_only_bar_is_silent_off_a_terminal(capsys):
    bar = progress_bar(range(3), terminal_only=True, desc="demo")
    assert bar.disable and list(bar) == [0, 1, 2]
    assert list(progress(range(2), desc="attack")) == [0, 1]  # the workflow's bar: the same policy
    assert capsys.readouterr() == ("", "")


@pytest.mark.filterwarnings("ignore:evaluate. clean accuracy")  # an untrained model: below chance is expected
def test_evaluate_certify_and_trainer_bars_are_on_stderr(capsys):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    evaluate(model, (X, Y), Linf(eps=0.1), ["fgsm"], batch_size=4, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "blocks" in err
    certify(model, (X[:2], Y[:2]), sigma=0.25, n0=4, n=8, batch_size=8, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "certify" in err
    Trainer(model, epochs=1, batch_size=4, progress=True, val_attack=None).fit((X, Y))
    out, err = capsys.readouterr()
    assert out == "" and "epoch 1/1" in err
