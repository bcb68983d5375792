"""Robust accuracy the honest way: clean accuracy, then a cascade of attacks with a per-sample worst case.

The protocol follows AutoAttack (Croce & Hein, ICML 2020): samples the model already misclassifies are never
attacked (they count as not robust); each attack runs only on the samples every earlier attack failed on; a
sample is robust only if no attack found an adversarial point for it. Every point an attack returns is projected
onto the threat model (a no-op for a correct attack) and re-scored by the model itself, so the numbers never
depend on an attack's own bookkeeping.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..attacks.base import as_labels, check_inputs, check_labels, check_logits, model_guard, positive_int
from ..errors import ConfigError, InputError
from ..io import atomic_write_text
from ..threat import ThreatModel, threat_from_dict
from .distributed import Shard, batch_seed, check_same_data, resolve_shard
from .suites import AttackSpec, resolve_suite

NOT_BROKEN = -1  # broken_by value of a sample no attack broke (robust, or misclassified when clean)


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

    def to_dict(self) -> dict:
        """JSON-ready numbers and per-sample lists (``x_adv`` is left out: save it with torch/safetensors)."""
        return {
            "clean_accuracy": self.clean_accuracy, "robust_accuracy": self.robust_accuracy,
            "per_attack": dict(self.per_attack), "per_class": self.per_class, "n_samples": self.n_samples,
            "threat": self.threat, "suite": list(self.suite), "attacks": self.attacks, "skipped": self.skipped,
            "elapsed_s": self.elapsed_s, "attack_time_s": self.attack_time_s, "seed": self.seed,
            "world_size": self.world_size,
            "samples": {"label": self.labels.tolist(), "clean_correct": self.clean_correct.int().tolist(),
                        "robust": self.robust.int().tolist(), "broken_by": self.broken_by.tolist(),
                        "prediction_adv": self.predictions_adv.tolist()},
        }

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "RobustnessReport":
        data = _read_json(text_or_path)
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
        )

    def summary(self) -> str:
        """A small text table: clean, each attack in the cascade, worst case."""
        lines = [f"{self.n_samples} samples, threat {self.threat['norm']} eps={self.threat['eps']:g}",
                 f"  {'clean':<14}{100 * self.clean_accuracy:7.2f} %"]
        for label, accuracy in self.per_attack.items():
            lines.append(f"  {'+ ' + label:<14}{100 * accuracy:7.2f} %   ({self.attack_time_s.get(label, 0):.1f} s)")
        lines.append(f"  {'worst case':<14}{100 * self.robust_accuracy:7.2f} %")
        lines += [f"  skipped {s['label']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ------------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------------
def evaluate(
    model: nn.Module,
    data: Any,
    threat: ThreatModel,
    suite: str | Sequence[Any] = "standard",
    *,
    batch_size: int = 256,
    seed: int | None = 0,
    return_adversarial: bool = False,
    progress: bool = False,
    max_samples: int | None = None,
    distributed: bool | None = None,
) -> RobustnessReport:
    """Clean and worst-case robust accuracy of ``model`` under ``threat`` against an attack ``suite``.

    Args:
        data: an ``(x, y)`` pair of tensors or an iterable of ``(x, y)`` batches (a DataLoader); the samples are
            held in memory (on their own device) for the cascade — use ``max_samples`` to cap them.
        suite: "quick" (APGD-CE), "standard" (APGD-CE → APGD-T → Square, AutoAttack's budgets) or a list of
            specs: attack names, dicts ``{"name": ..., **kwargs}``, or ``Attack`` objects. Attacks that do not
            support the threat's norm are skipped and listed in ``report.skipped``.
        seed: fixes every random start and restart (each attack on each batch gets a seed derived from it);
            None uses torch's global RNG.
        distributed: None shards the work over ranks when torch.distributed is initialised with several
            processes (every rank must pass the full data; every rank gets the full report); False never does.

    The model's mode, parameters, ``requires_grad`` flags and ``.grad`` fields are left as they were.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _check_threat(threat)
    batch_size = positive_int(batch_size, "batch_size")
    specs = resolve_suite(suite)
    x, y = collect_data(data, threat, max_samples)
    shard = resolve_shard(distributed)
    check_same_data(shard, x, y)
    runner = _Cascade(model, threat, batch_size, seed, progress, shard)
    with model_guard(model):
        clean_pred = runner.predict(x)
        check_labels(y, runner.num_classes, "data")
        clean_correct = clean_pred == y
        stage = runner.run(specs, x, y, clean_correct, clean_pred, keep_adversarial=return_adversarial)
    return _report(stage, specs, threat, x, y, clean_correct, time.perf_counter() - started, seed, shard)


@dataclass
class _StageResult:
    robust: Tensor
    broken_by: Tensor
    predictions_adv: Tensor
    x_adv: Tensor | None
    per_attack: dict[str, float]
    attack_time_s: dict[str, float]
    skipped: list[dict]
    ran: list[AttackSpec]


class _Cascade:
    """Runs the attacks of a suite one after the other on the samples still robust, batch by batch."""

    def __init__(self, model: nn.Module, threat: ThreatModel, batch_size: int, seed: int | None, progress: bool,
                 shard: Shard) -> None:
        self.model, self.threat, self.batch_size = model, threat, batch_size
        self.seed, self.progress, self.shard = seed, progress, shard
        parameter = next(model.parameters(), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")
        self.num_classes = 0

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Clean predictions, each batch on its owning rank, then shared."""
        predictions = torch.zeros(x.shape[0], dtype=torch.int64)
        for b, index in enumerate(self._batches(torch.arange(x.shape[0]))):
            if self.shard.owns(b):
                logits = check_logits(self.model(x[index].to(self.device)), index.numel())
                self.num_classes = logits.shape[1]
                predictions[index] = logits.argmax(1).cpu()
        self.num_classes = int(self.shard.max(float(self.num_classes)))
        return self.shard.sum(predictions).to(x.device)

    def run(self, specs: list[AttackSpec], x: Tensor, y: Tensor, active: Tensor, clean_pred: Tensor,
            *, keep_adversarial: bool, stage_offset: int = 0) -> _StageResult:
        """Attack the ``active`` samples with each spec in turn; a sample leaves the cascade once broken."""
        n = x.shape[0]
        robust = active.clone()
        broken_by = torch.full((n,), NOT_BROKEN, dtype=torch.int64, device=x.device)
        predictions_adv = clean_pred.clone()
        x_adv = x.clone() if keep_adversarial else None
        per_attack, times, skipped, ran = {}, {}, [], []
        for k, spec in enumerate(specs):
            if self.threat.eps == 0:
                # The ball is the single point x: no attack can change a prediction; the clean result is exact.
                per_attack[spec.label] = float(robust.float().mean()) if n else float("nan")
                times[spec.label] = 0.0
                ran.append(spec)
                continue
            if not spec.supports(self.threat):
                skipped.append({"label": spec.label, "reason": f"does not support the {self.threat.norm} norm"})
                continue
            started = time.perf_counter()
            broken, pred, points = self._attack_stage(spec, stage_offset + k, x, y, robust, keep_adversarial)
            predictions_adv = torch.where(broken, pred, predictions_adv)
            if x_adv is not None:
                x_adv[broken] = points[broken]
            broken_by[broken] = k
            robust &= ~broken
            per_attack[spec.label] = float(robust.float().mean()) if n else float("nan")
            times[spec.label] = round(time.perf_counter() - started, 3)
            ran.append(spec)
        return _StageResult(robust, broken_by, predictions_adv, x_adv, per_attack, times, skipped, ran)

    def _attack_stage(self, spec: AttackSpec, stage: int, x: Tensor, y: Tensor, robust: Tensor,
                      keep_adversarial: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        n = x.shape[0]
        broken = torch.zeros(n, dtype=torch.bool, device=x.device)
        pred = torch.zeros(n, dtype=torch.int64, device=x.device)
        points = torch.zeros_like(x) if keep_adversarial else None  # zeros elsewhere: the cross-rank sum is exact
        batches = self._batches(robust.nonzero().squeeze(1))
        bar = self._progress_bar(spec.label, len(batches))
        for b, index in enumerate(batches):
            if not self.shard.owns(b):
                continue
            xb, yb = x[index].to(self.device), y[index].to(self.device)
            attack = spec.build(self.model, self.threat, batch_seed(self.seed, stage, b))
            candidate = self.threat.project(attack.run(xb, yb).x_adv.detach(), xb)
            with torch.no_grad():
                predicted = check_logits(self.model(candidate), index.numel()).argmax(1)
            success = predicted != yb
            broken[index] = success.to(x.device)
            pred[index] = predicted.to(x.device)
            if points is not None:
                points[index] = candidate.to(x.device, x.dtype)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        broken, pred = self.shard.sum(broken), self.shard.sum(pred)
        if points is not None:
            points = self.shard.sum(points)
        return broken, pred, points

    def _batches(self, index: Tensor) -> list[Tensor]:
        return list(index.split(self.batch_size)) if index.numel() else []

    def _progress_bar(self, label: str, total: int):
        if not self.progress or self.shard.rank != 0 or total == 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=label, leave=False)


def _report(stage: _StageResult, specs: list[AttackSpec], threat: ThreatModel, x: Tensor, y: Tensor,
            clean_correct: Tensor, elapsed: float, seed: int | None, shard: Shard) -> RobustnessReport:
    n = y.shape[0]
    return RobustnessReport(
        clean_accuracy=_mean(clean_correct), robust_accuracy=_mean(stage.robust),
        per_attack=stage.per_attack, per_class=per_class_table(y, clean_correct, stage.robust),
        n_samples=n, threat=threat.to_dict(), suite=[s.label for s in stage.ran], elapsed_s=round(elapsed, 3),
        robust=stage.robust.cpu(), clean_correct=clean_correct.cpu(), broken_by=stage.broken_by.cpu(),
        predictions_adv=stage.predictions_adv.cpu(), labels=y.cpu(), x_adv=stage.x_adv,
        attacks=[s.to_dict() for s in specs], skipped=stage.skipped, attack_time_s=stage.attack_time_s, seed=seed,
        world_size=shard.world_size,
    )


def per_class_table(y: Tensor, clean_correct: Tensor, robust: Tensor) -> dict[str, dict[str, float]]:
    """class -> {n, clean, robust} (accuracies within the class)."""
    table = {}
    for c in sorted(set(y.tolist())):
        members = y == c
        table[str(c)] = {"n": int(members.sum()), "clean": _mean(clean_correct[members]), "robust": _mean(robust[members])}
    return table


# ------------------------------------------------------------------------------------------------
# evaluate_curve
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
        data = _read_json(text_or_path)
        return cls(**{k: data[k] for k in ("eps", "robust_accuracy", "clean_accuracy", "n_samples", "threat",
                                           "suite", "per_attack", "attacked", "elapsed_s")}, seed=data.get("seed"))

    def plot(self, path: str | Path) -> Path:
        """Write robust accuracy vs eps (and the clean accuracy line) as a PNG; returns the path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
        axes.plot(self.eps, [100 * a for a in self.robust_accuracy], marker="o", label="robust (worst case)")
        axes.axhline(100 * self.clean_accuracy, color="grey", linestyle="--", linewidth=1, label="clean")
        axes.set_xlabel(f"eps ({self.threat.get('norm', '')})")
        axes.set_ylabel("accuracy (%)")
        axes.set_ylim(0, 100)
        axes.set_title(f"suite: {' → '.join(self.suite)}", fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        plt.close(figure)
        return path


def evaluate_curve(
    model: nn.Module,
    data: Any,
    threat: ThreatModel,
    eps_values: Iterable[float],
    suite: str | Sequence[Any] = "quick",
    *,
    batch_size: int = 256,
    seed: int | None = 0,
    progress: bool = False,
    max_samples: int | None = None,
    distributed: bool | None = None,
) -> RobustnessCurve:
    """Worst-case robust accuracy at each eps in ``eps_values`` (sorted ascending in the result).

    Work is reused where it is sound: the eps-ball grows with eps, so a sample broken at a smaller eps stays
    broken at every larger one and is not attacked again; at each eps only the samples robust at the previous
    eps are attacked. (The converse — robust at a larger eps implies robust at a smaller one — is true of the
    model but not of heuristic attacks, so it is never used.) The curve is therefore non-increasing.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _check_threat(threat)
    eps_list = _eps_values(eps_values)
    batch_size = positive_int(batch_size, "batch_size")
    specs = resolve_suite(suite)
    x, y = collect_data(data, threat, max_samples)
    shard = resolve_shard(distributed)
    check_same_data(shard, x, y)
    robust_curve, tables, attacked = [], [], []
    with model_guard(model):
        runner = _Cascade(model, threat, batch_size, seed, progress, shard)
        clean_pred = runner.predict(x)
        check_labels(y, runner.num_classes, "data")
        robust = clean_pred == y
        clean_correct = robust.clone()
        for i, eps in enumerate(eps_list):
            runner.threat = threat.with_eps(eps)
            attacked.append(int(robust.sum()))
            stage = runner.run(specs, x, y, robust, clean_pred, keep_adversarial=False, stage_offset=i * len(specs))
            robust = stage.robust
            robust_curve.append(_mean(robust))
            tables.append(stage.per_attack)
    return RobustnessCurve(eps=eps_list, robust_accuracy=robust_curve, clean_accuracy=_mean(clean_correct),
                           n_samples=int(y.shape[0]), threat=threat.to_dict(), suite=[s.label for s in specs],
                           per_attack=tables, attacked=attacked, elapsed_s=round(time.perf_counter() - started, 3),
                           seed=seed)


def _eps_values(eps_values: Iterable[float]) -> list[float]:
    try:
        values = sorted(float(e) for e in eps_values)
    except (TypeError, ValueError):
        raise ConfigError(f"eps_values: expected a list of numbers, got {eps_values!r}") from None
    if not values or any(not math.isfinite(e) or e < 0 for e in values):
        raise ConfigError(f"eps_values: expected a non-empty list of finite numbers >= 0, got {eps_values!r}")
    return values


# ------------------------------------------------------------------------------------------------
# Input handling
# ------------------------------------------------------------------------------------------------
def _check_threat(threat: Any) -> None:
    if not isinstance(threat, ThreatModel):
        raise InputError(f"threat: expected a ThreatModel such as Linf(eps=0.1) or L2(eps=1.0), got {type(threat).__name__}")


def collect_data(data: Any, threat: ThreatModel, max_samples: int | None = None) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors from a pair of tensors or an iterable of ``(x, y)`` batches, checked and capped."""
    if max_samples is not None:
        max_samples = positive_int(max_samples, "max_samples")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if max_samples is not None:
            x, y = x[:max_samples], y[:max_samples]
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Tensor, dict)):
        xs, ys, count = [], [], 0
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise InputError("data: each batch from the loader must be an (x, y) pair; "
                                 f"got {type(batch).__name__}")
            xs.append(batch[0])
            ys.append(batch[1])
            count += len(batch[1])
            if max_samples is not None and count >= max_samples:
                break
        if not xs:
            raise InputError("data: the loader yielded no batches; pass a non-empty dataset")
        x, y = torch.cat(xs), torch.cat(ys)
        if max_samples is not None:
            x, y = x[:max_samples], y[:max_samples]
    else:
        raise InputError(f"data: expected an (x, y) pair of tensors or a DataLoader yielding (x, y), got {type(data).__name__}")
    x = check_inputs(x, threat, "data")
    y = as_labels(y, x.shape[0], "data")
    if x.shape[0] == 0:
        raise InputError("data: holds no samples; pass at least one (x, y) pair")
    return x, y.to(x.device)


def _mean(mask: Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else float("nan")


def _read_json(text_or_path: str | Path) -> dict:
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
