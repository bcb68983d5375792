"""The command line at its edges of the process: a reader that closes the pipe early (a quiet exit, never a
traceback) and ``--threads N`` (torch's CPU threads for one command, restored when ``main`` returns)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradguard.cli import main
from gradguard.cli.common import EXIT_CLOSED_PIPE

SRC = str(Path(__file__).resolve().parents[1] / "src")


def gradguard(*argv: str, **kwargs) -> subprocess.Popen:
    """``gradguard ARGV`` as a real process, this checkout's code first on the path."""
    path = os.pathsep.join([SRC] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "gradguard.cli", *argv], env=env, **kwargs)


# ------------------------------------------------------------------------------------------------ closed pipes
def test_json_into_a_pipe_closed_before_it_is_written_is_a_quiet_exit():
    # The reader is gone before gradguard writes (as `| head -1` is, once it has its line): the write fails for sure.
    process = gradguard("list", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0
    assert err == ""


def test_a_reader_that_closes_after_one_line_gets_its_line_and_a_quiet_exit():
    process = gradguard("list", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.readline()
    process.stdout.close()
    err = process.stderr.read().decode()
    assert first == b"{\n"
    assert process.wait(timeout=120) == 0
    assert err == ""


def test_progress_into_a_closed_pipe_stops_the_command_quietly(tmp_path):
    # `gradguard demo 2>&1 | head -1`: the demo's progress notes go to stderr; the reader takes the first and leaves.
    # The next note meets the closed pipe: the work stops as at Ctrl-C (nothing half-written is kept), exit 141.
    out = tmp_path / "demo"
    process = gradguard("demo", "--quick", "--out", str(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = process.stderr.readline()
    process.stderr.close()
    assert first.startswith(b"[demo]")
    assert process.wait(timeout=600) == EXIT_CLOSED_PIPE
    assert not out.exists() and list(tmp_path.iterdir()) == []


class ClosedPipe:
    """A stream whose reader has gone: every write raises BrokenPipeError (and it has no file descriptor)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        pass


def test_main_in_process_returns_quietly_when_stdout_and_stderr_are_closed(monkeypatch):
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    monkeypatch.setattr(sys, "stderr", ClosedPipe())
    assert main(["list", "--json"]) == 0
    # an error message that cannot be shown still gives the error's status, not a traceback
    assert main(["evaluate", "/nonexistent/run"]) == 1


# ------------------------------------------------------------------------------------------------ --threads
@pytest.fixture
def two_threads():
    """Start from a thread count --threads 1 visibly changes; put the test process's own back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_threads_flag_sets_torch_threads_for_the_command_and_restores_them(monkeypatch, capsys, two_threads):
    from gradguard.cli import listing

    seen = []
    real = listing.run
    monkeypatch.setattr(listing, "run", lambda args: (seen.append(torch.get_num_threads()), real(args))[1])
    assert main(["list", "--threads", "1"]) == 0
    assert seen == [1]
    assert torch.get_num_threads() == 2  # main() put the caller's count back
    assert main(["list"]) == 0
    assert seen == [1, 2]  # default: torch's own, untouched


def test_threads_from_a_config_file_reach_the_run_manifest(tmp_path, capsys, two_threads):
    config = tmp_path / "gradguard.toml"
    config.write_text('threads = 1\n[train]\nepochs = 1\ntrain-samples = 64\nsamples = 16\nval_attack = "none"\n')
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)["manifest"]
    assert manifest["threads"] == 1
    assert json.loads((tmp_path / "run" / "run.json").read_text())["threads"] == 1
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_thread_count_is_a_one_line_error(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--threads", value, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "--threads" in err and "Traceback" not in err
    config = tmp_path / "bad.toml"
    config.write_text(f'threads = "{value}"\n')
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "threads" in err
    assert not (tmp_path / "run").exists()
