"""What the commands print is true: what they wrote, what they skipped, what an unknown name could have been."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import run_cli, train_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("truths") / "run", eps=0.05, seed=4)


def test_diagnose_without_curvature_does_not_claim_the_curvature_plots(tiny_run, capsys):
    code, out, _ = run_cli(capsys, "diagnose", tiny_run, "--samples", "16", "--curvature")
    assert code == 0 and "plots/hessian_density.png" in out.splitlines()[-1]
    plot = tiny_run / "plots" / "hessian_density.png"
    before = plot.stat().st_mtime_ns
    code, out, _ = run_cli(capsys, "diagnose", tiny_run, "--samples", "16")
    wrote = out.splitlines()[-1]
    assert code == 0 and wrote.startswith("wrote ") and "masking.json" in wrote and "png" not in wrote
    assert "not measured now" in out and "top Hessian eigenvalue" not in out
    assert plot.stat().st_mtime_ns == before  # indeed untouched


def test_unknown_suite_lists_the_suites(tiny_run, capsys):
    from gradguard.evaluation import SUITES

    code, out, err = run_cli(capsys, "evaluate", tiny_run, "--suite", "strong", "--samples", "8")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "'strong' is neither a suite nor an attack" in lines[0]
    assert str(sorted(SUITES)) in lines[0] and "gradguard attack" in lines[0] and "apgd-ce" not in lines[0]


def test_attacks_the_norm_skips_are_named_in_the_table_and_the_report(tiny_run, capsys):
    code, out, _ = run_cli(capsys, "evaluate", tiny_run, "--suite", "fgsm,square", "--norm", "l1", "--eps", "2",
                           "--samples", "8")
    assert code == 0 and "square: skipped, does not support the l1 norm" in out
    assert json.loads((tiny_run / "robustness.json").read_text())["skipped"][0]["label"] == "square"
    code, out, _ = run_cli(capsys, "report", tiny_run)
    assert code == 0 and "square skipped: does not support the l1 norm" in out
    html = (tiny_run / "report.html").read_text()
    assert "square <small>(skipped: does not support the l1 norm)</small>" in html
    assert "square skipped: does not support the l1 norm" in html  # in the headline's worst-case line too
