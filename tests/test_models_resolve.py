"""Models from anywhere: ``resolve`` builds the user's own ``module:callable`` (and torchvision / timm / zoo / run
directories), loads foreign weights through their usual wrappers, normalises in pixel space, and records a source
that rebuilds the very same model — or says in one line which argument is wrong and how to fix it."""
from __future__ import annotations

import json
import pickle
import re
import sys
import types
import uuid

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gradguard import CheckpointError, ConfigError
from gradguard.models import Normalized, build_model, describe_source, load, model_source, resolve, resolve_source, save

USER_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width=4, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width * 4 * 4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def make_net(width=4, num_classes=3):
    return Net(width=width, num_classes=num_classes)


def broken(**kwargs):
    raise ValueError("needs a GPU")


def not_a_model():
    return [1, 2]


def head(activation):
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 3), activation)


NUMBER = 3
'''
SHAPE = (3, 4, 4)


@pytest.fixture
def user_module(tmp_path, monkeypatch, request):
    """Name of a fresh module holding USER_MODULE, in tmp_path (the cwd), which is not on sys.path yet."""
    name = f"usermodels_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    request.addfinalizer(lambda: sys.modules.pop(name, None))
    return name


@pytest.fixture
def inputs():
    return torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(0))


def _reference(user_module: str, **kwargs) -> nn.Module:
    """The user's Net with fixed random weights: what a checkpoint trained elsewhere would hold."""
    torch.manual_seed(1)
    return resolve(f"{user_module}:Net", **kwargs).eval()


def _same_logits(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("wrapping", ["plain", "state_dict", "module_prefix", "compiled_in_ddp", "model_key",
                                      "ema_only"])
def test_factory_with_pth_state_dict_loads_through_common_wrappers(user_module, tmp_path, inputs, wrapping):
    reference = _reference(user_module)
    tensors = reference.state_dict()
    stored = {
        "plain": tensors,
        "state_dict": {"state_dict": tensors, "epoch": 7, "optimizer": {"lr": 0.1}},
        "module_prefix": {f"module.{k}": v for k, v in tensors.items()},
        "compiled_in_ddp": {"model_state_dict": {f"module._orig_mod.{k}": v for k, v in tensors.items()}},
        "model_key": {"model": tensors, "args": {"width": 4}},
        "ema_only": {"state_dict_ema": tensors},
    }[wrapping]
    torch.save(stored, tmp_path / "net.pth")
    model = resolve(f"{user_module}:make_net", tmp_path / "net.pth")
    assert _same_logits(model, reference, inputs)
    source = model_source(model)
    assert source["spec"] == f"{user_module}:make_net" and source["weights"] == str(tmp_path / "net.pth")
    assert len(source["weights_sha256"]) == 64


def test_class_with_kwargs_is_built_with_them_and_recorded(user_module, tmp_path):
    model = resolve(f"{user_module}:Net", width=2, num_classes=5)
    assert model.conv.out_channels == 2 and model(torch.rand(1, *SHAPE)).shape == (1, 5)
    assert model_source(model) == {"spec": f"{user_module}:Net", "kwargs": {"width": 2, "num_classes": 5},
                                   "weights": None, "weights_sha256": None, "mean": None, "std": None,
                                   "module_file": str(tmp_path / f"{user_module}.py"), "logits": None}


def test_kwargs_json_cannot_hold_leave_the_model_unrecorded(user_module):
    model = resolve(f"{user_module}:head", activation=nn.Tanh())
    assert isinstance(model[2], nn.Tanh) and model_source(model) is None


def test_loading_a_run_without_the_users_module_says_where_it_was(user_module, tmp_path, monkeypatch):
    save(resolve(f"{user_module}:Net"), tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "run").mkdir()
    for name in ("model.safetensors", "model.json"):
        (elsewhere / "run" / name).write_bytes((tmp_path / "run" / name).read_bytes())
    (tmp_path / f"{user_module}.py").unlink()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    sys.modules.pop(user_module, None)
    with pytest.raises(ConfigError, match=f"model: no module '{user_module}'.*PYTHONPATH.*when recorded it was "
                                          f".*{user_module}.py.*needed to rebuild the model saved in"):
        load(elsewhere / "run")


def test_module_is_found_on_pythonpath_from_another_directory(user_module, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(resolve(f"{user_module}:Net"), nn.Module)


def test_safetensors_weights_load_into_a_callable(user_module, tmp_path, inputs):
    reference = _reference(user_module, width=3)
    save_file(reference.state_dict(), str(tmp_path / "net.safetensors"))
    model = resolve(f"{user_module}:Net", tmp_path / "net.safetensors", width=3)
    assert _same_logits(model, reference, inputs)


@pytest.mark.parametrize("mean, std, recorded", [
    (0.5, 0.25, (0.5, 0.25)),
    ((0.1, 0.2, 0.3), (0.5, 0.25, 0.2), ([0.1, 0.2, 0.3], [0.5, 0.25, 0.2])),
    ("0.1,0.2,0.3", 0.25, ([0.1, 0.2, 0.3], 0.25)),
    (torch.tensor([0.1, 0.2, 0.3]), torch.tensor(0.25), ([0.1, 0.2, 0.3], 0.25)),
])
def test_mean_std_wrap_in_normalized_and_match_manual_normalisation(user_module, tmp_path, inputs, mean, std,
                                                                    recorded):
    reference = _reference(user_module)
    torch.save(reference.state_dict(), tmp_path / "net.pth")
    model = resolve(f"{user_module}:Net", tmp_path / "net.pth", mean=mean, std=std).eval()
    assert isinstance(model, Normalized)
    mean_t, std_t = (torch.tensor(value).reshape(-1, 1, 1) for value in recorded)
    with torch.no_grad():
        assert torch.allclose(model(inputs), reference((inputs - mean_t) / std_t), atol=1e-6)
        assert not torch.allclose(model(inputs), reference(inputs), atol=1e-3)
    source = model_source(model)
    assert source["mean"] == pytest.approx(recorded[0]) and source["std"] == pytest.approx(recorded[1])
    assert isinstance(source["mean"], type(recorded[0]))  # one value stays one value; per channel stays a list


def test_save_then_load_rebuilds_a_callable_model_without_its_original_weights(user_module, tmp_path, inputs):
    reference = _reference(user_module, width=2)
    torch.save(reference.state_dict(), tmp_path / "net.pth")
    model = resolve(f"{user_module}:Net", tmp_path / "net.pth", mean=0.5, std=0.25, width=2)
    save(model, tmp_path / "run", dataset="cifar10")
    (tmp_path / "net.pth").unlink()  # the run directory is self-contained apart from the user's module
    sidecar = json.loads((tmp_path / "run" / "model.json").read_text())
    assert sidecar["source"]["spec"] == f"{user_module}:Net" and sidecar["source"]["kwargs"] == {"width": 2}
    loaded = load(tmp_path / "run")
    assert isinstance(loaded, Normalized) and _same_logits(loaded, model, inputs)
    again = resolve(tmp_path / "run")  # a run directory is a spec too
    assert _same_logits(again, model, inputs)
    assert model_source(again)["weights"] == str((tmp_path / "run" / "model.safetensors").resolve())


def test_model_source_round_trips_through_json_and_resolve_source(user_module, tmp_path, inputs):
    reference = _reference(user_module)
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "net.pth")
    model = resolve(f"{user_module}:make_net", str(tmp_path / "net.pth"), mean=[0.4, 0.5, 0.6], std=0.3)
    source = json.loads(json.dumps(model_source(model)))
    rebuilt = resolve_source(source)
    assert _same_logits(rebuilt, model, inputs)
    assert not _same_logits(resolve_source(source, with_weights=False), model, inputs)


def test_resolve_source_refuses_weights_changed_since_recorded(user_module, tmp_path):
    torch.save(_reference(user_module).state_dict(), tmp_path / "net.pth")
    source = model_source(resolve(f"{user_module}:Net", tmp_path / "net.pth"))
    torch.manual_seed(5)
    torch.save(sys.modules[user_module].Net().state_dict(), tmp_path / "net.pth")
    with pytest.raises(CheckpointError, match="weights: .*changed since it was recorded"):
        resolve_source(source)


def test_describe_source_is_one_human_line():
    source = {"spec": "mymodels:Net", "kwargs": {"width": 2}, "weights": "/data/net.pth",
              "weights_sha256": "1a2b3c4d" + "0" * 56, "mean": [0.49, 0.48, 0.45], "std": 0.25}
    assert describe_source(source) == ("mymodels:Net(width=2) + net.pth (sha256 1a2b3c4d…), normalised "
                                       "mean=(0.49, 0.48, 0.45) std=0.25")
    assert describe_source(model_source(build_model("mlp", depth=1, width=8))) == "mlp(depth=1, width=8)"


def test_zoo_name_with_weights_round_trips(tmp_path, inputs):
    zoo = build_model("mlp", depth=1, width=8, input_shape=list(SHAPE), num_classes=3)
    torch.save({"module." + k: v for k, v in zoo.state_dict().items()}, tmp_path / "mlp.pt")
    model = resolve("mlp", tmp_path / "mlp.pt", depth=1, width=8, input_shape=SHAPE, num_classes=3)
    assert _same_logits(model, zoo, inputs)
    assert model_source(model)["spec"] == "mlp" and model_source(model)["kwargs"]["input_shape"] == [3, 4, 4]
    assert _same_logits(resolve_source(model_source(model)), zoo, inputs)


def test_old_zoo_sidecar_without_source_still_loads(tmp_path, inputs):
    from safetensors.torch import save as to_bytes

    model = build_model("mlp", depth=1, width=8, input_shape=SHAPE, num_classes=3, mean=0.5, std=0.2)
    spec = {"name": "mlp", "kwargs": {"depth": 1, "width": 8, "input_shape": [3, 4, 4], "num_classes": 3,
                                      "mean": 0.5, "std": 0.2}}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "model.safetensors").write_bytes(to_bytes(tensors, metadata={"format": "gradguard-model",
                                                                             "model": json.dumps(spec)}))
    (tmp_path / "model.json").write_text(json.dumps({"format": "gradguard-model", "model": spec}))
    loaded = load(tmp_path)
    assert _same_logits(loaded, model, inputs) and model_source(loaded)["mean"] == 0.5


class _FakeHub:
    """Stand-in for torchvision / timm: records each call and builds a tiny net."""

    def __init__(self):
        self.calls: list = []

    def build(self, name, **kwargs):
        self.calls.append((name, kwargs))
        if name == "nope":
            raise ValueError(f"Unknown model {name}")
        return nn.Sequential(nn.Flatten(), nn.Linear(48, kwargs.get("num_classes", 1000)))


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_torchvision_and_timm_build_without_pretrained_weights(monkeypatch, package, inputs):
    hub = _FakeHub()
    fake = types.ModuleType(package)
    if package == "torchvision":
        fake.models = types.SimpleNamespace(get_model=hub.build)
    else:
        fake.create_model = hub.build
    monkeypatch.setitem(sys.modules, package, fake)
    model = resolve(f"{package}:resnet18", num_classes=4)
    assert model(inputs).shape == (5, 4)
    no_download = {"weights": None} if package == "torchvision" else {"pretrained": False}
    assert hub.calls == [("resnet18", {**no_download, "num_classes": 4})]
    assert model_source(model)["spec"] == f"{package}:resnet18"
    with pytest.raises(ConfigError, match=f"model: {package}:nope.*raised ValueError: Unknown model nope"):
        resolve(f"{package}:nope")


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_missing_package_names_what_to_install(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # import now raises ImportError, as when not installed
    with pytest.raises(ConfigError, match=f"model: '{package}:resnet18' needs the {package} package.*pip install "
                                          f"{package}"):
        resolve(f"{package}:resnet18")


def _error_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("spec, kwargs, argument, fix", [
    ("nosuchmodule_xyz:Net", {}, "model: no module 'nosuchmodule_xyz'", "PYTHONPATH"),
    ("{m}:Nett", {}, "model: module '{m}' .* has no 'Nett'", r"choose one of \['Net', 'broken', 'head', 'make_net', 'not_a_model'\]$"),
    ("{m}:broken", {}, r"model: {m}:broken\(\) raised ValueError: needs a GPU", "fix the factory"),
    ("{m}:not_a_model", {}, "model: {m}:not_a_model returned a list, not a torch.nn.Module", "return the model"),
    ("{m}:NUMBER", {}, "model: {m}:NUMBER is a int, not a callable", "factory function or an nn.Module class"),
    ("{m}:Net", {"depth": 3}, "model_kwargs: {m}:Net cannot take depth=3", r"its parameters are \(width=4"),
    ("resnet-9000", {}, "model: unknown model 'resnet-9000'", "package.module:callable"),
    ("src/{m}.py:Net", {}, "model: 'src/{m}.py:Net' names a file", "{m}:Net — and run from 'src'"),
])
def test_bad_model_specs_raise_one_line_naming_argument_and_fix(user_module, spec, kwargs, argument, fix):
    with pytest.raises(ConfigError) as error:
        resolve(spec.format(m=user_module), **kwargs)
    message = _error_line(error)
    assert re.search(argument.format(m=user_module), message), message
    assert re.search(fix.format(m=user_module), message), message


def test_pickled_checkpoint_gets_one_line_on_how_to_resave(user_module, tmp_path):
    torch.save(_reference(user_module), tmp_path / "whole_model.pth")  # a pickled nn.Module, not a state dict
    with pytest.raises(CheckpointError) as error:
        resolve(f"{user_module}:Net", tmp_path / "whole_model.pth")
    message = _error_line(error)
    assert message.startswith("weights: ") and "weights_only" in message
    assert "torch.save(model.state_dict(), path)" in message and "safetensors" in message


class _Exploit:
    def __reduce__(self):
        return (print, ("pickle payload executed",))


def test_pickle_payload_in_weights_is_never_run(user_module, tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"conv.weight": _Exploit()}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="weights: .*tensors-only"):
        resolve(f"{user_module}:Net", tmp_path / "evil.pt")
    assert "payload executed" not in capsys.readouterr().out


def test_weights_for_another_architecture_list_missing_unexpected_and_shapes(user_module, tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(128, 3))
    tensors = {**other.state_dict(), "fc.weight": torch.zeros(3, 64)}
    torch.save(tensors, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as error:
        resolve(f"{user_module}:Net", tmp_path / "other.pth")
    message = _error_line(error)
    assert message.startswith("weights: ") and "do not fit" in message
    assert "3 missing keys (conv.weight, conv.bias, fc.bias)" in message
    assert "4 unexpected keys (0.weight, 0.bias, 2.weight, 2.bias)" in message
    torch.save({**_reference(user_module).state_dict(), "fc.weight": torch.zeros(3, 10)}, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"1 shape mismatch \(fc.weight file \(3, 10\) vs model \(3, 64\)\)"):
        resolve(f"{user_module}:Net", tmp_path / "wide.pth")


@pytest.mark.parametrize("call, error_type, pattern", [
    (lambda tmp: resolve("mlp", tmp / "missing.pth"), CheckpointError, "weights: no file at"),
    (lambda tmp: resolve(tmp / "net.pth"), ConfigError, "model: .* holds weights, not an architecture"),
    (lambda tmp: resolve("runs/none/model.safetensors"), CheckpointError, "model: no run directory or file"),
    (lambda tmp: resolve("mlp", mean=0.5), ConfigError, "mean/std: give both"),
    (lambda tmp: resolve("mlp", mean=(0.5, 0.5), std=(1, 1, 1)), ConfigError, "mean/std: 2 means but 3 stds"),
    (lambda tmp: resolve("mlp", mean=0.5, std="wide"), ConfigError, "std: expected a number"),
    (lambda tmp: resolve(nn.Linear(2, 2), width=3), ConfigError, "model_kwargs: .* do not apply to an nn.Module"),
    (lambda tmp: resolve(build_model("mlp", mean=0.5, std=0.2), mean=0.5, std=0.2), ConfigError,
     "mean/std: the model already normalises"),
    (lambda tmp: resolve_source({"kwargs": {}}), ConfigError, "source: expected a record"),
])
def test_bad_weights_and_normalisation_arguments(tmp_path, call, error_type, pattern):
    torch.save({}, tmp_path / "net.pth")
    with pytest.raises(error_type, match=pattern) as error:
        call(tmp_path)
    _error_line(error)


def test_module_used_as_is_gets_weights_and_normalisation(tmp_path, inputs):
    plain = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    trained = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    model = resolve(plain, tmp_path / "w.safetensors", mean=0.0, std=1.0)
    assert model.model is plain and _same_logits(model, trained, inputs)
    assert model_source(model) is None  # nothing says how to rebuild an arbitrary object
