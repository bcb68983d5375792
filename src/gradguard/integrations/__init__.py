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
from contextlib import contextmanager
from typing import Any, Iterator

from ..errors import MissingDependencyError

SUBMODULES = ("lightning", "huggingface", "tensorboard")
__all__ = [*SUBMODULES, "write_tensorboard", "TensorBoardSink"]


def __getattr__(name: str) -> Any:
    """Import a submodule (or the TensorBoard helpers) on first use, so `import gradguard` stays light."""
    if name in SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in ("write_tensorboard", "TensorBoardSink"):
        return getattr(importlib.import_module(".tensorboard", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextmanager
def optional_dependency(package: str, extra: str, user: str) -> Iterator[None]:
    """Wrap a submodule's import of its framework: if that import fails, raise ``MissingDependencyError`` naming
    the module that needs it and the pip extra that installs it."""
    try:
        yield
    except ImportError as error:
        raise MissingDependencyError(f"{user} needs the `{package}` package ({error}); "
                                     f"install it with: pip install gradguard[{extra}]") from error
