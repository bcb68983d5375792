"""Devices and memory layout: ``resolve_device``, ``prepare_model`` and ``to_layout``.

Moved out of ``attacks/base.py`` (which re-exports these names): choosing a device and moving a model there is
needed by every layer, not only by attacks. Imports nothing from gradguard above ``errors``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a ``torch.device``."""
    if isinstance(device, torch.device):
        spec = str(device)
    elif device is None:
        spec = "auto"
    elif isinstance(device, str):
        spec = device.strip().lower()
    else:
        raise ConfigError(f"device: expected one of {DEVICES} (or 'cuda:N'), got {device!r}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.split(":")[0] not in DEVICES[1:]:
        raise ConfigError(f"device: expected one of {DEVICES} (or 'cuda:N'), got {device!r}")
    try:
        resolved = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device: cannot parse {device!r}; use 'cuda', 'cuda:0' or 'cpu'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} requested but this torch sees no CUDA device; use 'cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) "
                              "exist; use a smaller index")
    return resolved


def prepare_model(model: nn.Module, device: str | torch.device | None = "auto", *,
                  channels_last: bool = False) -> nn.Module:
    """Move ``model`` to ``device`` (see ``resolve_device``) and, with ``channels_last``, to the NHWC memory
    layout that tensor-core convolutions prefer. Changes ``model`` in place and returns it.

    This is the one place that changes a model's storage; attacks never do. Values are unchanged, so results
    agree with the default layout up to float rounding. Pair it with ``Attack(..., channels_last=True)``.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    model.to(resolve_device(device))
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def to_layout(x: Tensor, channels_last: bool) -> Tensor:
    """``x`` in the channels_last layout when asked for and ``x`` is a 4-D image batch; else ``x`` as is."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x
