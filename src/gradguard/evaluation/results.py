"""What an evaluation returns: ``RobustnessReport`` (``evaluate``) and ``RobustnessCurve`` (``evaluate_curve``).

The result types and their JSON in and out live here, apart from the code that measures them, so that readers of
``robustness.json`` / ``curve.json`` (the report builder, the masking report's ``from_json``) need only this module.
``exact_mean`` is the one way a fraction of samples is computed (an exact count / n), so reports, per-class tables
and curves agree to the last digit; ``read_json`` reads a result from JSON text or a file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError
from ..io import atomic_write_text
from ..threat import ThreatModel, threat_from_dict

# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------

class _JsonResult:
    """``to_json`` for the result classes: JSON text of ``to_dict()``, written atomically when a path is given."""

    def to_dict(self) -> dict:
        raise NotImplementedError

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            _atomic_write(Path(path), text)
        return text

@dataclass
class RobustnessReport(_JsonResult):
    """What ``evaluate`` measured.

    ``robust_accuracy`` is the per-sample worst case over the whole suite. ``per_attack[label]`` is the accuracy
    after that attack in the cascade: the fraction of all samples that are correct when clean and survived it and
    every attack before it (so it never increases along the suite, and its last value is ``robust_accuracy``).
    ``broken_by[i]`` is the index in ``suite`` of the attack that broke sample ``i`` (-1: none did).
    ``x_adv`` (with ``return_adversarial=True``) holds, per sample, the adversarial point that broke it, and the
    clean input otherwise; ``predictions_adv`` are the model's predictions at those points.
    """

    clean_accuracy: float
    robust_accuracy: float
    per_attack: dict[str, float]
    per_class: dict[str, dict[str, float]]
    n_samples: int
    threat: dict
    suite: list[str]
    elapsed_s: float
    robust: Tensor
    clean_correct: Tensor
    broken_by: Tensor
    predictions_adv: Tensor
    labels: Tensor
    x_adv: Tensor | None = None
    attacks: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    attack_time_s: dict[str, float] = field(default_factory=dict)
    seed: int | None = 0
    world_size: int = 1
    attack_budget: dict[str, dict[str, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    elapsed_parts_s: list[float] = field(default_factory=list)
    # A procedure suite ("adaptive"): the evidence per indicator, every escalation (ran or not, and why), and per
    # sample the stage that broke it or the stages it survived.
    evidence: dict[str, dict] = field(default_factory=dict)
    escalations: list[dict] = field(default_factory=list)
    provenance: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready numbers and per-sample lists (``x_adv`` is left out: save it with torch/safetensors)."""
        return {
            "clean_accuracy": self.clean_accuracy, "robust_accuracy": self.robust_accuracy,
            "per_attack": dict(self.per_attack), "per_class": self.per_class, "n_samples": self.n_samples,
            "threat": self.threat, "suite": list(self.suite), "attacks": self.attacks, "skipped": self.skipped,
            "elapsed_s": self.elapsed_s, "attack_time_s": self.attack_time_s, "attack_budget": self.attack_budget,
            "seed": self.seed, "world_size": self.world_size, "warnings": list(self.warnings),
            "elapsed_parts_s": list(self.elapsed_parts_s),
            "samples": {"label": self.labels.tolist(), "clean_correct": self.clean_correct.int().tolist(),
                        "robust": self.robust.int().tolist(), "broken_by": self.broken_by.tolist(),
                        "prediction_adv": self.predictions_adv.tolist(),
                        **({"stage": list(self.provenance)} if self.provenance else {})},
            **({"evidence": self.evidence, "escalations": self.escalations} if self.escalations else {}),
        }

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "RobustnessReport":
        data = read_json(text_or_path)
        samples = data["samples"]
        return cls(
            clean_accuracy=data["clean_accuracy"], robust_accuracy=data["robust_accuracy"],
            per_attack=data["per_attack"], per_class=data["per_class"], n_samples=data["n_samples"],
            threat=data["threat"], suite=data["suite"], elapsed_s=data["elapsed_s"],
            robust=torch.tensor(samples["robust"], dtype=torch.bool),
            clean_correct=torch.tensor(samples["clean_correct"], dtype=torch.bool),
            broken_by=torch.tensor(samples["broken_by"], dtype=torch.int64),
            predictions_adv=torch.tensor(samples["prediction_adv"], dtype=torch.int64),
            labels=torch.tensor(samples["label"], dtype=torch.int64),
            attacks=data.get("attacks", []), skipped=data.get("skipped", []),
            attack_time_s=data.get("attack_time_s", {}), seed=data.get("seed"), world_size=data.get("world_size", 1),
            attack_budget=data.get("attack_budget", {}),
            warnings=data.get("warnings", []), elapsed_parts_s=data.get("elapsed_parts_s", []),
            evidence=data.get("evidence", {}), escalations=data.get("escalations", []),
            provenance=samples.get("stage", []),
        )

    def summary(self) -> str:
        """A small text table: clean, each attack in the cascade, worst case."""
        lines = [f"{self.n_samples} samples, threat {self.threat['norm']} eps={self.threat['eps']:g}",
                 f"  {'clean':<14}{100 * self.clean_accuracy:7.2f} %"]
        for label, accuracy in self.per_attack.items():
            lines.append(f"  {'+ ' + label:<14}{100 * accuracy:7.2f} %   ({self.attack_time_s.get(label, 0):.1f} s"
                         f"{_budget_text(self.attack_budget.get(label))})")
        lines.append(f"  {'worst case':<14}{100 * self.robust_accuracy:7.2f} %")
        lines += [f"  skipped {s['label']}: {s['reason']}" for s in self.skipped]
        if self.escalations:
            fired = [f"{name} {v['samples']}/{v['checked']}" + (" (model-level)" if v["model_level"] else "")
                     for name, v in self.evidence.items() if v["samples"]]
            lines.append(f"  evidence: {', '.join(fired) if fired else 'none fired'}")
            lines += [f"  {'ran' if e['ran'] else 'not run'} {e['stage']}: {e['reason']}" for e in self.escalations]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def per_class_table(y: Tensor, clean_correct: Tensor, robust: Tensor) -> dict[str, dict[str, float]]:
    """class -> {n, clean, robust} (accuracies within the class)."""
    table = {}
    for c in sorted(set(y.tolist())):
        members = y == c
        table[str(c)] = {"n": int(members.sum()), "clean": exact_mean(clean_correct[members]), "robust": exact_mean(robust[members])}
    return table


def _budget_text(budget: dict[str, int] | None) -> str:
    """", 12.3k gradients, 1.2M queries": what an attack spent (per-sample passes), for the summary table."""
    if not budget:
        return ""
    parts = [f"{_count(budget[key])} {name}" for key, name in (("gradients", "gradients"), ("forwards", "queries"))
             if budget.get(key)]
    return ", " + ", ".join(parts) if parts else ""


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


# ------------------------------------------------------------------------------------------------
# The curve
# ------------------------------------------------------------------------------------------------
@dataclass
class RobustnessCurve(_JsonResult):
    """Robust accuracy against eps (ascending). ``per_attack[i]`` is the cascade table at ``eps[i]``."""

    eps: list[float]
    robust_accuracy: list[float]
    clean_accuracy: float
    n_samples: int
    threat: dict
    suite: list[str]
    per_attack: list[dict[str, float]]
    attacked: list[int]
    elapsed_s: float
    seed: int | None = 0

    def to_dict(self) -> dict:
        return {"eps": self.eps, "robust_accuracy": self.robust_accuracy, "clean_accuracy": self.clean_accuracy,
                "n_samples": self.n_samples, "threat": self.threat, "suite": self.suite,
                "per_attack": self.per_attack, "attacked": self.attacked, "elapsed_s": self.elapsed_s,
                "seed": self.seed}

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "RobustnessCurve":
        data = read_json(text_or_path)
        return cls(**{k: data[k] for k in ("eps", "robust_accuracy", "clean_accuracy", "n_samples", "threat",
                                           "suite", "per_attack", "attacked", "elapsed_s")}, seed=data.get("seed"))

    def plot(self, path: str | Path) -> Path:
        """Write robust accuracy vs eps (and the clean accuracy line) as a PNG; returns the path."""
        from ..viz.robustness import curve

        return curve(self.eps, self.robust_accuracy, self.clean_accuracy, self.threat.get("norm", ""), self.suite,
                     path)


# ------------------------------------------------------------------------------------------------
# Shared by the results
# ------------------------------------------------------------------------------------------------
def exact_mean(mask: Tensor) -> float:
    """The fraction of True entries, as an exact count / n (so reports and curves agree to the last digit)."""
    return int(mask.sum()) / mask.numel() if mask.numel() else float("nan")


def read_json(text_or_path: str | Path) -> dict:
    if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and not text_or_path.lstrip().startswith("{")):
        path = Path(text_or_path)
        if not path.is_file():
            raise InputError(f"text_or_path: {str(path)!r} is neither JSON text nor an existing file")
        text_or_path = path.read_text()
    try:
        return json.loads(text_or_path)
    except json.JSONDecodeError as error:
        raise InputError(f"text_or_path: not valid JSON ({error})") from None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def threat_of(report: RobustnessReport | RobustnessCurve) -> ThreatModel:
    """The ``ThreatModel`` a report was measured under."""
    return threat_from_dict(report.threat)
