"""The report: a run directory of known numbers -> report.html / report.md / summary.json that show exactly them."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from gradguard.errors import CheckpointError
from gradguard.report import build_report, read_run


def write_model_run(folder: Path, label: str, clean: float, attacks: dict, worst: float, verdict: str) -> None:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"label": label, "dataset": "digits", "classes": ["0", "1", "2"],
                                                 "method": "standard", "threat": {"norm": "linf", "eps": 0.1}}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "train_loss": 1.0 / e, "val_clean_acc": clean})
                                                  + "\n" for e in (1, 2, 3)))
    labels = [0, 1, 2, 0] * 10  # both results record the same 40 samples, so the headline combines them
    (folder / "attacks.json").write_text(json.dumps({
        "threat": {"norm": "linf", "eps": 0.1}, "n_samples": 40, "clean_accuracy": clean, "labels": labels,
        "sample_set": {"start": 0, "count": 40},
        "results": {name: {"robust_accuracy": value, "mean_distance": 0.09} for name, value in attacks.items()}}))
    (folder / "robustness.json").write_text(json.dumps({
        "clean_accuracy": clean, "robust_accuracy": worst, "per_attack": {"apgd-ce": worst + 0.05, "apgd-t": worst},
        "per_class": {"0": {"clean": 1.0, "robust": 0.5}, "1": {"clean": 0.5, "robust": 0.25}},
        "n_samples": 40, "threat": {"norm": "linf", "eps": 0.1}, "suite": ["apgd-ce", "apgd-t"], "elapsed_s": 1.5,
        "samples": {"label": labels}, "sample_set": {"start": 0, "count": 40}}))
    (folder / "curve.json").write_text(json.dumps({"eps": [0.0, 0.05, 0.1], "robust_accuracy": [clean, 0.5, worst]}))
    (folder / "masking.json").write_text(json.dumps({"verdict": verdict, "checks": [
        {"name": "iterative-beats-single-step", "status": verdict, "evidence": {"fgsm": 0.4, "pgd": 0.3},
         "advice": "nothing to do"}]}))
    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 8, 8)).astype(np.float32)
    np.savez(folder / "examples.npz", x=x, x_adv=np.clip(x + 0.1, 0, 1), y=np.array([0, 1, 2, 0]),
             pred=np.array([0, 1, 2, 0]), pred_adv=np.array([1, 1, 0, 2]), classes=np.array(["0", "1", "2"]),
             attack=np.array("pgd"))


@pytest.fixture
def suite_run(tmp_path) -> Path:
    root = tmp_path / "run"
    write_model_run(root / "models" / "standard", "standard", 0.95, {"fgsm": 0.40, "bim": 0.30, "pgd": 0.25}, 0.20, "WARN")
    write_model_run(root / "models" / "robust", "robust", 0.90, {"fgsm": 0.75, "bim": 0.72, "pgd": 0.70}, 0.675, "PASS")
    gradients = root / "gradflow" / "sigmoid"
    gradients.mkdir(parents=True)
    (gradients / "gradflow.jsonl").write_text("".join(
        json.dumps({"step": step, "layer": layer, "numel": 100, "grad_norm": 10.0 ** (-depth)}) + "\n"
        for step in (0, 5) for depth, layer in enumerate(("3", "2", "1"))))
    (gradients / "diagnosis.json").write_text(json.dumps({"gradient_findings": [
        {"kind": "vanishing", "layer": "3", "evidence": {"ratio": 0.01}, "advice": "use ReLU"}]}))
    (root / "run.json").write_text(json.dumps({"command": "demo", "dataset": "digits",
                                               "threat": {"norm": "linf", "eps": 0.1}}))
    return root


def test_summary_holds_the_run_numbers(suite_run):
    build_report(suite_run)
    summary = json.loads((suite_run / "summary.json").read_text())
    by_label = {m["label"]: m for m in summary["models"]}
    assert by_label["standard"]["clean_accuracy"] == 0.95
    assert by_label["standard"]["attacks"] == {"fgsm": 0.40, "bim": 0.30, "pgd": 0.25}
    assert by_label["standard"]["robust_accuracy"] == 0.20 and by_label["standard"]["robust_accuracy_source"] == "suite"
    assert by_label["robust"]["masking_verdict"] == "PASS"
    assert summary["gradients"][0]["kinds"] == ["vanishing"]


def test_html_headline_table_shows_clean_per_attack_and_worst_case(suite_run):
    html = build_report(suite_run).read_text()
    headline = re.search(r'<table id="headline">(.*?)</table>', html, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", headline, re.S)
    assert "FGSM" in rows[0] and rows[0].index("FGSM") < rows[0].index("BIM") < rows[0].index("PGD")
    cells = {re.findall(r"<td>(.*?)</td>", row)[0]: re.sub(r"<[^>]+>", " ", row) for row in rows[1:]}
    assert set(cells) == {"standard", "robust"}
    for expected in ("95.0%", "40.0%", "30.0%", "25.0%", "20.0%", "WARN"):
        assert expected in cells["standard"]
    assert "67.5%" in cells["robust"] and "PASS" in cells["robust"]


def test_html_is_self_contained(suite_run):
    html = build_report(suite_run).read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    sources = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(sources) >= 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    for source in sources:  # every inline image decodes to a PNG
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for section in ("Adversarial examples", "Per-class robustness", "Gradient-masking checklist", "Gradient health",
                    "Training curves", "Run configuration"):
        assert section in html
    assert "iterative-beats-single-step" in html and "use ReLU" in html


def test_plots_and_markdown_written(suite_run):
    build_report(suite_run)
    names = {p.name for p in (suite_run / "plots").glob("*.png")}
    assert {"accuracy_vs_eps.png", "per_attack.png", "gradient_flow.png", "examples_0.png", "per_class_0.png"} <= names
    markdown = (suite_run / "report.md").read_text()
    assert "| standard | standard | 40 | 95.0% | 40.0% | 30.0% | 25.0% | 20.0% | WARN |" in markdown


def test_report_of_a_partial_run_says_what_is_missing(tmp_path):
    run = tmp_path / "partial"
    write_model_run(run, "only", 0.9, {"fgsm": 0.5}, 0.4, "PASS")
    (run / "masking.json").unlink()
    (run / "curve.json").unlink()
    html = build_report(run).read_text()
    assert "Masking checklist not run" in html and "No accuracy-vs-eps curve" in html
    assert read_run(run).models[0].label == "only"


def test_missing_or_corrupt_run_directory_is_a_checkpoint_error(tmp_path, suite_run):
    with pytest.raises(CheckpointError, match="no run directory"):
        build_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no gradguard results"):
        build_report(tmp_path / "empty")
    (suite_run / "models" / "standard" / "attacks.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="attacks.json.*not valid JSON"):
        build_report(suite_run)


def test_worst_case_combines_suite_and_single_attacks_per_sample(tmp_path):
    run = tmp_path / "run"
    write_model_run(run, "m", 1.0, {"fgsm": 0.75, "pgd": 0.75}, 0.75, "PASS")
    attacks = json.loads((run / "attacks.json").read_text())
    attacks.update(labels=[0, 1, 2, 0], n_samples=4, sample_set={"start": 0, "count": 4})
    attacks["results"]["fgsm"]["correct"] = [1, 0, 1, 1]
    attacks["results"]["pgd"]["correct"] = [1, 1, 1, 0]
    (run / "attacks.json").write_text(json.dumps(attacks))
    robustness = json.loads((run / "robustness.json").read_text())
    robustness.update(n_samples=4, sample_set={"start": 0, "count": 4},
                      samples={"label": [0, 1, 2, 0], "robust": [1, 1, 0, 1]})
    (run / "robustness.json").write_text(json.dumps(robustness))
    build_report(run)
    model = json.loads((run / "summary.json").read_text())["models"][0]
    assert model["robust_accuracy"] == 0.25  # only sample 0 survives the suite, FGSM and PGD
    assert model["robust_accuracy_source"] == "suite + single attacks, per sample"
    assert model["worst_case_over"] == ["suite (apgd-ce, apgd-t)", "FGSM", "PGD"]


@pytest.mark.parametrize("other", [{"samples": {"label": [2, 2, 2, 2], "robust": [1, 1, 1, 1]}},  # other labels
                                   {"sample_set": {"start": 4, "count": 4}},  # same labels, other indices
                                   {"samples": {"robust": [1, 1, 1, 1]}}])  # samples not recorded
def test_results_on_other_samples_are_never_mixed_into_the_headline(tmp_path, other):
    run = tmp_path / "run"
    write_model_run(run, "m", 1.0, {"fgsm": 0.5, "pgd": 0.5}, 0.75, "PASS")
    attacks = json.loads((run / "attacks.json").read_text())
    attacks.update(labels=[0, 1, 2, 0], n_samples=4, clean_accuracy=0.9, sample_set={"start": 0, "count": 4})
    (run / "attacks.json").write_text(json.dumps(attacks))
    robustness = json.loads((run / "robustness.json").read_text())
    robustness.update(n_samples=4, sample_set={"start": 0, "count": 4}, samples={"label": [0, 1, 2, 0]})
    robustness.update(other)
    (run / "robustness.json").write_text(json.dumps(robustness))
    html = build_report(run).read_text()
    model = json.loads((run / "summary.json").read_text())["models"][0]
    # not the lowest bound over both sets (0.5): the suite's own worst case, its clean accuracy, no single attacks
    assert (model["robust_accuracy"], model["clean_accuracy"], model["attacks"]) == (0.75, 1.0, {})
    [apart] = model["other_samples"]
    assert (apart["n_samples"], apart["clean_accuracy"], apart["attacks"]) == (4, 0.9, {"fgsm": 0.5, "pgd": 0.5})
    assert "and are shown apart" in html and 'id="other-threats"' in html


def test_fatal_gradient_findings_are_marked_fail(suite_run):
    diagnosis = suite_run / "gradflow" / "sigmoid" / "diagnosis.json"
    diagnosis.write_text(json.dumps({"gradient_findings": [
        {"kind": "nonfinite", "layer": "3", "evidence": {"first_step": 7}, "advice": "check the data"},
        {"kind": "lr_too_high", "layer": "(whole model)", "evidence": {"update_ratio": 0.4}, "advice": "lower it"}]}))
    html = build_report(suite_run).read_text()
    rows = {re.sub(r"<[^>]+>", " ", row).split()[2]: row for row in re.findall(r"<tr>(.*?)</tr>", html, re.S)
            if "sigmoid" in row and ("nonfinite" in row or "lr_too_high" in row)}
    assert 'class="badge FAIL"' in rows["nonfinite"] and 'class="badge WARN"' in rows["lr_too_high"]


BACKEND_KEPT = """
import sys
import matplotlib
matplotlib.use("svg")  # the user's own choice, e.g. a notebook's inline backend
from gradguard.evaluation import RobustnessCurve
from gradguard.report import build_report
build_report(sys.argv[1])
curve = RobustnessCurve(eps=[0.0, 0.1], robust_accuracy=[0.9, 0.5], clean_accuracy=0.9, n_samples=10,
                        threat={"norm": "linf", "eps": 0.1}, suite=["apgd-ce"], per_attack=[{}, {}], attacked=[9, 9],
                        elapsed_s=1.0)
curve.plot(sys.argv[2])
import torch
from gradguard.evaluation.certify import CertifyResult
certified = CertifyResult(prediction=torch.tensor([0, 1, -1]), radius=torch.tensor([0.5, 0.2, 0.0]),
                          labels=torch.tensor([0, 1, 1]), p_lower=torch.tensor([0.9, 0.7, 0.4]),
                          top_count=torch.tensor([90, 70, 40]), base_prediction=torch.tensor([0, 1, 0]), sigma=0.25,
                          n0=10, n=100, alpha=0.001, batch_size=100, seed=0, elapsed_s=1.0)
certified.plot(sys.argv[3])
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_plots_leave_the_users_matplotlib_backend_alone(suite_run, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", BACKEND_KEPT, str(suite_run), str(tmp_path / "curve.png"),
                           str(tmp_path / "certified.png")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "False"]  # backend unchanged, no pyplot state touched
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "certified.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (suite_run / "plots" / "per_attack.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_series_keeps_its_colour_in_every_plot(suite_run, monkeypatch):
    from matplotlib.axes import Axes
    from matplotlib.colors import to_hex

    (suite_run / "models" / "robust" / "curve.json").unlink()  # "robust" is the first bar, but has no curve
    for model in ("standard", "robust"):  # no per-class plot: its "clean" / "robust" bars are not the model "robust"
        robustness = json.loads((suite_run / "models" / model / "robustness.json").read_text())
        (suite_run / "models" / model / "robustness.json").write_text(json.dumps({**robustness, "per_class": {}}))
    (suite_run / "models" / "robust" / "gradflow.jsonl").write_text(
        (suite_run / "gradflow" / "sigmoid" / "gradflow.jsonl").read_text())
    seen: dict[str, set[str]] = {}
    for method in ("plot", "bar", "step"):
        original = getattr(Axes, method)

        def recording(self, *args, _original=original, **kwargs):
            if kwargs.get("label") and kwargs.get("color"):
                series = str(kwargs["label"]).split(" (layer")[0]
                seen.setdefault(series, set()).add(to_hex(kwargs["color"]))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Axes, method, recording)
    build_report(suite_run)
    assert {"standard", "robust", "sigmoid", "train_loss", "val_clean_acc"} <= set(seen)
    assert all(len(colours) == 1 for colours in seen.values()), seen  # accuracy vs eps, bars, gradient flow
    assert seen["standard"] != seen["robust"]


def test_gradient_flow_axis_counts_layers_not_module_positions(monkeypatch, tmp_path):
    """An MLP with 8 hidden layers in an nn.Sequential (Flatten, Linear, ReLU, ...) names its Linear layers 1, 3,
    ..., 17: the axis counts them 1-9 (8 hidden + output) and keeps the module names, which the findings use."""
    from matplotlib.axes import Axes

    from gradguard.diagnostics import plots as health_plots
    from gradguard.report import plots

    ticks: list[list[str]] = []
    original = Axes.set_xticks

    def recording(self, positions, labels=None, **kwargs):
        if labels is not None:
            ticks.append([str(label) for label in labels])
        return original(self, positions, labels, **kwargs)

    monkeypatch.setattr(Axes, "set_xticks", recording)
    names = [str(i) for i in range(1, 18, 2)]
    plots.gradient_flow({"relu-mlp": {name: [1e-3] for name in names}}, "grad_norm")
    assert [label.split("\n")[0] for label in ticks[-1]] == [str(i) for i in range(1, 10)]
    assert [label.split("\n")[1] for label in ticks[-1][1:]] == names[1:]
    records = [{"step": 0, "layer": name, "index": i, "forward_index": i, "type": "Linear", "grad_norm": 1e-3,
                "grad_max": 1e-3} for i, name in enumerate(names)]
    health_plots.plot_gradient_flow(records, tmp_path / "flow.png")
    assert ticks[-1][0] == "1: 1 Linear" and ticks[-1][-1] == "9: 17 Linear"


def test_masking_evidence_is_rounded_and_leaves_out_empty_fields(tmp_path):
    from gradguard.diagnostics.masking import format_evidence

    run = tmp_path / "run"
    write_model_run(run, "m", 0.9, {"pgd": 0.5}, 0.4, "PASS")
    evidence = {"fraction_zero_or_nonfinite": 0.012345678, "kind": None, "median_grad_l1": 0.004290154669433832,
                "mean_loss_at_step": {"0": 2.21547532081604, "5": 2.215618371963501}, "eps": [0.025, 0.05],
                "steps": 20, "finite": True}
    (run / "masking.json").write_text(json.dumps({"verdict": "PASS", "checks": [
        {"name": "gradients_nonzero", "status": "PASS", "evidence": evidence, "advice": "fine"}]}))
    html = build_report(run).read_text()
    row = re.search(r"<tr><td>gradients_nonzero</td>(.*?)</tr>", html, re.S).group(1)
    assert "kind" not in row and "None" not in row and "2.2154" not in row and "0.0042901" not in row
    for shown in ("fraction_zero_or_nonfinite=0.0123", "median_grad_l1=0.00429", "mean_loss_at_step={0: 2.22, 5: 2.22}",
                  "eps=[0.025, 0.05]", "steps=20", "finite=True"):
        assert shown in row
    assert ("kind", "None") not in format_evidence(evidence)


def test_checklist_accuracies_say_they_are_on_the_clean_correct_samples(tmp_path):
    run = tmp_path / "run"
    write_model_run(run, "m", 0.9, {"pgd": 0.5}, 0.4, "PASS")
    (run / "masking.json").write_text(json.dumps({"verdict": "PASS", "n_samples": 100, "settings": {"n_correct": 87},
                                                  "checks": [{"name": "iterative_beats_single_step", "status": "PASS",
                                                              "evidence": {"pgd_accuracy": 0.6, "pgd_steps": 20},
                                                              "advice": "fine"}]}))
    html = build_report(run).read_text()
    assert "pgd_accuracy on the 87 clean-correct samples=0.6" in html and "pgd_steps=20" in html
    assert "on the 87 of them classified correctly" in html
