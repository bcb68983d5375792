"""What a gradient-health diagnosis says: ``Finding``, the warning and the stop it raises, and ``on_finding``.

These types are shared by everything that reports findings (``GradientMonitor``, the framework callbacks in
``integrations``, the Trainer, the report), so they live below the monitor and its rules. The kinds themselves
and their advice are declared by the rules that find them (``gradflow/rules/``, one file per kind).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..errors import ConfigError
from .health import FATAL_KINDS

__all__ = ["FATAL_KINDS", "WHOLE_MODEL", "Finding", "GradientHealthWarning", "OnFinding", "TrainingStopped",
           "check_on_finding"]

# The layer a whole-model finding names.
WHOLE_MODEL = "(whole model)"

OnFinding = str | Callable[["Finding"], Any] | None


class GradientHealthWarning(RuntimeWarning):
    """Warned by ``GradientMonitor(on_finding="warn")`` (and "stop", for findings that are not fatal)."""


class TrainingStopped(RuntimeError):
    """Raised by ``GradientMonitor(on_finding="stop")`` at a fatal finding (``FATAL_KINDS``); ``.finding`` says why."""

    def __init__(self, finding: "Finding", step: int):
        self.finding, self.step = finding, step
        super().__init__(f"GradientMonitor stopped training at step {step}: {finding.kind} in {finding.layer} "
                         f"({finding.numbers(limit=4)}). "
                         f"{finding.advice}")


@dataclass
class Finding:
    """One diagnosis: what (``kind``), where (``layer``), the numbers behind it and the usual fix."""

    kind: str
    layer: str
    evidence: dict = field(default_factory=dict)
    advice: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def numbers(self, limit: int | None = None) -> str:
        """The evidence (its first ``limit`` items) as ``key=value, ...``, floats to 3 significant digits."""
        items = list(self.evidence.items())[:limit]
        return ", ".join(f"{key}={_short(value)}" for key, value in items)

    def __str__(self) -> str:
        return f"[{self.kind}] {self.layer}: {self.numbers()}\n  advice: {self.advice}"


def check_on_finding(on_finding: Any) -> None:
    """Raise ``ConfigError`` unless ``on_finding`` is None, "warn", "stop" or a callable taking a ``Finding``."""
    if not (on_finding is None or callable(on_finding) or on_finding in ("warn", "stop")):
        raise ConfigError(f"on_finding: expected None, 'warn', 'stop' or a callable taking a Finding, "
                          f"got {on_finding!r}")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)
