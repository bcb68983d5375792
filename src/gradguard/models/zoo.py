"""The model zoo: ``build_model(name, **kwargs)``. Every builder takes ``input_shape`` and ``num_classes``."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..checks import positive_int
from ..errors import ConfigError
from .base import Stats, make_source, normalise, parse_stats, record

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU,
               "leaky_relu": nn.LeakyReLU, "elu": nn.ELU}
INITS = ("default", "he", "xavier", "normal", "large")


def _flat_size(module: nn.Module, input_shape: Sequence[int]) -> int:
    with torch.no_grad():
        return int(module(torch.zeros(1, *input_shape)).flatten(1).shape[1])


def _initialise(model: nn.Module, init: str, activation: str) -> None:
    """Weight init for Linear/Conv layers: "default" (PyTorch's), "he" (Kaiming normal, He et al. 2015),
    "xavier" (Glorot normal, Glorot & Bengio 2010), "normal" (N(0, 0.01²), the classic too-small init
    that makes deep sigmoid nets vanish) or "large" (N(0, 1): saturates tanh, blows up deep ReLU nets).
    Biases start at zero except for "default" and "large" (which keep PyTorch's)."""
    if init == "default":
        return
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if init == "he":
                if activation == "leaky_relu":
                    nn.init.kaiming_normal_(module.weight, nonlinearity="leaky_relu")
                else:
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif init == "xavier":
                known = activation in ("relu", "tanh", "sigmoid")
                gain = nn.init.calculate_gain(activation) if known else 1.0  # type: ignore[arg-type]
                nn.init.xavier_normal_(module.weight, gain=gain)
            else:
                nn.init.normal_(module.weight, std=1.0 if init == "large" else 0.01)
            if module.bias is not None and init != "large":
                nn.init.zeros_(module.bias)


def _check_choice(value: str, choices, argument: str) -> str:
    if value not in choices:
        raise ConfigError(f"{argument}: expected one of {sorted(choices)}, got {value!r}")
    return value


def mlp(*, depth: int = 3, width: int = 128, activation: str = "relu", init: str = "default", norm: bool = False,
        bias: float | None = None, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """Fully connected net: Flatten → ``depth`` hidden layers of ``width`` units with ``activation`` → logits.

    ``norm`` puts a BatchNorm1d between each hidden Linear and its activation. ``bias`` sets every hidden bias
    to that constant after ``init`` (e.g. -5 starts a ReLU net with dead units: a diagnostics test case)."""

    positive_int(depth, "depth"), positive_int(width, "width")
    _check_choice(activation, ACTIVATIONS, "activation"), _check_choice(init, INITS, "init")
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = int(torch.tensor(input_shape).prod())
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width)] + ([nn.BatchNorm1d(width)] if norm else []) + [ACTIVATIONS[activation]()]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    model = nn.Sequential(*layers)
    _initialise(model, init, activation)
    if bias is not None:
        for layer in layers[1:-1]:
            if isinstance(layer, nn.Linear):
                nn.init.constant_(layer.bias, float(bias))
    return model


def fmnist_cnn(*, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, width: int = 1) -> nn.Module:
    """The (Fashion-)MNIST CNN of Wong & Kolter (2018) and fast AT (Wong et al. 2020):
    Conv16 4×4/s2 → Conv32 4×4/s2 → FC100 → FC ``num_classes``, ReLU between; ``width`` multiplies every
    layer's size (1 = the paper's network)."""

    w = positive_int(width, "width")
    features = nn.Sequential(nn.Conv2d(input_shape[0], 16 * w, 4, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(16 * w, 32 * w, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten())
    return nn.Sequential(*features, nn.Linear(_flat_size(features, input_shape), 100 * w), nn.ReLU(),
                         nn.Linear(100 * w, num_classes))


def small_cnn(*, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, width: int = 32) -> nn.Module:
    """The 4-conv "SmallCNN" of Carlini & Wagner (2017) / TRADES (2019): 2×Conv(w) → pool → 2×Conv(2w) → pool →
    FC200 → FC200 → logits. Convs use padding 1 so 8×8 inputs work too."""
    c = input_shape[0]
    features = nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    return nn.Sequential(*features, nn.Linear(_flat_size(features, input_shape), 200), nn.ReLU(),
                         nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, num_classes))


class _PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016, "Identity mappings in deep residual networks")."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for 32×32 inputs (the standard CIFAR adversarial-training backbone, Rice et al. 2020).
    Global average pooling makes it accept other sizes too; ``width`` scales the channels (64 by default)."""

    def __init__(self, *, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], width, 3, stride=1, padding=1, bias=False)
        blocks, in_planes = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2 ** stage
            for block_stride in (stride, 1):
                blocks.append(_PreActBlock(in_planes, planes, block_stride))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


MODELS = {"mlp": mlp, "fmnist-cnn": fmnist_cnn, "small-cnn": small_cnn, "preact-resnet18": PreActResNet18}
SPEC_ATTRIBUTE = "gradguard_spec"


def list_models() -> list[str]:
    """Names accepted by ``build_model``."""
    return sorted(MODELS)


def build_model(name: str, *, mean: Stats | None = None, std: Stats | None = None, **kwargs) -> nn.Module:
    """Build a zoo model by name (see ``list_models()``); every builder takes ``input_shape`` and ``num_classes``.

    With ``mean``/``std`` the model is wrapped in ``Normalized`` so it takes pixel-space inputs. The name and
    keyword arguments are recorded on the model (``model_spec``, ``model_source``) so ``save``/``load`` rebuild it.
    """
    if name not in MODELS:
        raise ConfigError(f"name: unknown model {name!r}; choose one of {list_models()}")
    mean, std = parse_stats(mean, std)
    if "input_shape" in kwargs:
        kwargs["input_shape"] = [int(v) for v in kwargs["input_shape"]]
    try:
        model = MODELS[name](**kwargs)
    except TypeError as error:
        raise ConfigError(f"{name}: invalid keyword arguments {sorted(kwargs)}: {error}") from None
    record(model, source=make_source(name, kwargs), spec={"name": name, "kwargs": dict(kwargs)})
    return normalise(model, mean, std)
