"""Models that return a dict, a tuple or a Hugging Face ``ModelOutput``, and the first-pass check of model and data.

One output adapter (``gradguard.models.select_logits`` / ``Logits``) serves every entry point: an output with
``logits`` is used automatically; any other output needs ``--logits KEY|INDEX`` (Python: ``Logits(model, key)``),
and without it the error names that option and shows the output. Before any work one forward pass checks that the
data, ``--mean``/``--std`` and the model's first layer agree on channels, and turns a model's exception into one
line naming the input shape.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cli_helpers import run_cli
from gradguard import Linf, Logits, ModelOutputError, ShapeError, certify, check_masking, evaluate
from gradguard.attacks import PGD
from gradguard.diagnostics.curvature import hessian_trace, input_curvature
from gradguard.models import Normalized, first_pass, resolve, select_logits
from gradguard.train import Trainer

MODULE = "gradguard_output_models"  # a user's own file, imported from the current directory
USER_MODULE = '''
import torch
from torch import nn


def body():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = body()

    def forward(self, x):
        return self.body(x)


class DictNet(Plain):
    def forward(self, x):
        return {"logits": self.body(x)}


class OutNet(Plain):
    def forward(self, x):
        return {"features": x.flatten(1), "out": self.body(x)}


class PairNet(Plain):
    def forward(self, x):
        return self.body(x), x.flatten(1)


class GrayConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def tiny_vit():
    """A Hugging Face image classifier built from a config (nothing downloaded)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                               num_labels=10))
'''
# how each user model is selected on the command line / in Python: (class, --logits, run.json's model_output)
USER_MODELS = {"dict": ("DictNet", None, "['logits']"), "key": ("OutNet", "out", "['out']"),
               "tuple": ("PairNet", "0", "[0]")}


@pytest.fixture
def user(tmp_path, monkeypatch):
    """The user's models in their own file in tmp_path (the current directory)."""
    (tmp_path / f"{MODULE}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    importlib.invalidate_caches()
    return importlib.import_module(MODULE)


def digits(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    from gradguard.data import open_split

    x, y = open_split("digits", "test").get_batch(np.arange(n))
    return x, y


# ------------------------------------------------------------------------------------------------
# The adapter itself
# ------------------------------------------------------------------------------------------------
class _Output:
    """An object with a logits attribute, as a ModelOutput without the dict."""

    def __init__(self, logits):
        self.logits = logits
        self.hidden = None


def test_select_logits_uses_logits_automatically_and_names_the_option_otherwise():
    z = torch.randn(3, 10)
    assert select_logits(z) is z
    assert select_logits({"logits": z, "aux": 1}) is z and select_logits(_Output(z)) is z
    assert select_logits((z, z[:, :2]), 0) is z and select_logits({"out": z}, "out") is z
    with pytest.raises(ModelOutputError, match=r"^model: the model returned a tuple of 2 \(Tensor\(3, 10\), "
                       r"Tensor\(3, 64\)\).*--logits 0 \(Python: gradguard.models.Logits\(model, 0\)\)"):
        select_logits((z, torch.randn(3, 64)))
    with pytest.raises(ModelOutputError, match=r"^model: .*dict \{'feat': Tensor\(3, 1\), 'out': Tensor\(3, 10\)\}"
                       r".*--logits out"):
        select_logits({"feat": torch.randn(3, 1), "out": z})
    with pytest.raises(ModelOutputError, match=r"^logits: the model's output has no \['nope'\].*--logits out"):
        select_logits({"out": z}, "nope")
    with pytest.raises(ModelOutputError, match=r"^logits: .*\[1\] is a tensor|^logits: the model's output has no"):
        select_logits((z,), 1)


# ------------------------------------------------------------------------------------------------
# Python entry points
# ------------------------------------------------------------------------------------------------
def adapted(user, kind: str) -> nn.Module:
    name, key, _ = USER_MODELS[kind]
    model = getattr(user, name)()
    return model if key is None else Logits(model, int(key) if key.isdigit() else key)


@pytest.mark.parametrize("kind", sorted(USER_MODELS))
def test_python_entry_points_see_the_logits(user, kind):
    x, y = digits()
    threat = Linf(eps=0.1)
    plain, model = user.Plain().eval(), adapted(user, kind).eval()
    reference = evaluate(plain, (x, y), threat, suite=["fgsm", "pgd"], seed=0)
    report = evaluate(model, (x, y), threat, suite=["fgsm", "pgd"], seed=0)
    assert report.clean_accuracy == reference.clean_accuracy and report.per_attack == reference.per_attack
    assert torch.equal(PGD(model, threat, steps=5, seed=0)(x, y), PGD(plain, threat, steps=5, seed=0)(x, y))
    masking = check_masking(model, (x, y), threat, n_samples=16, steps=3, square_queries=20, noise_draws=2)
    assert masking.checks and masking.to_dict()["n_samples"] == 16
    smoothed = certify(model, (x[:4], y[:4]), 0.25, n0=10, n=50, batch_size=50)
    assert torch.equal(smoothed.prediction, certify(plain, (x[:4], y[:4]), 0.25, n0=10, n=50, batch_size=50).prediction)
    torch.testing.assert_close(input_curvature(model, x[:8], y[:8]), input_curvature(plain, x[:8], y[:8]))
    assert hessian_trace(model, x[:8], y[:8], iters=3, seed=0).value == pytest.approx(
        hessian_trace(plain, x[:8], y[:8], iters=3, seed=0).value)


@pytest.mark.parametrize("kind", sorted(USER_MODELS))
def test_trainer_and_monitor_train_a_model_whose_output_is_not_a_tensor(user, kind, tmp_path):
    from gradguard import GradientMonitor
    from gradguard.models import read_safetensors

    x, y = digits(64)
    model = adapted(user, kind)
    monitor = GradientMonitor(model, every=1)
    trainer = Trainer(model, "standard", epochs=1, batch_size=32, run_dir=tmp_path / "run", seed=0, monitor=monitor)
    with monitor:
        history = trainer.fit((x, y), (x, y))
    assert history[0]["val_clean_acc"] is not None
    assert "body.1" in {r["layer"].removeprefix("model.") for r in monitor.records}
    # the adapter holds no weights: the run stores the user's model's own state dict, under its own names
    saved, _ = read_safetensors(tmp_path / "run" / "model.safetensors")
    assert set(saved) == set(user.Plain().state_dict())


@pytest.mark.parametrize("kind", ["key", "tuple"])
def test_python_entry_points_name_the_wrapper_for_a_tuple_or_other_key(user, kind):
    x, y = digits(8)
    model = getattr(user, USER_MODELS[kind][0])()
    for call in (lambda: evaluate(model, (x, y), Linf(eps=0.1), suite=["fgsm"]),
                 lambda: PGD(model, Linf(eps=0.1), steps=2)(x, y),
                 lambda: check_masking(model, (x, y), Linf(eps=0.1), n_samples=8),
                 lambda: certify(model, (x[:2], y[:2]), 0.25, n0=10, n=20),
                 lambda: Trainer(model, "standard", epochs=1).fit((x, y))):
        with pytest.raises(ModelOutputError, match=r"gradguard\.models\.Logits\(model, "):
            call()


# ------------------------------------------------------------------------------------------------
# Every command, with the model in the user's own file
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(USER_MODELS))
def test_every_command_runs_a_users_model_whose_output_is_not_a_tensor(user, kind, capsys, tmp_path):
    name, key, output = USER_MODELS[kind]
    run = tmp_path / "runs" / kind
    flags = ["--model", f"{MODULE}:{name}", "--out", run] + (["--logits", key] if key else [])
    code, _, err = run_cli(capsys, "evaluate", *flags, "--suite", "fgsm,pgd", "--samples", "24", "--json")
    assert code == 0, err
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["model_output"] == output and f"model output: {output}" in err
    if key is not None:  # recorded, so that later commands reload the model with the same selection
        assert str(manifest["model_source"]["logits"]) == key
    plain = evaluate(user.Plain().eval(), digits(24), Linf(eps=0.1), suite=["fgsm", "pgd"], seed=0)
    robustness = json.loads((run / "robustness.json").read_text())
    assert robustness["clean_accuracy"] == plain.clean_accuracy and robustness["per_attack"] == plain.per_attack

    code, _, err = run_cli(capsys, "attack", run, "--attack", "fgsm,pgd", "--samples", "24", "--steps", "5")
    assert code == 0, err
    assert run_cli(capsys, "diagnose", run, "--samples", "16", "--curvature")[0] == 0
    assert run_cli(capsys, "certify", run, "--sigma", "0.25", "--samples", "4", "--n0", "10", "--n", "50")[0] == 0
    code, _, err = run_cli(capsys, "report", run)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["models"][0]["label"] == f"{MODULE}:{name}"  # named after the model, not the run directory
    html = (run / "report.html").read_text()
    assert f"model output: {output}".replace("'", "&#x27;") in html and f"{MODULE}:{name}: clean" in html


@pytest.mark.parametrize("kind", ["key", "tuple"])
def test_cli_without_logits_names_the_flag_and_the_output_and_leaves_no_run(user, kind, capsys, tmp_path):
    run = tmp_path / "runs" / kind
    for command in ("evaluate", "attack", "diagnose", "certify"):
        extra = ["--sigma", "0.25"] if command == "certify" else []
        code, _, err = run_cli(capsys, command, "--model", f"{MODULE}:{USER_MODELS[kind][0]}", "--out", run, *extra)
        assert code != 0 and len(err.strip().splitlines()) == 1, err
        assert "--logits " in err and "Tensor(2, 10)" in err and "Tensor(2, 64)" in err and "Traceback" not in err
        assert not run.exists() and not list(run.parent.glob(f".{kind}*"))
    code, _, err = run_cli(capsys, "train", "--model", f"{MODULE}:{USER_MODELS[kind][0]}", "--out", run, "--epochs", "1")
    assert code != 0 and "--logits " in err and not run.exists()


def test_train_takes_mean_std_and_logits_and_later_commands_reload_the_selection(user, capsys, tmp_path):
    run = tmp_path / "trained"
    code, _, err = run_cli(capsys, "train", "--model", f"{MODULE}:PairNet", "--logits", "0", "--mean", "0.5", "--std",
                           "0.25", "--out", run, "--epochs", "1", "--train-samples", "128", "--samples", "32",
                           "--monitor", "--monitor-every", "2")
    assert code == 0, err
    source = json.loads((run / "model.json").read_text())["source"]
    assert source["logits"] == 0 and source["mean"] == 0.5 and source["std"] == 0.25
    assert json.loads((run / "run.json").read_text())["model_output"] == "[0]"
    assert run_cli(capsys, "attack", run, "--attack", "fgsm", "--samples", "16")[0] == 0
    code, _, err = run_cli(capsys, "train", "--model", "mlp", "--mean", "0.5,0.5", "--std", "0.25", "--out",
                           tmp_path / "bad", "--epochs", "1")
    assert code != 0 and "the data has 1 channel, --mean/--std have 2 values" in err
    assert not (tmp_path / "bad").exists()


def test_a_hugging_face_classifier_in_the_users_file_goes_through_every_command(user, capsys, tmp_path):
    pytest.importorskip("transformers")
    run = tmp_path / "runs" / "vit"
    code, _, err = run_cli(capsys, "evaluate", "--model", f"{MODULE}:tiny_vit", "--out", run, "--suite", "fgsm,pgd",
                           "--samples", "16")
    assert code == 0, err
    assert "model output: .logits" in err and json.loads((run / "run.json").read_text())["model_output"] == ".logits"
    reference = evaluate(user.tiny_vit().eval(), digits(16), Linf(eps=0.1), suite=["fgsm", "pgd"], seed=0)
    assert json.loads((run / "robustness.json").read_text())["clean_accuracy"] == reference.clean_accuracy
    for argv in (("attack", run, "--attack", "pgd", "--samples", "16", "--steps", "3"),
                 ("diagnose", run, "--samples", "8"),
                 ("certify", run, "--sigma", "0.25", "--samples", "2", "--n0", "10", "--n", "30"),
                 ("report", run)):
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, err
    assert "model output: .logits" in (run / "report.html").read_text()


# ------------------------------------------------------------------------------------------------
# Channels and the first pass
# ------------------------------------------------------------------------------------------------
def write_npy(folder: Path, channels: int, n: int = 16) -> str:
    rng = np.random.default_rng(0)
    folder.mkdir()
    np.save(folder / "x.npy", rng.random((n, channels, 8, 8)).astype(np.float32))
    np.save(folder / "y.npy", rng.integers(0, 10, n))
    return f"npy:{folder}"


def test_mean_std_with_more_values_than_the_data_has_channels_is_refused(user, capsys, tmp_path):
    x, _ = digits(4)
    wrapped = Normalized(user.Plain(), [0.5, 0.5], [0.25, 0.25])  # broadcasting made 1 channel into 2 before
    with pytest.raises(ShapeError, match=r"^mean/std: 2 values, one per channel, but the input has shape "):
        wrapped(x)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "evaluate", "--model", f"{MODULE}:GrayConv", "--mean", "0.5,0.5", "--std", "0.25",
                           "--out", run)
    assert code != 0 and not run.exists()
    assert err.strip() == ("gradguard: error: mean/std: the data has 1 channel, --mean/--std have 2 values, the "
                           "model's first layer expects 1; give --mean/--std one value per data channel (1) or a "
                           "single value for all")


def test_a_grayscale_model_on_rgb_data_fails_in_one_line_before_any_work(user, capsys, tmp_path):
    data = write_npy(tmp_path / "rgb", channels=3)
    for command in ("evaluate", "attack", "diagnose", "certify"):
        extra = ["--sigma", "0.25"] if command == "certify" else []
        code, _, err = run_cli(capsys, command, "--model", f"{MODULE}:GrayConv", "--dataset", data, "--out",
                               tmp_path / "run", *extra)
        assert code != 0 and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
        assert "the data has 3 channels" in err and "the model's first layer expects 1 (conv: Conv2d)" in err


def test_a_model_error_on_the_first_pass_is_one_line_naming_the_input_shape_and_chained(user, capsys, tmp_path):
    data = write_npy(tmp_path / "rgb", channels=3)
    code, _, err = run_cli(capsys, "evaluate", "--model", f"{MODULE}:Plain", "--dataset", data, "--out",
                           tmp_path / "run")
    assert code != 0 and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    assert "the first forward pass, on an input of shape (2, 3, 8, 8), raised RuntimeError: mat1 and mat2" in err
    with pytest.raises(ModelOutputError, match=r"input of shape \(2, 3, 8, 8\)") as error:
        first_pass(user.Plain(), torch.rand(2, 3, 8, 8))
    assert isinstance(error.value.__cause__, RuntimeError)  # the original stays visible in Python


def test_resolve_records_the_selection_and_a_run_directory_rebuilds_it(user, tmp_path):
    from gradguard.models import load, model_source, save

    model = resolve(f"{MODULE}:PairNet", logits=0, mean=0.5, std=0.25)
    assert model_source(model)["logits"] == 0 and isinstance(model, Logits)
    x, _ = digits(4)
    save(model, tmp_path / "run")
    again = load(tmp_path / "run")
    assert isinstance(again, Logits) and again.key == 0
    torch.testing.assert_close(again(x), model(x))
