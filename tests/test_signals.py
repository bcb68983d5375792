"""Stopping a command: SIGTERM is handled like Ctrl-C (the staging folder is removed, exit status 130), and a
staging folder left by a process killed outright (SIGKILL) is removed by the next run, while a live process's is
kept."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gradguard import workflow
from gradguard.cli.common import EXIT_INTERRUPTED

SRC = str(Path(__file__).resolve().parents[1] / "src")

SLOW_MODEL = textwrap.dedent("""
    import time
    from torch import nn

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

        def forward(self, x):
            time.sleep(0.02)  # every pass takes a while: the attack is still running when SIGTERM comes
            return self.net(x)
""")

# enters a staging folder for argv[1], prints its path, then waits (argv[2] == "wait") or dies by SIGKILL
STAGE = textwrap.dedent("""
    import os, signal, sys
    from gradguard import workflow

    context = workflow.staged_run_dir(sys.argv[1])  # kept referenced: collecting it would clean up
    staging = context.__enter__()
    print(staging, flush=True)
    if sys.argv[2] == "wait":
        sys.stdin.read()
    else:
        os.kill(os.getpid(), signal.SIGKILL)
""")


def _env(*paths: Path) -> dict:
    path = os.pathsep.join([SRC, *map(str, paths), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigterm_mid_run_removes_the_staging_folder_and_exits_interrupted(tmp_path):
    (tmp_path / "slowmodel.py").write_text(SLOW_MODEL)
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "gradguard.cli", "attack", "--model", "slowmodel:Slow", "--out", "runs/a",
               "--dataset", "digits", "--attack", "pgd", "--steps", "500", "--samples", "32", "--batch-size", "32",
               "--device", "cpu", "--seed", "0"]
    process = subprocess.Popen(command, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: process.poll() is not None or (runs.is_dir() and any(runs.iterdir())))
        assert process.poll() is None, process.communicate()[1][-2000:]
        staged = [p.name for p in runs.iterdir()]
        assert len(staged) == 1 and staged[0].startswith(".a.") and staged[0].endswith(".tmp"), staged
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert list(runs.iterdir()) == []  # neither runs/a nor the staging folder


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_a_dead_process_staging_folder_is_removed_and_a_live_ones_kept(tmp_path):
    (tmp_path / "stage.py").write_text(STAGE)
    runs = tmp_path / "runs"
    live_process = subprocess.Popen([sys.executable, str(tmp_path / "stage.py"), str(runs / "other"), "wait"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    try:
        live = Path(live_process.stdout.readline().strip())
        killed = subprocess.run([sys.executable, str(tmp_path / "stage.py"), str(runs / "demo"), "kill"],
                                capture_output=True, text=True, env=_env(), timeout=120)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        dead = Path(killed.stdout.strip())
        assert dead.is_dir() and live.is_dir() and dead.parent == live.parent == runs
        notes = runs / ".notes.tmp"  # not a staging folder of gradguard's: never touched
        notes.mkdir()
        with workflow.staged_run_dir(runs / "mine") as staging:
            (staging / "result.txt").write_text("done")
        assert not dead.exists()
        assert live.is_dir() and notes.is_dir()
        assert (runs / "mine" / "result.txt").read_text() == "done"
    finally:
        live_process.stdin.close()
        live_process.wait(timeout=60)
