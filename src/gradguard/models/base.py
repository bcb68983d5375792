"""What every model source shares: the ``Normalized`` and ``Logits`` wrappers (input normalisation, the output
adapter), DDP/compile unwrapping, and the records a model carries (its zoo spec and its source) so a run directory
can rebuild it."""
from __future__ import annotations

import copy
import json
from typing import Any, Sequence, Union

import torch
from torch import Tensor, nn

from ..core.logits import LogitsKey, select_logits
from ..errors import ConfigError, ModelOutputError, ShapeError

Stats = Union[float, Sequence[float], str]
SPEC_ATTRIBUTE = "gradguard_spec"
SOURCE_ATTRIBUTE = "gradguard_source"
SOURCE_KEYS = ("spec", "kwargs", "weights", "weights_sha256", "mean", "std", "module_file", "logits")


class Normalized(nn.Module):
    """Wraps ``model`` so it takes pixel-space inputs: forward(x) = model((x - mean) / std).

    Attacks then measure eps in pixel space, the space users think in. ``mean``/``std`` are per channel
    (a sequence) or scalars; they are buffers, so they move with ``.to(device)``.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        super().__init__()
        self.model = model
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        if bool((std_t <= 0).any()):
            raise ConfigError(f"std: must be > 0, got {std!r}")
        shape = (1, -1, 1, 1) if mean_t.dim() == 1 and mean_t.numel() > 1 else ()
        self.register_buffer("mean", mean_t.reshape(shape) if shape else mean_t)
        self.register_buffer("std", std_t.reshape(shape) if shape else std_t)

    def forward(self, x: Tensor) -> Tensor:
        if self.mean.dim() == 4 and (x.dim() != 4 or x.shape[1] != self.mean.shape[1]):
            # broadcasting would silently turn a 1-channel image into a C-channel one
            raise ShapeError(f"mean/std: {self.mean.shape[1]} values, one per channel, but the input has shape "
                             f"{tuple(x.shape)} ({x.shape[1] if x.dim() > 1 else 'no'} channels); give one value per "
                             "input channel, or a single value for all")
        return self.model((x - self.mean) / self.std)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers and the output adapter
    ``Logits`` (which holds no weights): the module whose state dict and records a run directory stores."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, Logits):
            model = model.model
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def model_spec(model: nn.Module) -> dict | None:
    """The zoo name and kwargs a model was built with (unwrapping DDP/DataParallel), or None."""
    return getattr(unwrap(model), SPEC_ATTRIBUTE, None)


def model_source(model: nn.Module) -> dict | None:
    """How ``model`` was resolved, as a JSON-able record (keys: spec, kwargs, weights, weights_sha256, mean, std),
    or None for a model gradguard did not build (then it cannot be rebuilt by name)."""
    source = getattr(unwrap(model), SOURCE_ATTRIBUTE, None)
    return copy.deepcopy(source) if isinstance(source, dict) else None


def make_source(spec: str, kwargs: dict | None = None, **fields) -> dict | None:
    """A source record with every key present (None where unknown), so readers need no ``.get`` guessing;
    None when the kwargs cannot be written as JSON (such a model cannot be rebuilt from a run directory)."""
    try:
        json.dumps(kwargs or {})
    except (TypeError, ValueError):
        return None
    source = dict.fromkeys(SOURCE_KEYS)
    source.update(spec=spec, kwargs=plain_kwargs(kwargs or {}), **fields)
    return source


def record(model: nn.Module, *, source: dict | None = None, spec: dict | None = None) -> nn.Module:
    """Attach the source (and zoo spec) records to ``model``; returns it."""
    if source is not None:
        setattr(model, SOURCE_ATTRIBUTE, source)
    if spec is not None:
        setattr(model, SPEC_ATTRIBUTE, spec)
    return model


def plain_kwargs(kwargs: dict) -> dict:
    """Keyword arguments as JSON holds them (tuples become lists), so a record reloads to the same call."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return {str(key): plain(value) for key, value in kwargs.items()}


def parse_stats(mean: Stats | None, std: Stats | None) -> tuple[float | list[float] | None, float | list[float] | None]:
    """Validate ``mean``/``std``: both or neither, one value or one per channel (numbers or "0.49,0.48,0.45")."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ConfigError("mean/std: give both (per-channel input normalisation) or neither")
    values = _stat_values(mean, "mean"), _stat_values(std, "std")
    if len(values[0]) > 1 and len(values[1]) > 1 and len(values[0]) != len(values[1]):
        raise ConfigError(f"mean/std: {len(values[0])} means but {len(values[1])} stds; give one value each or one "
                          "per channel for both")
    if any(v <= 0 for v in values[1]):
        raise ConfigError(f"std: must be > 0, got {std!r}")
    return _collapse(values[0], mean), _collapse(values[1], std)


def _collapse(values: list[float], raw: Stats) -> float | list[float]:
    """One number stays one number (applies to every channel); a sequence stays a list, even of length one."""
    return values[0] if len(values) == 1 and not _is_sequence(raw) else values


def _is_sequence(value) -> bool:
    if hasattr(value, "tolist"):
        value = value.tolist()
    return isinstance(value, (list, tuple)) or (isinstance(value, str) and "," in value)


def _stat_values(value: Stats, argument: str) -> list[float]:
    if hasattr(value, "tolist"):  # a tensor or numpy array
        value = value.tolist()
    items: list = (value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple))
                   else [value])
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{argument}: expected a number or one number per channel (e.g. 0.5 or 0.49,0.48,0.45), "
                          f"got {value!r}") from None
    if not values or any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise ConfigError(f"{argument}: expected finite numbers, got {value!r}")
    return values


def normalise(model: nn.Module, mean, std) -> nn.Module:
    """``Normalized(model, mean, std)`` carrying ``model``'s records with mean/std added; ``model`` if both None."""
    if mean is None:
        return model
    if isinstance(model, Logits):  # normalise inside the output adapter, as a rebuilt model has it
        return with_logits(normalise(model.model, mean, std), model.key)
    if isinstance(unwrap(model), Normalized):
        raise ConfigError("mean/std: the model already normalises its inputs (it is a Normalized model, e.g. from a "
                          "run directory); drop --mean/--std")
    wrapped = Normalized(model, mean, std)
    spec, source = model_spec(model), model_source(model)
    if spec is not None:
        spec = copy.deepcopy(spec)
        spec["kwargs"].update(mean=mean, std=std)
    if source is not None:
        source.update(mean=mean, std=std)
    return record(wrapped, source=source, spec=spec)


# ------------------------------------------------------------------------------------------------
# The output adapter: a wrapper like Normalized, looked through by unwrap
# ------------------------------------------------------------------------------------------------
class Logits(nn.Module):
    """``model`` whose forward returns only its logits tensor: ``Logits(model, "out")`` for a dict or an object with
    that key/attribute, ``Logits(model, 0)`` for a ``(logits, features)`` tuple, ``Logits(model)`` (``key=None``) for
    the automatic choice — a tensor as is, else the output's ``logits``.

    Every gradguard entry point adapts a model this way by itself when its output has ``logits``; pass the wrapper
    for any other output. It holds no weights of its own: run directories store the wrapped model's weights and
    record ``key``, so a reloaded model selects the same part (``gradguard.models.unwrap`` looks through it).
    """

    def __init__(self, model: nn.Module, key: LogitsKey | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ModelOutputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(key, bool) or (key is not None and not isinstance(key, (str, int))):
            raise ConfigError(f"logits: expected a key name (str) or an index (int), got {key!r}")
        self.model = model
        self.key = key

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return select_logits(self.model(*args, **kwargs), self.key)

    def extra_repr(self) -> str:
        return f"key={self.key!r}"


def as_logits_model(model: nn.Module) -> nn.Module:
    """``model`` adapted so that calling it gives a logits tensor: a ``Logits`` model as it is, any other wrapped
    in the automatic ``Logits(model)``. What every Python entry point (evaluate, check_masking, certify,
    curvature, Trainer) does first."""
    return model if isinstance(model, Logits) else Logits(model)


def inner_model(model: nn.Module) -> nn.Module:
    """The model inside ``Logits`` wrappers (the one whose layers and weights are the user's)."""
    while isinstance(model, Logits):
        model = model.model
    return model


def with_logits(model: nn.Module, key: LogitsKey | None) -> nn.Module:
    """``Logits(model, key)`` carrying ``model``'s records with ``logits=key`` added (so a run directory rebuilds the
    same selection); a model that already selects is re-keyed. ``model`` itself when ``key`` is None."""
    if key is None:
        return model
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise ConfigError(f"logits: expected a key name (str) or an index (int), got {key!r}")
    inner = inner_model(model)
    source, spec = model_source(model), model_spec(model)
    wrapped = Logits(inner, key)
    if source is not None:
        source["logits"] = key
        record(unwrap(wrapped), source=source, spec=spec)
    return wrapped
