"""The catastrophic-overfitting (CO) guard as a callback (Wong et al. 2020, Sec. 5): after every epoch it probes PGD
and FGSM accuracy on a fixed training batch and, on a collapse, rolls the epoch back, makes the method safer and
halves the learning rate."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ...attacks import FGSM, PGD
from ...runtime import distributed
from ...threat import ThreatModel
from ..batches import first_samples
from .base import TrainCallback, TrainerLike


@dataclass
class GuardSettings:
    """Catastrophic-overfitting detector (Wong et al. 2020, Sec. 5): after every epoch, PGD and FGSM accuracy
    on a fixed training batch. A collapse is PGD accuracy below ``ratio`` × the last good epoch's (when that
    was at least ``min_reference``), or PGD accuracy < ``floor`` while FGSM accuracy > ``fgsm_high`` (the sudden
    kind), or FGSM accuracy above PGD accuracy by more than ``max_gap`` (the slow kind: the model learns to defeat
    the single-step attack while multi-step robustness falls; Andriushchenko & Flammarion 2020). None disables
    a rule."""

    samples: int = 256
    pgd_steps: int = 10
    ratio: float | None = 0.3
    min_reference: float = 0.1
    floor: float | None = 0.05
    fgsm_high: float = 0.5
    max_gap: float | None = 0.12

    def collapsed(self, pgd_acc: float, fgsm_acc: float, reference: float | None) -> str | None:
        """The rule that fired (as text), or None."""
        if self.ratio is not None and reference is not None and reference >= self.min_reference \
                and pgd_acc < self.ratio * reference:
            return f"PGD accuracy {pgd_acc:.3f} < {self.ratio:g} × last good {reference:.3f}"
        if self.floor is not None and pgd_acc < self.floor and fgsm_acc > self.fgsm_high:
            return f"PGD accuracy {pgd_acc:.3f} < {self.floor:g} while FGSM accuracy {fgsm_acc:.3f} > {self.fgsm_high:g}"
        if self.max_gap is not None and fgsm_acc - pgd_acc > self.max_gap:
            return f"FGSM accuracy {fgsm_acc:.3f} exceeds PGD accuracy {pgd_acc:.3f} by more than {self.max_gap:g}"
        return None


def guard_accuracies(model: nn.Module, threat: ThreatModel, settings: GuardSettings, seed: int, x: Tensor,
                     y: Tensor) -> tuple[float, float]:
    """(PGD accuracy, FGSM accuracy) of ``model`` on (x, y): the guard's probe."""
    pgd = PGD(model, threat, steps=settings.pgd_steps, seed=seed)
    fgsm = FGSM(model, threat)
    return pgd.run(x, y).accuracy, fgsm.run(x, y).accuracy


class OverfittingGuard(TrainCallback):
    """Probes after every epoch (``trainer.measure_guard_accuracies``), records ``metrics["guard"]``, and on a
    collapse restores the snapshot taken at the start of the epoch (``trainer._restore_snapshot``) and asks
    for the epoch to run again."""

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self.batch: tuple[Tensor, Tensor] | None = None
        self.last_good: dict = {}
        self.rolled_back = False

    def on_fit_start(self, trainer: TrainerLike) -> None:
        self.batch = first_samples(trainer.train_data, self.settings.samples, trainer.device)

    def on_train_epoch_start(self, trainer: TrainerLike, epoch: int) -> None:
        if not self.rolled_back:  # after a rollback the model already holds the last good state
            self.last_good = trainer._snapshot()
        self.rolled_back = False

    def on_train_epoch_end(self, trainer: TrainerLike, epoch: int, metrics: dict) -> bool:
        assert self.batch is not None
        probe = self.probe(trainer, self.batch)
        metrics["guard"] = probe
        if probe["collapsed"]:
            self.rolled_back = self.handle_collapse(trainer, epoch, probe) is not None
        return self.rolled_back  # rolled back: run the same epoch again with the safer setting

    def probe(self, trainer: TrainerLike, batch: tuple[Tensor, Tensor]) -> dict:
        """PGD and FGSM accuracy of the current model on the fixed training batch; decide collapse."""
        pgd_acc, fgsm_acc = trainer.measure_guard_accuracies(*batch)
        reference = self.reference(trainer.history)
        rule = self.settings.collapsed(pgd_acc, fgsm_acc, reference)
        collapsed = distributed.broadcast_flag(rule is not None)
        return {"pgd_acc": pgd_acc, "fgsm_acc": fgsm_acc, "reference": reference, "collapsed": collapsed,
                "rule": rule}

    @staticmethod
    def reference(history: list[dict]) -> float | None:
        for metrics in reversed(history):
            if "guard" in metrics:
                return metrics["guard"]["pgd_acc"]
        return None

    def handle_collapse(self, trainer: TrainerLike, epoch: int, probe: dict) -> str | None:
        action = trainer.method.make_safer()
        event = {"event": "catastrophic_overfitting", "epoch": epoch + 1, **probe}
        if action is None:
            event["action"] = "none left: keeping the current model"
            trainer._log_event(event, stacklevel=4)  # the warning points at fit's dispatch
            return None
        trainer._restore_snapshot(self.last_good)
        trainer.lr_scale *= 0.5
        event["action"] = f"rolled back to the end of epoch {epoch}; {action}; learning rate halved " \
                          f"(scale {trainer.lr_scale:g})"
        event["method"] = trainer.method.state_dict()
        trainer._log_event(event, stacklevel=4)  # the warning points at fit's dispatch
        return event["action"]

