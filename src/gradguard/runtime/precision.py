"""Mixed precision: the ``amp`` names, the checked ``autocast`` and the upcast of low-precision logits.

Moved out of ``attacks/base.py`` (which re-exports these names) so that every layer can run a pass in low
precision without importing the attack package. Imports nothing from gradguard above ``errors``.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, ContextManager

import torch
from torch import Tensor

from ..errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 has 5 exponent bits: small input gradients underflow to zero unless the loss is scaled up first.
FP16_LOSS_SCALE = 2.0 ** 10


def resolve_amp(amp: str | None) -> torch.dtype | None:
    """The autocast dtype for ``amp`` ("bf16", "fp16" or None for full precision)."""
    if amp is None:
        return None
    if not isinstance(amp, str) or amp.lower() not in AMP_DTYPES:
        raise ConfigError(f"amp: expected one of {tuple(AMP_DTYPES)} or None (full precision), got {amp!r}")
    return AMP_DTYPES[amp.lower()]


_AUTOCAST_CHECKED: dict[tuple[str, torch.dtype], bool] = {}


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager[Any]:
    """``torch.autocast`` for ``device``'s type at ``dtype``; a no-op for ``dtype=None``.

    Raises ConfigError where torch would silently disable autocast (an unsupported device or dtype), so a
    requested ``amp`` never quietly runs in full precision.
    """
    if dtype is None:
        return contextlib.nullcontext()
    key = (device.type, dtype)
    if key not in _AUTOCAST_CHECKED:
        _AUTOCAST_CHECKED[key] = _autocast_works(device.type, dtype)
    if not _AUTOCAST_CHECKED[key]:
        raise ConfigError(f"amp: {amp_name(dtype)!r} autocast is not supported on {device.type} by torch "
                          f"{torch.__version__}; use amp='bf16' or amp=None there")
    return torch.autocast(device_type=device.type, dtype=dtype)


def amp_name(dtype: torch.dtype) -> str:
    """The ``amp`` name of an autocast dtype ("bf16", "fp16"), for messages; else the dtype as text."""
    return {v: k for k, v in AMP_DTYPES.items()}.get(dtype, str(dtype))


def _autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    if not torch.amp.is_autocast_available(device_type):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns, then disables autocast, for an unsupported dtype
        try:
            with torch.autocast(device_type=device_type, dtype=dtype):
                pass
        except (UserWarning, RuntimeError):
            return False
    return True


def upcast_logits(logits: Tensor) -> Tensor:
    """Low-precision (fp16/bf16) logits cast up to float32; anything else unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
