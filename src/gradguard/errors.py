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


class ResumeMismatchError(ConfigError):
    """Work kept for resuming (a training checkpoint, an evaluation journal) was recorded with other settings than
    the ones given now. ``changes`` maps each differing setting to (recorded, given), or to None where the values
    are not worth showing (a weights fingerprint); ``where`` is the folder holding the kept work."""

    def __init__(self, message: str, changes: dict | None = None, where: str | None = None) -> None:
        super().__init__(message)
        self.changes = dict(changes or {})
        self.where = where

    def described(self) -> str:
        return describe_changes(self.changes)


def describe_changes(changes: dict) -> str:
    """``threat: recorded linf eps=0.1, given linf eps=0.2; seed: recorded 3, given 4`` (see ResumeMismatchError)."""
    return "; ".join(f"{key}: differs" if pair is None else
                     f"{key}: recorded {shown_setting(pair[0])}, given {shown_setting(pair[1])}"
                     for key, pair in changes.items())


def shown_setting(value: object) -> str:
    """A recorded setting as a person reads it: a threat as ``linf eps=0.1``, a list comma-separated."""
    if isinstance(value, dict) and "norm" in value and "eps" in value:
        bounds = value.get("bounds")
        box = "" if bounds in (None, [0.0, 1.0], (0.0, 1.0)) else f" bounds={list(bounds)}"
        eps = value["eps"]
        return f"{value['norm']} eps={eps:g}{box}" if isinstance(eps, (int, float)) else f"{value['norm']} eps={eps}"
    if isinstance(value, dict) and ("label" in value or "name" in value):
        return str(value.get("label", value.get("name")))
    if isinstance(value, (list, tuple)):
        return ",".join(shown_setting(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)
