"""How the Trainer measures a model: the per-epoch validation (clean accuracy and PGD-10 / FGSM robust accuracy on
the first validation samples, split over the processes) and the final evaluation with a suite."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import FGSM, PGD
from ..attacks.base import model_guard
from ..errors import ConfigError
from ..layout import ROBUSTNESS_FILE
from ..models import as_logits_model
from ..runtime import distributed
from ..threat import ThreatModel

VAL_ATTACKS = ("pgd", "fgsm", None)


@torch.no_grad()
def clean_logits(model: nn.Module, logits_model: nn.Module, x: Tensor) -> Tensor:
    """Clean logits for the accuracy display when a method trains on adversarial points only (eval mode,
    so BatchNorm statistics stay untouched)."""
    with model_guard(model):
        return logits_model(x)


def val_attack_instance(model: nn.Module, threat: ThreatModel | None, val_attack: str | None, seed: int) -> Any:
    """PGD-10 or FGSM against ``threat``, or None (no val_attack, no threat, or eps 0)."""
    if val_attack is None or threat is None or threat.eps == 0:  # no threat: no val_attack
        return None
    if val_attack == "pgd":
        return PGD(model, threat, steps=10, seed=seed)
    return FGSM(model, threat)


def validate(model: nn.Module, logits_model: nn.Module, x: Tensor, y: Tensor, *, threat: ThreatModel | None,
             val_attack: str | None, seed: int, rank: int, world_size: int) -> dict:
    """val_clean_acc (and val_robust_acc, val_attack) on (x, y); each process takes every world_size-th sample."""
    x, y = x[rank::world_size], y[rank::world_size]
    counts = torch.zeros(3, dtype=torch.float64)
    attack = val_attack_instance(model, threat, val_attack, seed)
    for start in range(0, y.shape[0], 500):
        xb, yb = x[start:start + 500], y[start:start + 500]
        counts[0] += float((clean_logits(model, logits_model, xb).argmax(1) == yb).sum())
        if attack is not None:
            counts[1] += float(attack.run(xb, yb).correct.sum())
        counts[2] += yb.shape[0]
    counts = distributed.all_reduce_sum(counts)
    result: dict[str, float | str] = {"val_clean_acc": float(counts[0] / counts[2])}
    if attack is not None:
        result["val_robust_acc"] = float(counts[1] / counts[2])
        result["val_attack"] = "pgd-10" if val_attack == "pgd" else "fgsm"
    return result


def final_evaluation(model: nn.Module, data: tuple[Tensor, Tensor], threat: ThreatModel, suite, *, seed: int = 0,
                     run_dir: Path | None = None) -> dict:
    """Evaluate with ``gradguard.evaluation.evaluate`` (writes robustness.json into ``run_dir``); if the evaluation
    package is not available, fall back to PGD-50 with 5 restarts and say so in the result."""
    note = "gradguard.evaluation.evaluate not available"
    try:
        from ..evaluation import evaluate
    except ImportError:
        pass
    else:
        try:
            report = evaluate(model, data, threat, suite=suite, seed=seed)
        except ConfigError as error:  # e.g. a suite attack missing from this installation
            note = f"suite {suite!r} could not run: {error}"
            warnings.warn(f"final_suite: {note}; falling back to PGD-50 x 5 restarts", stacklevel=2)
        else:
            if run_dir is not None:
                report.to_json(run_dir / ROBUSTNESS_FILE)
            return {"suite": suite, "attacks_run": list(report.suite), "clean_acc": report.clean_accuracy,
                    "robust_acc": report.robust_accuracy, "per_attack": report.per_attack,
                    "n_samples": report.n_samples}
    x, y = data
    with model_guard(model), torch.no_grad():
        clean = float((as_logits_model(model)(x).argmax(1) == y).float().mean())
    result = PGD(model, threat, steps=50, restarts=5, seed=seed).run(x, y)
    return {"suite": f"pgd-50x5 (fallback: {note})", "clean_acc": clean,
            "robust_acc": result.accuracy, "n_samples": int(y.shape[0])}
