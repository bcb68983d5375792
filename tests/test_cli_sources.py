"""Models and data from anywhere on the command line: a user's module + .pth state dict on CIFAR-10 binary batches,
with no gradguard training run involved; and `evaluate --resume` after an interruption."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import ctrl_c_after_the_first_block, run_cli

USER_MODULE = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes=10, width=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))
'''
MODULE_NAME = "gradguard_user_models"  # a name no installed package has


def write_cifar10(folder: Path, n_test: int = 24) -> None:
    """A tiny CIFAR-10 binary folder: records of one label byte and 3072 pixel bytes (CHW)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name, count in [(f"data_batch_{i}.bin", 2) for i in range(1, 6)] + [("test_batch.bin", n_test)]:
        labels = rng.integers(0, 10, (count, 1), dtype=np.uint8)
        pixels = rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")


@pytest.fixture
def user_files(tmp_path, monkeypatch) -> dict[str, Path]:
    (tmp_path / f"{MODULE_NAME}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import importlib

    module = importlib.import_module(MODULE_NAME)
    torch.manual_seed(0)
    torch.save(module.Net(width=4).state_dict(), tmp_path / "net.pth")
    write_cifar10(tmp_path / "cifar-10-batches-bin")
    return {"weights": tmp_path / "net.pth", "data": tmp_path / "cifar-10-batches-bin", "root": tmp_path}


def model_flags(files: dict[str, Path]) -> list[str]:
    return ["--model", f"{MODULE_NAME}:Net", "--weights", str(files["weights"]), "--model-kwargs", "width=4",
            "--mean", "0.49,0.48,0.45", "--std", "0.25", "--dataset", "cifar10", "--data-root", str(files["data"])]


def test_a_users_model_and_cifar_folder_go_through_every_command(user_files, capsys):
    out = user_files["root"] / "runs" / "mine"
    code, _, err = run_cli(capsys, "evaluate", *model_flags(user_files), "--suite", "quick", "--eps", "0.03",
                           "--samples", "16", "--batch-size", "8", "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["model_source"]["spec"] == f"{MODULE_NAME}:Net" and manifest["dataset"] == "cifar10"
    assert json.loads((out / "robustness.json").read_text())["n_samples"] == 16
    assert not list(out.glob("robustness.journal*"))  # the journal goes once robustness.json is written

    code, _, err = run_cli(capsys, "attack", out, "--attack", "pgd", "--samples", "16", "--json")  # remembered
    assert code == 0, err
    assert json.loads((out / "attacks.json").read_text())["threat"]["eps"] == 0.03
    assert run_cli(capsys, "diagnose", out, "--samples", "8")[0] == 0
    code, out_text, err = run_cli(capsys, "report", out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_source"].startswith(f"{MODULE_NAME}:Net(width=4)")
    assert f"model: {MODULE_NAME}:Net" in (out / "report.html").read_text()
    assert set(summary["models"][0]["attacks"]) == {"pgd"} and summary["threat"]["eps"] == 0.03


def test_model_flags_need_model_and_out(user_files, capsys):
    code, _, err = run_cli(capsys, "evaluate", *model_flags(user_files))
    assert code == 1 and "out: --model makes a new run directory; add --out DIR" in err
    code, _, err = run_cli(capsys, "attack", "runs/x", "--weights", "net.pth")
    assert code == 1 and "--weights only apply with --model" in err
    code, _, err = run_cli(capsys, "diagnose")
    assert code == 1 and "give a RUN_DIR, or --model SPEC" in err


def test_interrupted_evaluation_resumes_to_the_uninterrupted_report(user_files, capsys):
    settings = [*model_flags(user_files), "--suite", "quick", "--samples", "24", "--batch-size", "8", "--seed", "3"]
    runs = user_files["root"] / "runs"
    assert run_cli(capsys, "evaluate", *settings, "--out", runs / "straight")[0] == 0
    with ctrl_c_after_the_first_block():
        code, _, err = run_cli(capsys, "evaluate", *settings, "--out", runs / "run")
    assert code == 130 and "--resume" in err
    assert not (runs / "run").exists() and (runs / ".run.partial" / "robustness.journal.jsonl").is_file()
    code, _, err = run_cli(capsys, "evaluate", *settings, "--out", runs / "run")  # not silently started over
    assert code == 1 and "--resume" in err
    code, _, err = run_cli(capsys, "evaluate", *settings, "--out", runs / "run", "--resume")
    assert code == 0, err
    resumed = json.loads((runs / "run" / "robustness.json").read_text())
    straight = json.loads((runs / "straight" / "robustness.json").read_text())
    for key in ("clean_accuracy", "robust_accuracy", "per_attack", "samples"):
        assert resumed[key] == straight[key], key
    assert not (runs / ".run.partial").exists()

    with ctrl_c_after_the_first_block():  # now in an existing run directory
        code, _, err = run_cli(capsys, "evaluate", runs / "run", "--suite", "quick", "--samples", "24",
                               "--batch-size", "8", "--seed", "3")
    assert code == 130 and "journaled" in err and "--resume" in err
    code, _, err = run_cli(capsys, "evaluate", runs / "run", "--suite", "quick", "--samples", "24", "--batch-size", "8",
                           "--seed", "3", "--resume")
    assert code == 0, err
    assert json.loads((runs / "run" / "robustness.json").read_text())["samples"] == straight["samples"]
    assert not list((runs / "run").glob("robustness.journal*"))
