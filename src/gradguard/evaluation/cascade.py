"""The cascade over one block: each attack of a suite in turn, on the samples every earlier attack failed on.

``Cascade`` is the engine ``evaluate`` and ``evaluate_curve`` share (and ``AdaptiveCascade`` extends); a block's
outcome (``BlockOutcome``) is the small per-sample record the journal stores and the report is assembled from.
Every point an attack returns is projected onto the threat model and re-scored by the model itself.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.base import check_labels, check_logits, voted_logits
from ..errors import InputError
from ..threat import ThreatModel
from .distributed import batch_seed
from .stream import Block
from .suites import AttackSpec

NOT_BROKEN = -1  # broken_by value of a sample no attack broke (robust, or misclassified when clean)


def check_model(model: Any) -> None:
    """The model ``evaluate`` and ``evaluate_curve`` take must be a torch.nn.Module."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


@dataclass
class BlockOutcome:
    """The small per-sample results of one block (``x_adv`` only when asked for), and its attack times."""

    index: int
    labels: Tensor
    clean_pred: Tensor
    broken_by: Tensor
    predictions_adv: Tensor
    time_s: dict[str, float]
    survivors: dict[str, int]
    x_adv: Tensor | None = None
    budget: dict[str, list[int]] = field(default_factory=dict)  # label -> [per-sample gradients, forward passes]
    # A procedure suite: per sample the evidence bits and the stages that attacked it; phase 1 = core, 2 = escalated.
    evidence: Tensor | None = None
    stages: Tensor | None = None
    phase: int = 0

    def to_record(self) -> dict:
        extra = {} if self.evidence is None or self.stages is None else {
            "evidence": self.evidence.tolist(), "stages": self.stages.tolist(), "phase": self.phase}
        return {"block": self.index, "label": self.labels.tolist(), "clean_pred": self.clean_pred.tolist(),
                "broken_by": self.broken_by.tolist(), "prediction_adv": self.predictions_adv.tolist(),
                "survivors": self.survivors, "time_s": self.time_s, "budget": self.budget, **extra}

    @classmethod
    def from_record(cls, record: dict) -> "BlockOutcome":
        def ints(key: str) -> Tensor:
            return torch.tensor(record[key], dtype=torch.int64)

        return cls(index=int(record["block"]), labels=ints("label"), clean_pred=ints("clean_pred"),
                   broken_by=ints("broken_by"), predictions_adv=ints("prediction_adv"),
                   time_s=dict(record["time_s"]), survivors=dict(record["survivors"]),
                   budget={k: list(v) for k, v in record.get("budget", {}).items()},
                   evidence=ints("evidence") if "evidence" in record else None,
                   stages=ints("stages") if "stages" in record else None, phase=int(record.get("phase", 0)))


@dataclass
class _CascadeResult:
    robust: Tensor
    broken_by: Tensor
    predictions_adv: Tensor
    x_adv: Tensor | None
    time_s: dict[str, float]
    survivors: dict[str, int]
    budget: dict[str, list[int]]


class Cascade:
    """Runs the attacks of a suite one after the other on the samples of one block still robust."""

    def __init__(self, model: nn.Module, specs: list[AttackSpec], seed: int | None) -> None:
        self.model, self.specs, self.seed = model, specs, seed
        parameter = next(model.parameters(), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")

    @torch.no_grad()
    def clean_logits(self, x: Tensor, y: Tensor) -> Tensor:
        """Clean logits of one block (and a check that its labels fit the model's classes)."""
        logits = check_logits(self.model(x), x.shape[0])
        check_labels(y, logits.shape[1], "data")
        return logits

    def predict(self, x: Tensor, y: Tensor) -> Tensor:
        """Clean predictions of one block."""
        return self.clean_logits(x, y).argmax(1)

    def run_block(self, block: Block, threat: ThreatModel, *, keep_adversarial: bool) -> BlockOutcome:
        x, y = block.x.to(self.device), block.y.to(self.device)
        clean_pred = self.predict(x, y)
        result = self.run(x, y, clean_pred == y, clean_pred, threat, block.index, 0, keep_adversarial)
        return BlockOutcome(block.index, y.cpu(), clean_pred.cpu(), result.broken_by.cpu(),
                             result.predictions_adv.cpu(), result.time_s, result.survivors,
                             None if result.x_adv is None else result.x_adv.cpu(), result.budget)

    def run(self, x: Tensor, y: Tensor, robust: Tensor, predictions: Tensor, threat: ThreatModel, block_index: int,
            stage_offset: int, keep_adversarial: bool) -> _CascadeResult:
        """Attack the ``robust`` samples with each spec in turn; a sample leaves the cascade once broken."""
        robust = robust.clone()
        broken_by = torch.full_like(y, NOT_BROKEN)
        predictions_adv = predictions.clone()
        x_adv = x.clone() if keep_adversarial else None
        times: dict[str, float] = {}
        survivors: dict[str, int] = {}
        budget: dict[str, list[int]] = {}
        for k, spec in enumerate(self.specs):
            if threat.eps > 0 and not spec.supports(threat):
                continue
            started = time.perf_counter()
            index = robust.nonzero().squeeze(1)
            # eps = 0: the ball is the single point x, no attack can change a prediction; the clean result is exact.
            if threat.eps > 0 and index.numel():
                xb, yb = x[index], y[index]
                attack = spec.build(self.model, threat, batch_seed(self.seed, stage_offset + k, block_index))
                found = attack.run(xb, yb)
                budget[spec.label] = [found.n_grad, found.n_forward]
                candidate = threat.project(found.x_adv.detach(), xb)
                votes = getattr(attack, "success_votes", 1)  # a randomised model: re-scored by majority vote
                success, logits = voted_logits(self.model, candidate, yb, votes, lambda z, t: z.argmax(1) != t)
                predicted = logits.argmax(1)
                hit = index[success]
                broken_by[hit], predictions_adv[hit], robust[hit] = k, predicted[success], False
                if x_adv is not None:
                    x_adv[hit] = candidate[success].to(x_adv.dtype)
            times[spec.label] = time.perf_counter() - started
            survivors[spec.label] = int(robust.sum())
        return _CascadeResult(robust, broken_by, predictions_adv, x_adv, times, survivors, budget)
