"""What the gradient-masking checklist returns: ``Check`` and ``MaskingReport`` (JSON in and out, the verdict),
and ``format_evidence``, the evidence as text for people.

This is what readers of ``masking.json`` (``from_json``, the report builder) need, apart from the checks that
measure it (``checks.py``). The thresholds and the adaptive attack each cause calls for (``NEXT_ATTACK``) live in
``gradguard.evaluation.signals``, below both this checklist and the "adaptive" suite; the package re-exports them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...evaluation.results import read_json
from ...evaluation.signals import PASS, SEVERITY


@dataclass
class Check:
    """One item of the checklist: ``status`` is PASS, WARN or FAIL; ``evidence`` holds the measured numbers."""

    name: str
    status: str
    evidence: dict
    advice: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MaskingReport:
    """The checklist's outcome: every check, and the verdict (the worst status)."""

    checks: list[Check]
    n_samples: int
    threat: dict
    elapsed_s: float
    settings: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return max((c.status for c in self.checks), key=SEVERITY.__getitem__, default=PASS)

    def check(self, name: str) -> Check:
        for item in self.checks:
            if item.name == name:
                return item
        raise KeyError(f"no check named {name!r}; checks: {[c.name for c in self.checks]}")

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "n_samples": self.n_samples, "threat": self.threat,
                "elapsed_s": self.elapsed_s, "settings": self.settings, "checks": [c.to_dict() for c in self.checks]}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            from ...io import atomic_write_text

            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "MaskingReport":
        data = read_json(text_or_path)
        return cls(checks=[Check(**c) for c in data["checks"]], n_samples=data["n_samples"], threat=data["threat"],
                   elapsed_s=data["elapsed_s"], settings=data.get("settings", {}))

    def summary(self) -> str:
        lines = [f"gradient-masking checklist: {self.verdict} ({self.n_samples} samples)"]
        for c in self.checks:
            lines.append(f"  {c.status:<5} {c.name}: {c.advice}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def format_evidence(evidence: Any, n_correct: int | None = None) -> list[tuple[str, str]]:
    """A check's (or a gradient finding's) evidence as (key, text) pairs for people: numbers rounded to 3
    significant digits (integers and booleans as they are), lists and dicts likewise, and fields without a value
    (None) left out. The JSON keeps the full values. With ``n_correct`` (the checklist's clean-correct samples),
    each accuracy key says that it is measured on those samples, not on all of them like an evaluation's."""
    if not isinstance(evidence, dict):
        return [("", _evidence_value(evidence))]
    return [(f"{key} on the {n_correct} clean-correct samples" if n_correct is not None and
             str(key).endswith("accuracy") else str(key), _evidence_value(value))
            for key, value in evidence.items() if value is not None]


def _evidence_value(value: Any) -> str:
    if isinstance(value, bool) or isinstance(value, int) or isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_evidence_value(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_evidence_value(v) for v in value) + "]"
    return str(value)

