"""Which samples a command uses, and which label each class gets: a source without a train/test split of its own
is evaluated whole (and says so), a split is stated with its counts, test-only layouts are accepted, ``--split``
is honoured; class lists (``classes.txt``, ``--classes``) set the label order, which is printed and recorded, and a
clean accuracy at chance level warns about it; a run directory's data path works from any directory."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from gradguard import Linf, evaluate
from gradguard.data import open_split
from gradguard.errors import ConfigError, DataError

MODULE = "gradguard_split_models"  # a name no installed package has
BRIGHT_MODULE = '''
import torch
import torch.nn as nn


class Bright(nn.Module):
    """Label 0 for dark images, label 1 for bright ones: right exactly when the classes are numbered dark, light."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        brightness = x.flatten(1).mean(1, keepdim=True) - 0.5
        return torch.cat([-brightness, brightness], 1) * self.scale
'''
BRIGHT = ["--model", f"{MODULE}:Bright"]


def dark_and_light(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` dark (0..0.4) then ``count`` bright (0.6..1) 2x2 images, uint8."""
    rng = np.random.default_rng(seed)
    dark = rng.uniform(0.0, 0.4, (count, 2, 2))
    light = rng.uniform(0.6, 1.0, (count, 2, 2))
    return (np.concatenate([dark, light]) * 255).round().astype(np.uint8), np.repeat([0, 1], count)


def write_folder(root: Path, names: tuple[str, str], count: int) -> Path:
    """``count`` dark PNGs in ``root/names[0]`` and ``count`` bright ones in ``root/names[1]``."""
    from PIL import Image

    images, labels = dark_and_light(count)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")
    return root


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Path:
    """1000 image files in two class subfolders, no train/test split."""
    return write_folder(tmp_path_factory.mktemp("data") / "flat", ("dark", "light"), 500)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    (tmp_path / f"{MODULE}.py").write_text(BRIGHT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def bright_model() -> torch.nn.Module:
    namespace: dict = {}
    exec(BRIGHT_MODULE, namespace)
    return namespace["Bright"]().eval()


# ------------------------------------------------------------------------------------------------ splits
def test_evaluating_a_flat_folder_uses_all_1000_files_and_says_so(workdir, flat, capsys):
    code, out, err = run_cli(capsys, "evaluate", *BRIGHT, "--dataset", f"folder:{flat}", "--suite", "fgsm",
                             "--out", "run")
    assert code == 0, err
    robustness = json.loads((workdir / "run" / "robustness.json").read_text())
    manifest = json.loads((workdir / "run" / "run.json").read_text())
    assert robustness["n_samples"] == 1000 and robustness["clean_accuracy"] == 1.0
    assert "1000 samples (all of the data)" in out
    assert f"all 1000 samples of folder:{flat}: it has no train/test split of its own" in err
    assert manifest["split"]["how"] == "all" and (manifest["split"]["n"], manifest["split"]["of"]) == (1000, 1000)
    run_cli(capsys, "report", "run")
    assert "all 1000 samples of folder:" in (workdir / "run" / "report.html").read_text()


def test_training_on_a_flat_folder_states_750_of_1000_and_evaluates_the_other_250(workdir, flat, capsys):
    code, _, err = run_cli(capsys, "train", "--dataset", f"folder:{flat}", "--epochs", "1", "--samples", "50",
                           "--out", "trained")
    assert code == 0, err
    assert "training on 750 of 1000 samples: the train part of a seeded 75/25 split" in err
    assert "validating on the other 250" in err
    manifest = json.loads((workdir / "trained" / "run.json").read_text())
    assert (manifest["split"]["n"], manifest["split"]["of"], manifest["split"]["how"]) == (750, 1000, "seeded")
    assert manifest["validation_split"]["n"] == 250
    code, out, err = run_cli(capsys, "evaluate", "trained", "--suite", "fgsm")
    assert code == 0, err
    assert json.loads((workdir / "trained" / "robustness.json").read_text())["n_samples"] == 250  # never the 750
    assert "250 test samples (of the 250 in a seeded split of 1000)" in out
    assert "the model was trained on the other part" in err
    run_cli(capsys, "report", "trained")
    assert "750 of 1000 samples" in (workdir / "trained" / "report.html").read_text()


@pytest.mark.parametrize("split, count", [("test", 250), ("train", 750), ("all", 1000)])
def test_split_option_is_honoured(workdir, flat, capsys, split, count):
    code, out, err = run_cli(capsys, "attack", *BRIGHT, "--dataset", f"folder:{flat}", "--attack", "fgsm",
                             "--split", split, "--out", "run")
    assert code == 0, err
    attacks = json.loads((workdir / "run" / "attacks.json").read_text())
    assert attacks["n_samples"] == count and attacks["split"]["split"] == split
    assert json.loads((workdir / "run" / "run.json").read_text())["split"]["n"] == count
    if split != "all":
        assert f"{count} of 1000 samples" in err
    code, _, err = run_cli(capsys, "attack", "run", "--attack", "fgsm")  # the run keeps the split it was made with
    assert code == 0 and json.loads((workdir / "run" / "attacks.json").read_text())["n_samples"] == count


def test_all_samples_come_in_a_seeded_order_that_starts_with_the_test_part(flat):
    everything, test = open_split(f"folder:{flat}", "all"), open_split(f"folder:{flat}", "test")
    files = [str(f) for f in everything.files]
    assert len(files) == len(set(files)) == 1000
    assert files[:250] == [str(f) for f in test.files]  # --samples N takes a random N, not the first class
    assert 0.3 < float(everything.targets()[:100].float().mean()) < 0.7


def test_split_all_is_refused_where_the_source_has_its_own_split(workdir, capsys):
    write_folder(workdir / "split" / "train", ("dark", "light"), 3)
    write_folder(workdir / "split" / "test", ("dark", "light"), 2)
    code, _, err = run_cli(capsys, "evaluate", *BRIGHT, "--dataset", "folder:split", "--split", "all",
                           "--out", "run")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "split:" in err
    assert not (workdir / "run").exists()
    with pytest.raises(ConfigError, match="split: cifar10 ships its own"):
        open_split("cifar10", "all")
    code, _, err = run_cli(capsys, "evaluate", *BRIGHT, "--dataset", "folder:split", "--suite", "fgsm",
                           "--out", "run")
    assert code == 0 and json.loads((workdir / "run" / "robustness.json").read_text())["n_samples"] == 4
    assert "4 samples: the test split that folder:split ships" in err


def test_test_only_folder_and_npy_are_accepted(workdir, capsys):
    write_folder(workdir / "only" / "test", ("dark", "light"), 5)
    (workdir / "arrays").mkdir()
    x, y = dark_and_light(6)
    np.save(workdir / "arrays" / "x_test.npy", x)
    np.save(workdir / "arrays" / "y_test.npy", y)
    for name, count in (("folder:only", 10), ("npy:arrays", 12)):
        code, out, err = run_cli(capsys, "evaluate", *BRIGHT, "--dataset", name, "--suite", "fgsm",
                                 "--out", f"run-{count}")
        assert code == 0, err
        robustness = json.loads((workdir / f"run-{count}" / "robustness.json").read_text())
        assert robustness["n_samples"] == count and robustness["clean_accuracy"] == 1.0
        assert f"all {count} samples of {name}: it holds only a test split" in err
    with pytest.raises(DataError, match="holds only a test/ folder"):
        open_split("folder:only", "train")
    with pytest.raises(DataError, match="holds only x_test.npy"):
        open_split("npy:arrays", "train")


def test_digits_keeps_its_fixed_split_and_says_so():
    test = open_split("digits")
    assert len(test) == 449 and test.split_info["how"] == "fixed"
    assert test.split_info["text"].startswith("449 of 1797 samples: the test part of the fixed seeded 75/25 split")


# ------------------------------------------------------------------------------------------------ class order
def test_classes_txt_and_classes_option_set_the_label_order(tmp_path):
    root = write_folder(tmp_path / "f", ("dark", "light"), 2)
    alphabetical = open_split(f"folder:{root}", "all")
    given = open_split(f"folder:{root}", "all", classes="light,dark")
    assert alphabetical.classes == ["dark", "light"] and given.classes == ["light", "dark"]
    label_of = {file.name: int(label) for file, label in zip(alphabetical.files, alphabetical.targets(), strict=True)}
    swapped = {name: 1 - label for name, label in label_of.items()}
    assert {file.name: int(label) for file, label in zip(given.files, given.targets(), strict=True)} == swapped
    (root / "classes.txt").write_text("light\ndark\n")
    listed = open_split(f"folder:{root}", "all")
    assert listed.classes == ["light", "dark"]
    assert {file.name: int(label) for file, label in zip(listed.files, listed.targets(), strict=True)} == swapped
    assert listed.class_source == str(root / "classes.txt")
    assert open_split(f"folder:{root}", "all", classes=["dark", "light"]).classes == ["dark", "light"]  # wins


def test_classes_option_changes_the_labels_on_the_command_line_and_is_recorded(workdir, capsys):
    write_folder(workdir / "f", ("dark", "light"), 4)
    code, _, err = run_cli(capsys, "evaluate", *BRIGHT, "--dataset", "folder:f", "--classes", "light,dark",
                           "--suite", "fgsm", "--out", "run")
    assert code == 0, err
    assert "classes (label name): 0 light, 1 dark — from the class list given (--classes" in err
    manifest = json.loads((workdir / "run" / "run.json").read_text())
    assert manifest["classes"] == ["light", "dark"] and manifest["class_source"].startswith("the class list given")
    assert json.loads((workdir / "run" / "robustness.json").read_text())["clean_accuracy"] == 0.0
    code, _, err = run_cli(capsys, "attack", "run", "--attack", "fgsm")  # the run reuses the class list it was given
    assert code == 0 and "0 light, 1 dark" in err
    run_cli(capsys, "report", "run")
    assert "0 → light, 1 → dark" in (workdir / "run" / "report.html").read_text()


@pytest.mark.parametrize("classes, problem", [("dark,light,cats", "no subfolder for ['cats']"),
                                              ("light", "subfolders ['dark'] not listed"),
                                              ("dark,dark,light", "listed more than once")])
def test_mismatched_classes_option_is_a_one_line_error(workdir, capsys, classes, problem):
    write_folder(workdir / "f", ("dark", "light"), 2)
    code, _, err = run_cli(capsys, "evaluate", *BRIGHT, "--dataset", "folder:f", "--classes", classes,
                           "--out", "run")
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "classes:" in err, err
    assert problem in err and not (workdir / "run").exists()


def test_npy_classes_option_names_the_labels(tmp_path):
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "x.npy", np.zeros((4, 2, 2), np.uint8))
    np.save(tmp_path / "a" / "y.npy", np.array([0, 1, 2, 1]))
    assert open_split(f"npy:{tmp_path / 'a'}", "all", classes="cat,dog,eel").classes == ["cat", "dog", "eel"]
    with pytest.raises(ConfigError, match="classes: 2 names given but the labels"):
        open_split(f"npy:{tmp_path / 'a'}", "all", classes="cat,dog")


# ------------------------------------------------------------------------------------------------ chance level
def test_chance_warning_fires_on_a_mislabelled_folder_and_not_on_a_correct_one(workdir, capsys):
    write_folder(workdir / "wrong", ("b_dark", "a_light"), 20)  # alphabetical: a_light = 0, but the model says 1
    write_folder(workdir / "right", ("dark", "light"), 20)
    model = bright_model()
    with pytest.warns(UserWarning, match="the likely cause is the class mapping"):
        report = evaluate(model, open_split("folder:wrong", "all"), Linf(eps=0.01), suite=["fgsm"])
    assert report.clean_accuracy == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate(model, open_split("folder:right", "all"), Linf(eps=0.01), suite=["fgsm"]).warnings == []
    code, out, err = run_cli(capsys, "evaluate", *BRIGHT, "--dataset", "folder:wrong", "--suite", "fgsm",
                             "--out", "wrong-run")
    assert code == 0 and "warning: clean accuracy 0.0 %" in out and "class mapping" in out
    code, _, err = run_cli(capsys, "attack", "wrong-run", "--attack", "fgsm")
    assert "class mapping" in err
    run_cli(capsys, "report", "wrong-run")
    assert "the likely cause is the class mapping" in (workdir / "wrong-run" / "report.html").read_text()
    (workdir / "wrong" / "classes.txt").write_text("b_dark\na_light\n")  # the fix the warning names
    code, out, err = run_cli(capsys, "evaluate", *BRIGHT, "--dataset", "folder:wrong", "--suite", "fgsm",
                             "--out", "fixed-run")
    robustness = json.loads((workdir / "fixed-run" / "robustness.json").read_text())
    assert code == 0 and robustness["clean_accuracy"] == 1.0 and robustness["warnings"] == []
    assert "chance" not in out + err


def test_chance_threshold_is_chance_plus_two_standard_errors():
    from gradguard.data import chance_threshold, chance_warning

    assert chance_threshold(10, 1000) == pytest.approx(0.1 + 2 * (0.09 / 1000) ** 0.5)
    assert chance_threshold(2, 4) == pytest.approx(0.75)  # capped: 4 samples at 100 % are no "chance level"
    assert chance_warning(1.0, 2, 4) is None
    assert chance_warning(0.11, 10, 1000) is not None and chance_warning(0.13, 10, 1000) is None
    assert "check the labels and the class order" in chance_warning(0.5, 2, 100, "npy:/d")
    assert chance_warning(None, 10, 100) is None and chance_warning(0.0, 1, 100) is None


# ------------------------------------------------------------------------------------------------ run directories
def test_attack_on_an_absolute_run_dir_works_from_another_directory(workdir, capsys, monkeypatch):
    (workdir / "data_npy").mkdir()
    x, y = dark_and_light(10)
    np.save(workdir / "data_npy" / "x.npy", x)
    np.save(workdir / "data_npy" / "y.npy", y)
    code, _, err = run_cli(capsys, "evaluate", *BRIGHT, "--dataset", "npy:data_npy", "--suite", "fgsm",
                           "--out", "run")
    assert code == 0, err
    manifest = json.loads((workdir / "run" / "run.json").read_text())
    assert manifest["dataset"] == f"npy:{workdir / 'data_npy'}" and manifest["dataset_given"] == "npy:data_npy"
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(capsys, "attack", workdir / "run", "--attack", "fgsm")
    assert code == 0, err
    assert json.loads((workdir / "run" / "attacks.json").read_text())["n_samples"] == 20
    code, _, err = run_cli(capsys, "train", "--dataset", f"npy:{Path('..') / 'data_npy'}", "--epochs", "1",
                           "--samples", "5", "--out", "trained")
    assert code == 0, err
    assert json.loads((elsewhere / "trained" / "run.json").read_text())["dataset"] == f"npy:{workdir / 'data_npy'}"
    run_cli(capsys, "report", workdir / "run")
    assert "npy:data_npy" in (workdir / "run" / "report.html").read_text()  # the spelling the user gave


def test_an_old_run_dir_with_a_relative_data_path_still_loads_from_its_directory(workdir, capsys, monkeypatch):
    (workdir / "data_npy").mkdir()
    x, y = dark_and_light(4)
    np.save(workdir / "data_npy" / "x.npy", x)
    np.save(workdir / "data_npy" / "y.npy", y)
    assert run_cli(capsys, "evaluate", *BRIGHT, "--dataset", "npy:data_npy", "--suite", "fgsm", "--out", "run")[0] == 0
    manifest = json.loads((workdir / "run" / "run.json").read_text())
    for key in ("dataset_given", "split", "class_source"):
        manifest.pop(key, None)
    manifest["dataset"] = "npy:data_npy"  # as runs were written before data paths were stored absolute
    (workdir / "run" / "run.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "attack", "run", "--attack", "fgsm")
    assert code == 0, err
    assert json.loads((workdir / "run" / "attacks.json").read_text())["n_samples"] == 2  # its seeded test part, as then


def test_chance_level_of_plain_tensors_counts_the_models_outputs():
    class Picks(torch.nn.Module):  # ten logits: the input itself
        def forward(self, x):
            return x.flatten(1) * 10

    x = torch.zeros(50, 10)
    x[:20, 0], x[20:, 5] = 1.0, 1.0
    y = (torch.arange(50) >= 20).long()  # labels 0 and 1 only: right for the first 20 (40 %), chance is 1/10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = evaluate(Picks(), (x, y), Linf(eps=1e-3), suite=["fgsm"])
    assert report.clean_accuracy == pytest.approx(0.4) and report.warnings == []
    with pytest.warns(UserWarning, match="at or below chance level for 10 classes"):
        evaluate(Picks(), (x, torch.full((50,), 9)), Linf(eps=1e-3), suite=["fgsm"])
