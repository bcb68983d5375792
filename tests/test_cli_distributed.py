"""The command line on devices and under torchrun: --amp / --channels-last are recorded; ``train``, ``evaluate``
(with --curve) and ``attack`` under 2 gloo processes give one process's numbers, print one report, record
world_size 2, and only rank 0 writes; a failure on one rank leaves no run directory behind."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gradguard.cli import main
from gradguard.models import load

TINY = ["--seed", "0", "--device", "cpu"]
TRAIN = ["--epochs", "2", "--train-samples", "1000", "--samples", "300", "--depth", "1", "--width", "32",
         "--method", "fgsm", "--eps", "0.2", "--val-attack", "fgsm", "--batch-size", "100", "--lr", "0.01",
         "--l2", "1e-3", "--clip-grad-norm", "5.0"]
EVALUATE = ["--suite", "quick", "--samples", "48", "--batch-size", "8", "--curve", "0,0.1,0.2"]
ATTACK = ["--attack", "fgsm,pgd", "--steps", "5", "--samples", "48", "--batch-size", "8"]


def one_process(*argv) -> int:
    """The command in this process with one thread, as each torchrun process runs it (same float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


def torchrun(*argv, processes: int = 2, cwd: Path | None = None) -> subprocess.CompletedProcess:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, str(cwd or ""), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, MASTER_ADDR="127.0.0.1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "gradguard.cli", *[str(a) for a in argv]]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=cwd)


def torchrun_script(script: Path, *argv) -> subprocess.CompletedProcess:
    """``script`` under torchrun in 2 gloo processes, with this checkout's gradguard."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-dist") / "run"
    assert one_process("train", "--out", out, *TINY, "--epochs", "3", "--train-samples", "600", "--samples", "100",
                       "--depth", "1", "--width", "32", "--val-attack", "none") == 0
    return out


# ------------------------------------------------------------------------------------------------ devices
def test_evaluate_with_amp_bf16_runs_and_records_it(trained_run, capsys):
    assert one_process("evaluate", trained_run, *TINY, "--suite", "quick", "--samples", "16", "--amp", "bf16",
                       "--channels-last", "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    written = read(trained_run / "robustness.json")
    assert written["amp"] == printed["robustness"]["amp"] == "bf16"
    assert written["channels_last"] is True and written["device"] == "cpu" and written["world_size"] == 1


def test_attack_records_its_precision(trained_run):
    assert one_process("attack", trained_run, *TINY, "--attack", "fgsm", "--samples", "16", "--amp", "bf16") == 0
    result = read(trained_run / "attacks.json")["results"]["fgsm"]
    assert (result["amp"], result["channels_last"], result["world_size"]) == ("bf16", False, 1)


def test_a_bad_amp_value_is_a_one_line_usage_error(trained_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(trained_run), "--amp", "fp8"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--amp" in error and "fp8" in error and "bf16" in error


# ------------------------------------------------------------------------------------------------ torchrun
@pytest.mark.slow
def test_evaluate_and_attack_under_two_processes_match_one(trained_run, tmp_path, capsys):
    single = tmp_path / "single"
    double = tmp_path / "double"
    for copy in (single, double):
        copy.mkdir()
        for name in ("model.safetensors", "model.json", "run.json"):
            (copy / name).write_bytes((trained_run / name).read_bytes())
    assert one_process("evaluate", single, *TINY, *EVALUATE) == 0
    assert one_process("attack", single, *TINY, *ATTACK) == 0
    capsys.readouterr()
    evaluated = torchrun("evaluate", double, *TINY, *EVALUATE)
    attacked = torchrun("attack", double, *TINY, *ATTACK)
    for done in (evaluated, attacked):
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("wrote ") == 1  # one report, from rank 0
    assert evaluated.stdout.count("worst case") == 1
    one, two = read(single / "robustness.json"), read(double / "robustness.json")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["samples"] == one["samples"]  # per sample: label, clean, robust, broken by, adversarial prediction
    for key in ("clean_accuracy", "robust_accuracy", "per_attack", "per_class", "n_samples", "suite"):
        assert two[key] == one[key], key
    curve_one, curve_two = read(single / "curve.json"), read(double / "curve.json")
    assert curve_two["world_size"] == 2
    for key in ("eps", "robust_accuracy", "clean_accuracy", "per_attack", "attacked", "n_samples"):
        assert curve_two[key] == curve_one[key], key
    attacks_one, attacks_two = read(single / "attacks.json"), read(double / "attacks.json")
    assert attacks_two["labels"] == attacks_one["labels"]
    for name in ("fgsm", "pgd"):
        a, b = attacks_one["results"][name], attacks_two["results"][name]
        assert b["world_size"] == 2
        for key in ("correct", "robust_accuracy", "success_rate", "mean_distance", "max_distance", "n_grad"):
            assert b[key] == a[key], (name, key)
    assert sorted(p.name for p in double.iterdir()) == sorted(p.name for p in single.iterdir())  # no rank files


@pytest.mark.slow
def test_train_under_two_processes_matches_one_and_only_rank0_writes(tmp_path, capsys):
    single, double = tmp_path / "one" / "run", tmp_path / "two" / "run"
    assert one_process("train", "--out", single, *TINY, *TRAIN) == 0
    capsys.readouterr()
    done = torchrun("train", "--out", double, *TINY, *TRAIN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("model saved in") == 1
    assert read(double / "run.json")["world_size"] == 2 and read(double / "config.json")["world_size"] == 2
    history = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (single, double)]
    for a, b in zip(*history, strict=True):
        for key in ("train_loss", "train_clean_acc", "train_robust_acc", "val_clean_acc", "val_robust_acc"):
            assert b[key] == pytest.approx(a[key], abs=2e-3), key
    assert history[0][-1]["val_clean_acc"] > 0.6  # it really trained (chance is 0.1)
    w1, w2 = load(single).state_dict(), load(double).state_dict()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in double.iterdir()) == sorted(p.name for p in single.iterdir())
    assert [p.name for p in double.parent.iterdir()] == ["run"]  # no staging folder left beside it


FAILS_ON_RANK_1 = textwrap.dedent("""
    import os
    from torch import nn

    def Net():
        if os.environ.get("RANK") == "1":
            raise RuntimeError("rank 1 cannot build this model")
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
""")


@pytest.mark.slow
def test_a_failure_on_one_rank_leaves_no_run_directory(tmp_path):
    (tmp_path / "rankfail.py").write_text(FAILS_ON_RANK_1)
    done = torchrun("evaluate", "--model", "rankfail:Net", "--out", "runs/mine", *TINY, "--suite", "quick",
                    "--samples", "16", cwd=tmp_path)
    assert done.returncode != 0
    assert not (tmp_path / "runs" / "mine").exists()
    left = sorted(p.name for p in (tmp_path / "runs").iterdir()) if (tmp_path / "runs").exists() else []
    assert left == []  # no staging folder either


TEARDOWN = textwrap.dedent("""
    import os

    import torch
    from torch import nn

    from gradguard.runtime import distributed

    def gloo_threads():
        names = [open(f"/proc/self/task/{task}/comm").read() for task in os.listdir("/proc/self/task")]
        return sum(name.startswith(("pt_gloo", "gloo")) for name in names)

    def train():  # as the Trainer wraps its model, then hands rank 0's result to every rank
        model = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
        model(torch.ones(3, 4)).sum().backward()
        return distributed.broadcast_object(distributed.rank())

    distributed.setup(torch.device("cpu"))
    assert train() == 0
    running = gloo_threads()
    distributed.teardown()
    print(f"rank {os.environ['RANK']}: {running} gloo threads before teardown, {gloo_threads()} after", flush=True)
""")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_teardown_joins_the_gloo_threads_after_ddp(tmp_path):
    """The cause of a random SIGABRT at exit ("terminate called without an active exception"): a gloo worker
    thread still alive when the interpreter exits. DistributedDataParallel imports torch._dynamo, which imported
    while the group is up keeps the group alive after destroy_process_group (a default argument), so its threads
    were never joined. After teardown none may be left."""
    (tmp_path / "teardown.py").write_text(TEARDOWN)
    done = torchrun_script(tmp_path / "teardown.py")
    assert done.returncode == 0, done.stderr[-3000:]
    # the two ranks print to one pipe: their lines may interleave
    counts = re.findall(r"rank (\d): (\d+) gloo threads before teardown, (\d+) after", done.stdout)
    assert sorted(rank for rank, _, _ in counts) == ["0", "1"], done.stdout
    for rank, before, after in counts:
        assert int(before) > 0 and int(after) == 0, (rank, before, after)  # they ran, and teardown joined them


@pytest.mark.slow
def test_an_error_under_torchrun_exits_cleanly(tmp_path):
    """A refused --out on every rank: exit status 1 from the error itself (no rank aborted at exit), one line."""
    (tmp_path / "run").mkdir()
    done = torchrun("train", "--out", tmp_path / "run", *TINY, "--epochs", "1", "--train-samples", "100",
                    "--samples", "50", "--depth", "1", "--width", "8", "--val-attack", "none")
    assert done.returncode == 1
    assert done.stderr.count("already exists") == 1, done.stderr[-3000:]
    assert "terminate called" not in done.stderr and "SIGABRT" not in done.stderr, done.stderr[-3000:]
    assert list((tmp_path / "run").iterdir()) == []
