"""Model zoo and safe checkpoints: every architecture builds by name, save/load round-trips exactly,
and nothing corrupt or pickled is ever loaded."""
from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from gradguard import CheckpointError, ConfigError, models
from gradguard.models import build_model, list_models, load, load_weights, save


@pytest.mark.parametrize("name", ["mlp", "fmnist-cnn", "small-cnn", "preact-resnet18"])
@pytest.mark.parametrize("input_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_zoo_model_builds_for_input_shape_and_classes(name, input_shape):
    kwargs = {"width": 4} if name == "preact-resnet18" else {}
    model = build_model(name, input_shape=input_shape, num_classes=7, **kwargs)
    assert model(torch.rand(3, *input_shape)).shape == (3, 7)
    assert models.model_spec(model)["name"] == name


def test_list_models_names_the_zoo():
    assert list_models() == ["fmnist-cnn", "mlp", "preact-resnet18", "small-cnn"]


def test_fmnist_cnn_is_the_papers_architecture():
    layers = [m for m in build_model("fmnist-cnn") if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [(type(m).__name__, getattr(m, "out_channels", getattr(m, "out_features", None))) for m in layers] == [
        ("Conv2d", 16), ("Conv2d", 32), ("Linear", 100), ("Linear", 10)]
    assert layers[0].kernel_size == (4, 4) and layers[0].stride == (2, 2)
    assert layers[2].in_features == 32 * 7 * 7


def test_mlp_depth_width_activation():
    model = build_model("mlp", depth=5, width=32, activation="sigmoid", input_shape=(1, 8, 8))
    assert sum(isinstance(m, nn.Linear) for m in model) == 6
    assert sum(isinstance(m, nn.Sigmoid) for m in model) == 5


def test_he_init_has_zero_bias_and_variance_two_over_fan_in():
    torch.manual_seed(0)
    model = build_model("mlp", depth=1, width=2000, init="he", input_shape=(1, 20, 20))
    first = model[1]
    assert torch.all(first.bias == 0)
    assert first.weight.var().item() == pytest.approx(2 / 400, rel=0.05)


def test_mlp_norm_bias_and_large_init_build_the_diagnostics_cases():
    torch.manual_seed(0)
    model = build_model("mlp", depth=2, width=500, norm=True, bias=-5.0, init="large", input_shape=(1, 20, 20))
    kinds = [type(m) for m in model]
    assert kinds == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert torch.all(model[1].bias == -5.0) and torch.all(model[4].bias == -5.0)
    assert not torch.all(model[7].bias == -5.0)  # the head keeps its own bias
    assert model[1].weight.std().item() == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("kwargs", [{"name": "resnet999"}, {"name": "mlp", "activation": "swishy"},
                                    {"name": "mlp", "init": "magic"}, {"name": "mlp", "depth": 0},
                                    {"name": "mlp", "colour": "red"}, {"name": "mlp", "mean": 0.5}])
def test_bad_model_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        build_model(**kwargs)


def _same_outputs(a: nn.Module, b: nn.Module, shape) -> bool:
    x = torch.rand(4, *shape)
    return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("target", ["dir", "file.safetensors"])
def test_save_then_load_rebuilds_the_same_model(tmp_path, target):
    model = build_model("small-cnn", input_shape=(1, 8, 8), width=4, mean=0.5, std=0.25)
    path = tmp_path / target
    save(model, path, dataset="digits", threat={"norm": "linf", "eps": 0.1})
    loaded = load(path)
    assert isinstance(loaded, models.Normalized)
    assert _same_outputs(model, loaded, (1, 8, 8))
    sidecar = (path / "model.json") if target == "dir" else path.with_suffix(".json")
    import json

    meta = json.loads(sidecar.read_text())
    assert meta["dataset"] == "digits" and meta["model"]["name"] == "small-cnn" and "torch" in meta["versions"]


def test_load_works_from_the_safetensors_header_without_sidecar(tmp_path):
    model = build_model("mlp", depth=1, width=8, input_shape=(1, 8, 8))
    path = save(model, tmp_path / "m.safetensors")
    path.with_suffix(".json").unlink()
    assert _same_outputs(model, load(path), (1, 8, 8))


def test_preact_resnet_batchnorm_buffers_round_trip(tmp_path):
    model = build_model("preact-resnet18", input_shape=(3, 8, 8), width=4)
    model.train()(torch.rand(8, 3, 8, 8))  # moves the BatchNorm running statistics
    save(model, tmp_path)
    assert _same_outputs(model, load(tmp_path), (3, 8, 8))


def test_missing_checkpoint_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no weights file"):
        load(tmp_path / "nothing")


def test_truncated_weights_raise_checkpoint_error(tmp_path):
    model = build_model("mlp", depth=1, width=8, input_shape=(1, 8, 8))
    path = save(model, tmp_path / "m.safetensors")
    path.with_suffix(".json").unlink()  # no hash to compare: the reader itself must notice
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load(path)


def test_replaced_weights_fail_the_sidecar_hash(tmp_path):
    save(build_model("mlp", depth=1, width=8, input_shape=(1, 8, 8)), tmp_path)
    other = tmp_path / "other"
    save(build_model("mlp", depth=1, width=8, input_shape=(1, 8, 8)), other)
    (tmp_path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="SHA-256"):
        load(tmp_path)


def test_plain_model_needs_load_weights(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    save(model, tmp_path)
    with pytest.raises(CheckpointError, match="load_weights"):
        load(tmp_path)
    fresh = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert _same_outputs(model, load_weights(fresh, tmp_path), (1, 8, 8))


def test_foreign_state_dict_loads_with_weights_only(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    fresh = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert _same_outputs(model, load_weights(fresh, tmp_path / "w.pt"), (1, 8, 8))


class _Exploit:
    def __reduce__(self):
        return (print, ("pickle payload executed",))


def test_pickled_objects_are_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Exploit()}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="tensors-only"):
        load_weights(nn.Linear(2, 2), path)
    assert "payload executed" not in capsys.readouterr().out


def test_wrong_architecture_raises_checkpoint_error(tmp_path):
    save(nn.Sequential(nn.Linear(64, 10)), tmp_path)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(nn.Sequential(nn.Linear(64, 5)), tmp_path)
