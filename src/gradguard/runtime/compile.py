"""``torch.compile`` with an eager fallback: ``CompiledModel``, ``compiled_model`` and ``CompileFallbackWarning``.

Moved out of ``attacks/base.py`` (which re-exports these names). One wrapper per model, cached weakly, so a model
that cannot be compiled warns once, not once per attack. Imports nothing from gradguard.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn


class CompileFallbackWarning(UserWarning):
    """``torch.compile`` could not compile a model; gradguard runs it eagerly instead (same results, no speed-up)."""


class CompiledModel:
    """``model`` through ``torch.compile``, falling back to the eager model (one warning) if compiling fails.

    Compilation happens at the first call, so that is where a failure surfaces (no C++ compiler, an operation
    the compiler does not support, an old Python); any exception there or later switches this wrapper to the
    eager model for good, and the call is repeated eagerly, so an error of the model itself still surfaces from
    the eager call. One wrapper per model (``compiled_model``) so a model warns once, not once per attack.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.compiled: Any = None
        try:
            self.compiled = torch.compile(model)
        except Exception as error:  # torch.compile itself refuses (e.g. an unsupported Python)
            self._fall_back(error)

    def __call__(self, x: Tensor) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as error:
                self._fall_back(error)
        return self.model(x)

    def _fall_back(self, error: Exception) -> None:
        self.compiled = None
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        warnings.warn(f"compile: torch.compile failed for {type(self.model).__name__} ({type(error).__name__}: "
                      f"{reason}); running the model eagerly instead (same results, no speed-up). Pass compile=False "
                      "(CLI: drop --compile) to silence this.", CompileFallbackWarning, stacklevel=3)


_COMPILED: "weakref.WeakKeyDictionary[nn.Module, CompiledModel]" = weakref.WeakKeyDictionary()


def compiled_model(model: nn.Module) -> CompiledModel:
    """The one ``CompiledModel`` of ``model`` (created on first use; compiled code is reused by every attack)."""
    if model not in _COMPILED:
        _COMPILED[model] = CompiledModel(model)
    return _COMPILED[model]
