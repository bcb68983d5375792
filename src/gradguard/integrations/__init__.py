"""GradientMonitor inside the training frameworks people already run.

- ``gradguard.integrations.lightning.GradientHealthCallback``: a Lightning ``Callback`` (pip install gradguard[lightning])
- ``gradguard.integrations.huggingface.GradientHealthCallback``: a ``transformers.TrainerCallback``
  (pip install gradguard[huggingface])
- ``gradguard.integrations.tensorboard``: ``write_tensorboard`` and the live ``TensorBoardSink``
  (pip install gradguard[tensorboard])

Importing ``gradguard`` or this package imports none of those frameworks (Lightning alone takes seconds to
import); each submodule imports its framework when it is itself imported, and says which extra to install when
the framework is missing.
"""
from __future__ import annotations

import importlib
from typing import Any

SUBMODULES = ("lightning", "huggingface", "tensorboard")
__all__ = [*SUBMODULES, "write_tensorboard", "TensorBoardSink"]


def __getattr__(name: str) -> Any:
    """Import a submodule (or the TensorBoard helpers) on first use, so `import gradguard` stays light."""
    if name in SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in ("write_tensorboard", "TensorBoardSink"):
        return getattr(importlib.import_module(".tensorboard", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
