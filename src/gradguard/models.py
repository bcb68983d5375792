"""Models: the ``Normalized`` wrapper (so eps lives in pixel space) and the model zoo by name."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn


class Normalized(nn.Module):
    """Wraps ``model`` so it takes pixel-space inputs: forward(x) = model((x - mean) / std).

    Attacks then measure eps in pixel space, the space users think in. ``mean``/``std`` are per channel
    (a sequence) or scalars; they are buffers, so they move with ``.to(device)``.
    """

    def __init__(self, model: nn.Module, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        super().__init__()
        self.model = model
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        if bool((std_t <= 0).any()):
            from .errors import ConfigError

            raise ConfigError(f"std: must be > 0, got {std!r}")
        shape = (1, -1, 1, 1) if mean_t.dim() == 1 and mean_t.numel() > 1 else ()
        self.register_buffer("mean", mean_t.reshape(shape) if shape else mean_t)
        self.register_buffer("std", std_t.reshape(shape) if shape else std_t)

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)


# ------------------------------------------------------------------------------------------------
# The model zoo: build_model(name, **kwargs). Every builder takes input_shape and num_classes.
# ------------------------------------------------------------------------------------------------
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
                nonlinearity = "leaky_relu" if activation == "leaky_relu" else "relu"
                nn.init.kaiming_normal_(module.weight, nonlinearity=nonlinearity)
            elif init == "xavier":
                gain = nn.init.calculate_gain(activation) if activation in ("relu", "tanh", "sigmoid") else 1.0
                nn.init.xavier_normal_(module.weight, gain=gain)
            else:
                nn.init.normal_(module.weight, std=1.0 if init == "large" else 0.01)
            if module.bias is not None and init != "large":
                nn.init.zeros_(module.bias)


def _check_choice(value: str, choices, argument: str) -> str:
    from .errors import ConfigError

    if value not in choices:
        raise ConfigError(f"{argument}: expected one of {sorted(choices)}, got {value!r}")
    return value


def mlp(*, depth: int = 3, width: int = 128, activation: str = "relu", init: str = "default", norm: bool = False,
        bias: float | None = None, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """Fully connected net: Flatten → ``depth`` hidden layers of ``width`` units with ``activation`` → logits.

    ``norm`` puts a BatchNorm1d between each hidden Linear and its activation. ``bias`` sets every hidden bias
    to that constant after ``init`` (e.g. -5 starts a ReLU net with dead units: a diagnostics test case)."""
    from .attacks.base import positive_int

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
    from .attacks.base import positive_int

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


def build_model(name: str, *, mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None,
                **kwargs) -> nn.Module:
    """Build a zoo model by name (see ``list_models()``); every builder takes ``input_shape`` and ``num_classes``.

    With ``mean``/``std`` the model is wrapped in ``Normalized`` so it takes pixel-space inputs. The name and
    keyword arguments are recorded on the model (``model.gradguard_spec``) so ``save``/``load`` can rebuild it.
    """
    from .errors import ConfigError

    if name not in MODELS:
        raise ConfigError(f"name: unknown model {name!r}; choose one of {list_models()}")
    if "input_shape" in kwargs:
        kwargs["input_shape"] = [int(v) for v in kwargs["input_shape"]]
    try:
        model = MODELS[name](**kwargs)
    except TypeError as error:
        raise ConfigError(f"{name}: invalid keyword arguments {sorted(kwargs)}: {error}") from None
    spec: dict = {"name": name, "kwargs": dict(kwargs)}
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ConfigError("mean/std: give both (per-channel input normalisation) or neither")
        model = Normalized(model, mean, std)
        spec["kwargs"].update(mean=_plain(mean), std=_plain(std))
    setattr(model, SPEC_ATTRIBUTE, spec)
    return model


def model_spec(model: nn.Module) -> dict | None:
    """The zoo name and kwargs a model was built with (unwrapping DDP/DataParallel), or None."""
    return getattr(unwrap(model), SPEC_ATTRIBUTE, None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _plain(value):
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)


# ------------------------------------------------------------------------------------------------
# Safe checkpoints: safetensors weights + a JSON sidecar; nothing is ever unpickled.
# ------------------------------------------------------------------------------------------------
WEIGHTS_FILE = "model.safetensors"
SIDECAR_FILE = "model.json"
FORMAT = "gradguard-model"


def _resolve_paths(path) -> tuple["Path", "Path"]:
    from pathlib import Path

    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / WEIGHTS_FILE, path / SIDECAR_FILE


def state_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict as contiguous CPU tensors that own their memory (safetensors rejects shared ones)."""
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in unwrap(model).state_dict().items()}


def save(model: nn.Module, path, **metadata) -> "Path":
    """Save weights to ``path`` (a run directory, or a ``.safetensors`` file) plus a JSON sidecar.

    The sidecar records the zoo name and kwargs (so ``load`` rebuilds the architecture), library versions,
    the SHA-256 of the weights file and any ``metadata`` (dataset, threat, method, ...). Both files are written
    atomically; the weights file also carries the spec in its safetensors header, so it is self-describing.
    """
    import json
    from datetime import datetime, timezone

    import safetensors
    from safetensors.torch import save as to_bytes

    from . import __version__
    from .io import atomic_write_bytes, atomic_write_json, sha256_file

    weights_path, sidecar_path = _resolve_paths(path)
    spec = model_spec(model)
    header = {"format": FORMAT, "model": json.dumps(spec)}
    atomic_write_bytes(weights_path, to_bytes(state_tensors(model), metadata=header))
    sidecar = {
        "format": FORMAT, "format_version": 1, "model": spec, "weights": weights_path.name,
        "sha256": sha256_file(weights_path), "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"gradguard": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__},
        **metadata,
    }
    atomic_write_json(sidecar_path, sidecar)
    return weights_path


def read_safetensors(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) from a safetensors file; CheckpointError if missing or corrupt."""
    from pathlib import Path

    from safetensors import safe_open

    from .errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"path: no weights file at {str(path)!r}; pass a run directory or a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises several types for truncated / garbled files
        raise CheckpointError(f"path: {str(path)!r} is not a valid safetensors file ({error}); "
                              "it may be truncated by a crash — use an earlier checkpoint") from None
    return tensors, header


def load(path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved with ``save`` (a run directory or a ``.safetensors`` file).

    The architecture comes from the sidecar's (or the header's) zoo name and kwargs; weights load strictly.
    Nothing is unpickled. Missing, corrupt or mismatching files raise ``CheckpointError``.
    """
    import json

    from .errors import CheckpointError
    from .io import sha256_file

    weights_path, sidecar_path = _resolve_paths(path)
    sidecar: dict = {}
    if sidecar_path.is_file():
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"path: sidecar {str(sidecar_path)!r} is not valid JSON ({error})") from None
        expected = sidecar.get("sha256")
        if expected and weights_path.is_file() and sha256_file(weights_path) != expected:
            raise CheckpointError(f"path: {str(weights_path)!r} does not match the SHA-256 in {sidecar_path.name}; "
                                  "the file is corrupt or was replaced")
    tensors, header = read_safetensors(weights_path)
    spec = sidecar.get("model") or (json.loads(header["model"]) if header.get("model") else None)
    if not spec or spec.get("name") not in MODELS:
        raise CheckpointError(
            f"path: {str(weights_path)!r} does not name a zoo architecture; build the model yourself and call "
            "gradguard.models.load_weights(model, path)")
    model = build_model(spec["name"], **spec.get("kwargs", {}))
    _load_state(model, tensors, weights_path)
    return model.to(map_location)


def load_weights(model: nn.Module, path, *, strict: bool = True) -> nn.Module:
    """Load weights into an existing ``model`` from a ``.safetensors`` file, a run directory, or a foreign
    ``.pt``/``.pth`` state dict (read with ``torch.load(weights_only=True)``: tensors only, never arbitrary pickles)."""
    from pathlib import Path

    from .errors import CheckpointError

    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        tensors, _ = read_safetensors(_resolve_paths(path)[0])
    else:
        if not path.is_file():
            raise CheckpointError(f"path: no file at {str(path)!r}")
        try:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(f"path: {str(path)!r} is not a tensors-only state dict ({error}); "
                                  "re-save it with safetensors or torch.save(model.state_dict())") from None
        if isinstance(tensors, dict) and "state_dict" in tensors and isinstance(tensors["state_dict"], dict):
            tensors = tensors["state_dict"]
        if not isinstance(tensors, dict):
            raise CheckpointError(f"path: expected a state dict in {str(path)!r}, got {type(tensors).__name__}")
    _load_state(unwrap(model), tensors, path, strict=strict)
    return model


def _load_state(model: nn.Module, tensors: dict, path, strict: bool = True) -> None:
    from .errors import CheckpointError

    try:
        model.load_state_dict(tensors, strict=strict)
    except RuntimeError as error:
        raise CheckpointError(f"path: weights in {str(path)!r} do not fit the model: {error}") from None
