"""The contract every training method keeps, and what the families share.

``TrainingMethod`` (a batch -> ``MethodOutput``; ``single_step`` says whether the Trainer's catastrophic-overfitting
guard turns on by default), the two helpers the adversarial families share (``mixed_forward``,
``adversarial_batch``), and ``Standard``, the clean baseline every other method is measured against.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ...errors import ConfigError
from ...threat import ThreatModel

Forward = Callable[[Tensor], Tensor]  # inputs -> logits: a model, or a model at perturbed weights (AWP)
Objective = Callable[[Forward], Tensor]  # forward -> a method's scalar loss


@dataclass
class MethodOutput:
    """The batch loss L (before loss_weight and L2) and the logits the trainer turns into accuracies."""

    loss: Tensor
    logits_clean: Tensor | None = None
    logits_adv: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)


class TrainingMethod:
    """Base class: a method maps (model, batch, threat) to a ``MethodOutput``."""

    name: ClassVar[str] = "method"
    needs_threat: ClassVar[bool] = True

    # Trains on single-step adversarial examples and can overfit catastrophically: co_guard="auto" turns the
    # Trainer's guard on for it (the guard then calls make_safer).
    single_step: ClassVar[bool] = False

    def __init__(self, threat: ThreatModel | None = None) -> None:
        if self.needs_threat and not isinstance(threat, ThreatModel):
            raise ConfigError(f"threat: method {self.name!r} needs a ThreatModel, e.g. threat=Linf(eps=0.1)")
        self.threat = threat

    def compute(self, model: nn.Module, attack_model: nn.Module, x: Tensor, y: Tensor,
                threat: ThreatModel | None) -> MethodOutput:
        raise NotImplementedError

    # Settings that can change during training (the CO guard) — saved in checkpoints, JSON-able.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.state_dict()}

    def make_safer(self) -> str | None:
        """Switch to a more conservative setting after catastrophic overfitting; describe it, or None."""
        return None

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.state_dict().items())
        return f"{type(self).__name__}({settings})"


def mixed_forward(model: Forward, x: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor]:
    """Clean and adversarial logits from one forward on the concatenated batch."""
    logits = model(torch.cat([x, x_adv]))
    return logits[: x.shape[0]], logits[x.shape[0]:]


def adversarial_batch(attack, x: Tensor, y: Tensor, threat: ThreatModel) -> Tensor:
    """Adversarial batch from ``attack`` (clean batch when eps is 0, e.g. at the start of an eps warm-up)."""
    if attack is None or threat.eps <= 0:
        return x
    return attack(x, y).detach()


class Standard(TrainingMethod):
    """Plain empirical risk minimisation: L = CE(f(x), y)."""

    name = "standard"
    needs_threat = False

    def compute(self, model, attack_model, x, y, threat):
        logits = model(x)
        return MethodOutput(F.cross_entropy(logits, y), logits_clean=logits)
