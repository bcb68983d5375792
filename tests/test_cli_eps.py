"""The eps check on the command line: an eps in the wrong units is refused in one line with no run directory, a
large one warns, fractions such as 8/255 are accepted (flags and config files); and the refusal to resume with a
changed threat, worded for the command line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import ctrl_c_after_the_first_block, run_cli
from gradguard.cli import main, parse_args

USER_MODULE = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))
'''
MODULE_NAME = "gradguard_eps_models"  # a name no installed package has


def one_line(code: int, err: str, *fragments: str) -> str:
    """The one stderr line of a refused command, checked for each fragment."""
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def nothing_in(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


@pytest.fixture
def model_flags(tmp_path, monkeypatch) -> list[str]:
    """--model for a linear model on the embedded digits (8x8, 64 values per sample)."""
    (tmp_path / f"{MODULE_NAME}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import importlib

    module = importlib.import_module(MODULE_NAME)
    torch.manual_seed(0)
    torch.save(module.Net().state_dict(), tmp_path / "net.pth")
    return ["--model", f"{MODULE_NAME}:Net", "--weights", str(tmp_path / "net.pth")]


QUICK = ["--suite", "fgsm", "--samples", "16", "--batch-size", "8"]


# ------------------------------------------------------------------------------------------------ units
@pytest.mark.parametrize("eps,intent", [("8", "did you mean 8/255 = 0.0314?"), ("2", "did you mean 2/255 = 0.00784?")])
def test_linf_eps_in_pixel_levels_is_refused_in_one_line_with_no_run_dir(eps, intent, model_flags, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, out, err = run_cli(capsys, "train", "--out", runs / "t", "--epochs", "1", "--method", "fgsm", "--eps", eps)
    one_line(code, err, "error: eps:", intent)
    assert out == "" and nothing_in(runs)
    for command in ("evaluate", "attack", "diagnose"):
        code, _, err = run_cli(capsys, command, *model_flags, "--eps", eps, "--out", runs / command)
        one_line(code, err, "error: eps:", intent)
        assert nothing_in(runs), command
    code, _, err = run_cli(capsys, "demo", "--quick", "--out", runs / "demo", "--eps", eps)
    one_line(code, err, intent)
    assert nothing_in(runs)


def test_l2_eps_past_the_diameter_is_refused_before_any_work(model_flags, tmp_path, capsys):
    runs = tmp_path / "runs"  # digits: 64 values in [0, 1], so the L2 diameter is 8
    code, _, err = run_cli(capsys, "evaluate", *model_flags, *QUICK, "--norm", "l2", "--eps", "100", "--out", runs / "e")
    one_line(code, err, "error: eps: 100", "L2 diameter", "(8)", "did you mean 100/255 = 0.392?")
    code, _, err = run_cli(capsys, "attack", *model_flags, "--attack", "pgd", "--samples", "8", "--norm", "l1",
                           "--eps", "64", "--out", runs / "a")
    one_line(code, err, "error: eps: 64", "L1 diameter")
    code, _, err = run_cli(capsys, "train", "--out", runs / "t", "--epochs", "1", "--train-samples", "50",
                           "--method", "fgsm", "--norm", "l2", "--eps", "9")
    one_line(code, err, "error: eps: 9", "L2 diameter")
    assert nothing_in(runs)


@pytest.mark.parametrize("curve,norm,fragment", [("0,0.1,8", "linf", "did you mean 8/255"),
                                                 ("0,1,20", "l2", "L2 diameter")])
def test_every_eps_of_a_curve_is_checked_before_the_evaluation(curve, norm, fragment, model_flags, tmp_path, capsys):
    runs = tmp_path / "runs"
    code, _, err = run_cli(capsys, "evaluate", *model_flags, *QUICK, "--norm", norm, "--curve", curve,
                           "--out", runs / "e")
    one_line(code, err, "error: eps:", fragment)
    assert nothing_in(runs)


def test_a_large_eps_warns_in_one_visible_line_and_runs(model_flags, tmp_path, capsys):
    code, _, err = run_cli(capsys, "evaluate", *model_flags, *QUICK, "--eps", "0.5", "--out", tmp_path / "e")
    assert code == 0, err
    warned = [line for line in err.splitlines() if "warning" in line]
    assert warned == ["gradguard: warning: eps: 0.5 is more than 0.3 x the width of the box [0, 1], larger than "
                      "any customary budget (L∞: 0.3 on MNIST, 8/255 = 0.0314 on CIFAR-10); check its units"]
    code, _, err = run_cli(capsys, "evaluate", *model_flags, *QUICK, "--eps", "0.3", "--out", tmp_path / "f")
    assert code == 0 and "warning" not in err, err


# ------------------------------------------------------------------------------------------------ fractions
def test_eps_takes_a_fraction_exactly():
    assert parse_args(["evaluate", "runs/x", "--eps", "8/255"]).eps == 8 / 255
    assert parse_args(["train", "--out", "x", "--eps", "0.5/255"]).eps == 0.5 / 255
    assert parse_args(["attack", "runs/x", "--eps", "0.03"]).eps == 0.03
    from gradguard.cli.common import parse_eps_list

    assert parse_eps_list("0,2/255,8/255") == [0.0, 2 / 255, 8 / 255]


def test_a_run_records_a_fractional_eps_exactly(model_flags, tmp_path, capsys):
    code, _, err = run_cli(capsys, "evaluate", *model_flags, *QUICK, "--eps", "8/255", "--curve", "0,2/255,8/255",
                           "--out", tmp_path / "e")
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "robustness.json").read_text())["threat"]["eps"] == 8 / 255
    assert json.loads((tmp_path / "e" / "curve.json").read_text())["eps"] == [0.0, 2 / 255, 8 / 255]


@pytest.mark.parametrize("text,fragment", [("8/0", "'8/0' divides by zero"),
                                           ("a/b", "'a/b' is not a number or a fraction such as 8/255"),
                                           ("1/2/3", "is not a number"), ("-8/255", "must be a finite number >= 0")])
def test_a_bad_fraction_is_one_line_naming_the_option(text, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as usage_error:  # argparse's own exit, as for every bad flag value
        main(["train", "--out", str(tmp_path / "t"), f"--eps={text}"])
    one_line(usage_error.value.code, capsys.readouterr().err, "argument --eps:", fragment)
    assert usage_error.value.code == 2 and nothing_in(tmp_path)
    code, _, err = run_cli(capsys, "evaluate", "runs/none", "--curve", f"0,{text}")
    one_line(code, err, "curve:" if text != "-8/255" else "eps values must be finite and >= 0")


def test_config_files_take_fractions(tmp_path, capsys):
    config = tmp_path / "eval.toml"
    config.write_text('eps = "8/255"\n[evaluate]\ncurve = ["0", "2/255", "8/255"]\n')
    args = parse_args(["evaluate", "runs/x", "--config", str(config)])
    assert args.eps == 8 / 255 and args.curve == "0,2/255,8/255"
    config.write_text('eps = 0.03\n')
    assert parse_args(["attack", "runs/x", "--config", str(config)]).eps == 0.03
    config.write_text('eps = "8/0"\n')
    code, _, err = run_cli(capsys, "evaluate", "runs/x", "--config", config)
    one_line(code, err, "config: eps:", "divides by zero")
    config.write_text('eps = 8\n')  # a valid number, in the wrong units: refused when the threat is built
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "t", "--config", config)
    one_line(code, err, "did you mean 8/255 = 0.0314?")
    assert not (tmp_path / "t").exists()


# ------------------------------------------------------------------------------------------------ resume
def test_resuming_with_a_changed_threat_shows_both_and_the_flags_that_fix_it(model_flags, tmp_path, capsys):
    settings = [*model_flags, "--suite", "fgsm", "--samples", "24", "--batch-size", "8"]
    runs = tmp_path / "runs"
    with ctrl_c_after_the_first_block():
        code, _, err = run_cli(capsys, "evaluate", *settings, "--eps", "0.1", "--out", runs / "run")
    assert code == 130
    code, _, err = run_cli(capsys, "evaluate", *settings, "--eps", "0.2", "--out", runs / "run", "--resume")
    line = one_line(code, err, "resume: the interrupted evaluation in", ".run.partial",
                    "threat: recorded linf eps=0.1, given linf eps=0.2", "pass the recorded --norm linf --eps 0.1",
                    "choose a new --out", "drop --resume and add --force")
    assert "add --resume" not in line and "resume=False" not in line
    assert (runs / ".run.partial" / "robustness.journal.jsonl").is_file()  # the finished work is still kept
    code, _, err = run_cli(capsys, "evaluate", *settings, "--eps", "0.1", "--out", runs / "run", "--resume")
    assert code == 0, err

    with ctrl_c_after_the_first_block():  # in an existing run directory: dropping --resume starts over
        assert run_cli(capsys, "evaluate", runs / "run", *QUICK[:2], "--samples", "24", "--batch-size", "8")[0] == 130
    code, _, err = run_cli(capsys, "evaluate", runs / "run", *QUICK[:2], "--samples", "24", "--batch-size", "8",
                           "--eps", "8/255", "--seed", "2", "--resume")
    line = one_line(code, err, "threat: recorded linf eps=0.1, given linf eps=0.0313725",
                    "seed: recorded 0, given 2", "--norm linf --eps 0.1 --seed 0", "drop --resume to start over")
    assert "add --resume" not in line and "resume=False" not in line and "--out" not in line


def test_resuming_training_with_a_changed_threat_shows_both(tmp_path, capsys, monkeypatch):
    from gradguard.train import Trainer

    settings = ["--epochs", "2", "--train-samples", "100", "--samples", "20", "--method", "fgsm", "--seed", "4"]
    end_of_epoch = Trainer._end_of_epoch

    def ctrl_c_after_epoch_1(self, epoch, metrics, step_log):
        end_of_epoch(self, epoch, metrics, step_log)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_end_of_epoch", ctrl_c_after_epoch_1)
    out = tmp_path / "run"
    assert run_cli(capsys, "train", "--out", out, *settings, "--eps", "0.1")[0] == 130
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "train", "--out", out, *settings, "--eps", "0.2", "--resume")
    line = one_line(code, err, "resume: the interrupted training in", "threat: recorded linf eps=0.1, given linf "
                    "eps=0.2", "pass the recorded --norm linf --eps 0.1", "choose a new --out")
    assert "add --resume" not in line and "run_dir" not in line
    assert (tmp_path / ".run.partial").is_dir() and not out.exists()
