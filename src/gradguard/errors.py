"""Error types. Every message names the offending argument and says how to fix it."""
from __future__ import annotations


class GradguardError(Exception):
    """Base class of every error gradguard raises on purpose."""


class InputError(GradguardError, ValueError):
    """An argument has the wrong type, shape, dtype or value."""


class ShapeError(InputError):
    """A tensor has the wrong shape or length."""


class BoundsError(InputError):
    """Inputs lie outside the threat model's bounds, or contain NaN/inf."""


class ModelOutputError(GradguardError):
    """The model did not return finite (batch, classes) logits."""


class ConfigError(GradguardError, ValueError):
    """A configuration value (eps, steps, file option, ...) is invalid."""


class DataError(GradguardError):
    """A dataset is missing, corrupt or truncated."""


class CheckpointError(GradguardError):
    """A checkpoint or run directory is missing, corrupt or incompatible."""


class MissingDependencyError(GradguardError, ImportError):
    """An optional package (an integration's framework) is not installed; the message names the pip extra."""
