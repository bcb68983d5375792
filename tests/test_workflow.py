"""The run-directory workflow: results per threat (CLI and Python), config layering, --help examples."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cli_helpers import run_cli, train_tiny_run
from gradguard.cli import build_parser, main
from gradguard.workflow import merge_attack_results


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("workflow") / "run", eps=0.02, seed=2)


def test_worst_case_only_combines_results_at_the_same_threat(small_run, capsys):
    assert run_cli(capsys, "evaluate", small_run, "--suite", "quick", "--samples", "32")[0] == 0  # the run's eps 0.02
    assert run_cli(capsys, "attack", small_run, "--attack", "fgsm", "--samples", "32")[0] == 0
    code, out, _ = run_cli(capsys, "attack", small_run, "--attack", "pgd", "--eps", "0.5", "--samples", "32")
    assert code == 0 and "also kept in attacks.json: linf eps=0.02 (fgsm)" in out

    attacks = json.loads((small_run / "attacks.json").read_text())
    assert attacks["threat"]["eps"] == 0.5 and set(attacks["results"]) == {"pgd"}
    kept = attacks["other_threats"]  # the earlier eps is kept, not dropped
    assert [g["threat"]["eps"] for g in kept] == [0.02] and set(kept[0]["results"]) == {"fgsm"}

    code, out, _ = run_cli(capsys, "report", small_run)
    assert code == 0
    model = json.loads((small_run / "summary.json").read_text())["models"][0]
    robustness = json.loads((small_run / "robustness.json").read_text())
    fgsm = kept[0]["results"]["fgsm"]["correct"]
    combined = [bool(a and b) for a, b in zip(robustness["samples"]["robust"], fgsm, strict=True)]
    assert model["threat"]["eps"] == 0.02 and set(model["attacks"]) == {"fgsm"}
    assert model["robust_accuracy"] == pytest.approx(sum(combined) / len(combined))
    pgd_far = attacks["results"]["pgd"]["robust_accuracy"]
    assert pgd_far < model["robust_accuracy"]  # so a mixed-up headline would have shown the eps=0.5 number
    assert [(g["label"], set(g["attacks"])) for g in model["other_threats"]] == [("linf eps=0.5", {"pgd"})]
    assert model["other_threats"][0]["robust_accuracy"] == pytest.approx(pgd_far)

    assert "threat: linf eps=0.02" in out and "or at other threats" in out and "linf eps=0.5" in out
    markdown = (small_run / "report.md").read_text()
    assert "- threat: linf eps=0.02" in markdown and "## Results on other samples or at other threats" in markdown
    assert "| linf eps=0.5 |" in markdown
    html = (small_run / "report.html").read_text()
    assert 'id="other-threats"' in html and "single attacks at linf eps=0.5" in html


def test_attack_results_merge_per_threat_and_samples():
    def group(eps, labels, **results):
        return {"threat": {"norm": "linf", "eps": eps}, "n_samples": len(labels), "clean_accuracy": 1.0,
                "labels": labels, "results": {name: {"robust_accuracy": v} for name, v in results.items()}}

    first = merge_attack_results(None, group(0.1, [0, 1], fgsm=0.5), "digits")
    second = merge_attack_results(first, group(0.1, [0, 1], pgd=0.25), "digits")  # same threat, same samples
    assert set(second["results"]) == {"fgsm", "pgd"} and second["other_threats"] == []
    third = merge_attack_results(second, group(0.2, [0, 1], pgd=0.0), "digits")  # another eps: kept apart
    assert set(third["results"]) == {"pgd"} and third["threat"]["eps"] == 0.2
    assert [(g["threat"]["eps"], set(g["results"])) for g in third["other_threats"]] == [(0.1, {"fgsm", "pgd"})]
    fourth = merge_attack_results(third, group(0.1, [1, 1, 0], bim=0.5), "digits")  # same eps, other samples
    assert set(fourth["results"]) == {"bim"}
    assert [(g["threat"]["eps"], set(g["results"])) for g in fourth["other_threats"]] == [(0.2, {"pgd"})]


def test_top_level_config_keys_apply_only_to_commands_that_take_them(small_run, tmp_path, capsys):
    config = tmp_path / "gradguard.toml"  # the example of docs/cli.md
    config.write_text('seed = 1\neps = 0.1\n\n[train]\nmethod = "pgd"\nepochs = 20\nbatch-size = 64\n'
                      'clip_grad_norm = 1.0\n\n[evaluate]\nsuite = "standard"\ncurve = [0, 0.05, 0.1, 0.2]\n')
    code, out, err = run_cli(capsys, "list", "suites", "--config", config)
    assert code == 0 and out.startswith("suites:"), err
    code, _, err = run_cli(capsys, "report", small_run, "--config", config)
    assert code == 0, err
    args = build_parser().parse_args(["attack", str(small_run)])
    assert args.eps is None
    from gradguard.cli import parse_args

    assert parse_args(["attack", str(small_run), "--config", str(config)]).eps == 0.1
    assert parse_args(["evaluate", str(small_run), "--config", str(config)]).curve == "0,0.05,0.1,0.2"
    own_table = tmp_path / "own.toml"
    own_table.write_text("[evaluate]\nepochs = 3\n")  # a key in a command's own table must be one of its options
    code, _, err = run_cli(capsys, "evaluate", small_run, "--config", own_table)
    assert code == 1 and "unknown option(s) ['epochs']" in err and len(err.strip().splitlines()) == 1


def _commands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_subcommand_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    examples = help_text.split("examples:\n", 1)
    assert len(examples) == 2, f"`gradguard {command} --help` has no examples: section"
    lines = [line.strip() for line in examples[1].splitlines() if line.strip()]
    assert lines and all(line.startswith(f"gradguard {command}") for line in lines)


def test_attack_into_streams_batches_and_matches_a_recount(tmp_path):
    import torch

    from gradguard import workflow
    from gradguard.attacks import PGD
    from gradguard.data import open_split
    from gradguard.models import build_model
    from gradguard.threat import Linf

    samples = open_split("digits", "test")
    reads: list[int] = []
    get_batch = samples.get_batch
    samples.get_batch = lambda index: reads.append(len(index)) or get_batch(index)
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=list(samples.input_shape), num_classes=samples.num_classes).eval()
    payload = workflow.attack_into(tmp_path, model, samples, Linf(0.1), ["pgd"], samples=20, batch_size=8, steps=5,
                                   seed=0, device="cpu")
    assert reads and max(reads) <= 8 and payload["n_samples"] == 20  # never more than one batch in memory
    x, y = get_batch(list(range(20)))
    adversarial = torch.cat([PGD(model, Linf(0.1), steps=5, seed=0).run(x[i:i + 8], y[i:i + 8]).predictions
                             for i in range(0, 20, 8)])
    assert payload["results"]["pgd"]["correct"] == (adversarial == y).int().tolist()
    assert payload["labels"] == y.tolist()
