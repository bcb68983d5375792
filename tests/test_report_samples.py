"""One headline, one set of samples: the report never mixes numbers measured on different test samples."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cli_helpers import run_cli
from gradguard.cli import main

TINY_TRAIN = ["--epochs", "1", "--train-samples", "200", "--samples", "32", "--val-attack", "none", "--seed", "3"]


@pytest.fixture
def evaluated_run(tmp_path_factory, capsys) -> Path:
    """A tiny trained run evaluated on its first 20 test samples."""
    out = tmp_path_factory.mktemp("samples") / "run"
    assert main(["train", "--out", str(out), "--eps", "0.05", *TINY_TRAIN]) == 0
    assert run_cli(capsys, "evaluate", out, "--suite", "quick", "--samples", "20")[0] == 0
    return out


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["models"][0]


def test_plain_attack_after_evaluate_uses_the_runs_samples_and_one_headline(evaluated_run, capsys):
    code, out, _ = run_cli(capsys, "attack", evaluated_run, "--attack", "fgsm,pgd")
    assert code == 0 and "20 test samples (as many as the run's earlier results" in out
    attacks = json.loads((evaluated_run / "attacks.json").read_text())
    robustness = json.loads((evaluated_run / "robustness.json").read_text())
    assert attacks["n_samples"] == 20 and attacks["sample_set"] == robustness["sample_set"] == {"start": 0, "count": 20}

    code, out, _ = run_cli(capsys, "report", evaluated_run)
    assert code == 0
    model = summary_of(evaluated_run)
    assert model["n_samples"] == 20 and set(model["attacks"]) == {"fgsm", "pgd"} and model["other_samples"] == []
    combined = [bool(r and f and p) for r, f, p in zip(robustness["samples"]["robust"],
                                                       attacks["results"]["fgsm"]["correct"],
                                                       attacks["results"]["pgd"]["correct"], strict=True)]
    assert model["robust_accuracy"] == pytest.approx(sum(combined) / 20)
    assert model["clean_accuracy"] == robustness["clean_accuracy"] == attacks["clean_accuracy"]
    assert model["robust_accuracy_source"] == "suite + single attacks, per sample"
    assert "worst case over suite (apgd-ce), FGSM, PGD on the same 20 samples (per sample)" in out
    assert "on other samples" not in out


def test_attack_on_other_samples_is_shown_apart_with_its_count(evaluated_run, capsys):
    code, out, _ = run_cli(capsys, "attack", evaluated_run, "--attack", "fgsm,pgd", "--samples", "40")
    assert code == 0 and "40 test samples\n" in out
    code, out, _ = run_cli(capsys, "report", evaluated_run)
    assert code == 0
    robustness = json.loads((evaluated_run / "robustness.json").read_text())
    attacks = json.loads((evaluated_run / "attacks.json").read_text())
    model = summary_of(evaluated_run)
    # the headline is the suite's alone, on its 20 samples
    assert model["n_samples"] == 20 and model["attacks"] == {}
    assert model["clean_accuracy"] == robustness["clean_accuracy"]
    assert model["robust_accuracy"] == robustness["robust_accuracy"] and model["robust_accuracy_source"] == "suite"
    assert model["worst_case_over"] == ["suite (apgd-ce)"]
    # the single attacks are kept apart, labelled with their own count, clean accuracy and worst case
    [apart] = model["other_samples"]
    assert apart["n_samples"] == 40 and apart["clean_accuracy"] == attacks["clean_accuracy"]
    assert apart["attacks"] == {name: attacks["results"][name]["robust_accuracy"] for name in ("fgsm", "pgd")}

    assert "FGSM, PGD ran on another set of 40 samples and are shown apart" in out
    table = out.split("on other samples or at other threats (not in the worst case above):\n")[1]
    assert re.search(r"run\s+linf eps=0\.05\s+40\s", table)
    html = (evaluated_run / "report.html").read_text()
    headline = re.search(r'<table id="headline">(.*?)</table>(.*?)<table id="other-threats">', html, re.S)
    assert "FGSM" not in headline.group(1) and "20" in headline.group(1)
    caption = headline.group(2)
    assert "worst case over suite (apgd-ce) on the same 20 samples" in caption
    assert "and the single attacks" not in caption
    markdown = (evaluated_run / "report.md").read_text()
    assert re.search(r"\| run \| linf eps=0\.05 \| 40 \|", markdown)


def test_attack_on_other_samples_never_merges_into_earlier_results(evaluated_run, capsys):
    assert run_cli(capsys, "attack", evaluated_run, "--attack", "fgsm", "--samples", "40")[0] == 0
    assert run_cli(capsys, "attack", evaluated_run, "--attack", "pgd")[0] == 0  # the run's 20 evaluated samples
    attacks = json.loads((evaluated_run / "attacks.json").read_text())
    assert attacks["n_samples"] == 20 and set(attacks["results"]) == {"pgd"}
