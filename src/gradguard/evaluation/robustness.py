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
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.base import check_labels, check_logits, model_guard, voted_logits
from ..errors import ConfigError, InputError
from ..io import atomic_write_text
from ..models.outputs import as_logits_model, inner_model
from ..threat import ThreatModel, threat_from_dict
from ..threat import check_threat as _check_threat  # its home is threat.py now
from .distributed import Shard, batch_seed, check_same_stream, resolve_shard
from .journal import FORMAT as JOURNAL_FORMAT
from .journal import JournalWriter, model_fingerprint, own_file, read_journals, remove_journals
from .stream import Block, BlockSource, collect, release_freed_memory
from .suites import AttackSpec, procedure_of, resolve_suite

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
    journal: str | Path | None = None,
    resume: bool = False,
    amp: str | None = None,
    compile: bool = False,
) -> RobustnessReport:
    """Clean and worst-case robust accuracy of ``model`` under ``threat`` against an attack ``suite``.

    The data is streamed: it is cut into blocks of ``batch_size`` samples and the whole cascade (clean prediction,
    then each attack on the samples still robust) runs on one block before the next is read, so memory is set by
    ``batch_size``, not by the dataset; only small per-sample results are kept.

    Args:
        data: an ``(x, y)`` pair of tensors, a map-style ``Dataset`` (read with ``get_batch`` when it has one) or
            any iterable of ``(x, y)`` batches (a DataLoader); ``max_samples`` caps it. Results do not depend on
            the form nor on a loader's own batch size.
        suite: "quick" (APGD-CE), "standard" (APGD-CE → APGD-T → FAB-T → Square, AutoAttack's budgets), "lite"
            (the same without FAB-T), any name in ``SUITES``, or a list of specs: attack names, dicts
            ``{"name": ..., **kwargs}``, or ``Attack`` objects. Attacks that do not support the threat's norm are
            skipped and listed in ``report.skipped``.
        seed: fixes every random start and restart (each attack on each block gets a seed derived from it);
            None uses torch's global RNG.
        distributed: None shards the blocks over ranks when torch.distributed is initialised with several
            processes (every rank passes the same data; every rank gets the full report); False never does.
        journal: a file to which each finished block is appended (one JSON line, fsync'd). Without ``resume`` an
            existing journal there is replaced; under torchrun each rank writes ``PATH.rank{r}``.
        resume: skip the blocks the journal(s) at ``journal`` already hold and end with the report an
            uninterrupted run gives. A journal from another model, suite, threat, seed, batch size, sample cap or
            data is refused with a ``ConfigError``.
        amp: "bf16" or "fp16" runs every named attack's gradients and queries under autocast (GPU speed); every
            success is re-checked by a full-precision forward pass, so low precision never breaks a sample by itself.
        compile: run every named attack's passes through ``torch.compile`` (an eager fallback with one warning
            if compiling fails); off by default: it pays on larger models only (see ``Attack``).

    ``report.elapsed_s`` is the wall time of the whole evaluation: after ``resume`` the sum of every part's time
    (each earlier part counted up to its last journaled block, as recorded in the journal), listed part by part in
    ``report.elapsed_parts_s`` (empty for an evaluation that ran in one go).

    The model's mode, parameters, ``requires_grad`` flags and ``.grad`` fields are left as they were.
    """
    started = time.perf_counter()
    _check_model(model)
    model = as_logits_model(model)  # a dict / tuple / ModelOutput: its logits (gradguard.models.Logits)
    _check_threat(threat)
    specs = resolve_suite(suite, amp=amp, compile=compile)
    source = BlockSource(data, threat, batch_size, max_samples)
    shard = resolve_shard(distributed)
    _check_journal_arguments(journal, resume, return_adversarial)
    procedure = procedure_of(suite)
    adaptive = None
    if procedure is not None:
        from .adaptive import AdaptiveCascade

        adaptive = AdaptiveCascade(model, specs, seed, source.batch_size, procedure)
    cascade = adaptive if adaptive is not None else Cascade(model, specs, seed)
    finished: dict[int, BlockOutcome] = {}
    earlier: list[float] = []  # seconds of each earlier part of a resumed evaluation
    part = 1
    outcomes: list[BlockOutcome] = []
    writer: JournalWriter | None = None
    n_blocks = 0
    notes: list[str] = []
    outputs: int | None = None
    with model_guard(model):
        try:
            for index, read in _progress_blocks(source, progress, shard):
                n_blocks = index + 1
                block = read() if index == 0 or (shard.owns(index) and index not in finished) else None
                if index == 0:
                    assert block is not None
                    notes = [] if procedure else randomness_warnings(model, block.x.to(cascade.device), threat, suite)
                    outputs = output_width(model, block.x[:1].to(cascade.device))
                    if shard.active:
                        check_same_stream(shard, source.n, block.fingerprint())
                    if journal is not None:
                        header = _journal_header(inner_model(model), specs, threat, seed, source, block, procedure)
                        finished, earlier, writer = _open_journal(Path(journal), header, resume, shard)
                        part = len(earlier) + 1
                if block is None or not shard.owns(index) or index in finished:
                    continue
                outcome = cascade.run_block(block, threat, keep_adversarial=return_adversarial)
                outcomes.append(outcome)
                if writer is not None:  # each block also records its part and that part's time so far
                    writer.append({**outcome.to_record(), "part": part,
                                   "part_elapsed_s": round(time.perf_counter() - started, 3)})
                release_freed_memory()
            outcomes = shard.gather(outcomes) + [o for o in finished.values() if o.index < n_blocks]
            if adaptive is not None:  # the second pass: the escalations, where the evidence calls for them
                outcomes = adaptive.escalate(source, _complete(outcomes, n_blocks), threat, shard, writer,
                                            return_adversarial)
        finally:
            if writer is not None:
                writer.close()
    parts = earlier + [round(time.perf_counter() - started, 3)]
    report = _report(outcomes, n_blocks, specs, threat, sum(parts), seed, shard, return_adversarial)
    report.warnings = notes + chance_warnings(data, report, outputs)
    report.elapsed_parts_s = parts if len(parts) > 1 else []
    if adaptive is not None:
        adaptive.finish(report, _complete(outcomes, n_blocks), threat)
    return report


def output_width(model: nn.Module, x: Tensor) -> int | None:
    """The number of logits the model returns for one sample (None when its output is not a (1, K) tensor),
    from a pass that leaves the random number generators as they were."""
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            out = model(x)
    except Exception:  # the evaluation's own passes report a bad model
        return None
    return int(out.shape[-1]) if isinstance(out, Tensor) and out.ndim == 2 else None


def chance_warnings(data: Any, report: RobustnessReport, outputs: int | None = None) -> list[str]:
    """Clean accuracy at chance level or below it: the signature of labels that do not match the model's outputs
    (a folder's class order, most often); the warning names that cause (``gradguard.data.chance_warning``).
    Chance is 1/K for the data's classes, else the model's ``outputs``, else the classes seen in the labels."""
    from ..data.labels import chance_warning

    classes = getattr(data, "classes", None)
    num_classes = len(classes) if classes else outputs or len(report.per_class or {})
    note = chance_warning(report.clean_accuracy, num_classes, report.n_samples, getattr(data, "name", None),
                          getattr(data, "class_source", None))
    if note is None:
        return []
    warnings.warn(f"evaluate: {note}", stacklevel=3)
    return [note]


def randomness_warnings(model: nn.Module, x: Tensor, threat: ThreatModel, suite: Any) -> list[str]:
    """The masking checklist's determinism check on one block, for a named suite other than "rand": a model whose
    logits change between identical calls (the check FAILs) needs EOT and majority votes, which "rand" runs."""
    if not isinstance(suite, str) or suite == "rand":
        return []
    from ..diagnostics.masking import FAIL, _Probe

    check = _Probe(model, threat, 0, 1, x.shape[0]).determinism(x)
    if check.status != FAIL:  # a WARN is float non-determinism (GPU kernels), not a randomised defence
        return []
    note = (f"the model is randomised (its logits change by up to {check.evidence['max_relative_logit_change']:.2g} "
            f"between identical calls; {100 * check.evidence['prediction_flips']:.0f} % of predictions flip): "
            f"suite {suite!r} judges each sample on one draw, which overstates robustness; evaluate with "
            "suite='rand' (EOT over 20 draws, success by majority vote)")
    warnings.warn(f"evaluate: {note}", stacklevel=3)
    return [note]


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
    def predict(self, x: Tensor, y: Tensor) -> Tensor:
        """Clean predictions of one block (and a check that its labels fit the model's classes)."""
        logits = check_logits(self.model(x), x.shape[0])
        check_labels(y, logits.shape[1], "data")
        return logits.argmax(1)

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


def _skipped(specs: list[AttackSpec], threat: ThreatModel) -> list[dict]:
    if threat.eps == 0:
        return []
    return [{"label": s.label, "reason": f"does not support the {threat.norm} norm"}
            for s in specs if not s.supports(threat)]


def _report(outcomes: list[BlockOutcome], n_blocks: int, specs: list[AttackSpec], threat: ThreatModel,
            elapsed: float, seed: int | None, shard: Shard, keep_adversarial: bool) -> RobustnessReport:
    outcomes = _complete(outcomes, n_blocks)
    labels = torch.cat([o.labels for o in outcomes])
    clean_correct = torch.cat([o.clean_pred for o in outcomes]) == labels
    broken_by = torch.cat([o.broken_by for o in outcomes])
    robust = clean_correct & (broken_by == NOT_BROKEN)
    skipped = _skipped(specs, threat)
    ran = [(k, s) for k, s in enumerate(specs) if s.label not in {item["label"] for item in skipped}]
    per_attack = {s.label: _mean(clean_correct & ((broken_by == NOT_BROKEN) | (broken_by > k))) for k, s in ran}
    times = {s.label: round(sum(o.time_s.get(s.label, 0.0) for o in outcomes), 3) for _, s in ran}
    x_adv = torch.cat([o.x_adv for o in outcomes if o.x_adv is not None]) if keep_adversarial else None
    budget = {s.label: {"gradients": sum(o.budget.get(s.label, (0, 0))[0] for o in outcomes),
                        "forwards": sum(o.budget.get(s.label, (0, 0))[1] for o in outcomes)} for _, s in ran}
    return RobustnessReport(
        clean_accuracy=_mean(clean_correct), robust_accuracy=_mean(robust),
        per_attack=per_attack, per_class=per_class_table(labels, clean_correct, robust),
        n_samples=int(labels.shape[0]), threat=threat.to_dict(), suite=[s.label for _, s in ran],
        elapsed_s=round(elapsed, 3), robust=robust, clean_correct=clean_correct, broken_by=broken_by,
        predictions_adv=torch.cat([o.predictions_adv for o in outcomes]), labels=labels, x_adv=x_adv,
        attacks=[s.to_dict() for s in specs], skipped=skipped, attack_time_s=times, seed=seed,
        world_size=shard.world_size, attack_budget=budget,
    )


def _budget_text(budget: dict[str, int] | None) -> str:
    """", 12.3k gradients, 1.2M queries": what an attack spent (per-sample passes), for the summary table."""
    if not budget:
        return ""
    parts = [f"{_count(budget[key])} {name}" for key, name in (("gradients", "gradients"), ("forwards", "queries"))
             if budget.get(key)]
    return ", " + ", ".join(parts) if parts else ""


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _complete(outcomes: list[BlockOutcome], n_blocks: int) -> list[BlockOutcome]:
    """The outcomes in block order; every block of the stream must be there exactly once."""
    if n_blocks == 0:
        raise InputError("data: the loader yielded no batches; pass a non-empty dataset")
    by_index = {o.index: o for o in outcomes}
    missing = sorted(set(range(n_blocks)) - set(by_index))
    if missing:
        raise InputError(f"data: blocks {missing[:5]} were not evaluated; every rank must pass the same data")
    return [by_index[i] for i in range(n_blocks)]


def _progress_blocks(source: BlockSource, progress: bool, shard: Shard) -> Iterator[tuple[int, Callable[[], Block]]]:
    if not progress or shard.rank != 0:
        return source.blocks()
    from ..runtime.progress import progress_bar

    total = None if source.n is None else math.ceil(source.n / source.batch_size)
    return iter(progress_bar(source.blocks(), total=total, desc="blocks"))


# ------------------------------------------------------------------------------------------------
# The journal
# ------------------------------------------------------------------------------------------------
def _check_journal_arguments(journal: str | Path | None, resume: bool, return_adversarial: bool) -> None:
    if resume and journal is None:
        raise ConfigError("resume: True needs journal=PATH, the journal of the run to resume")
    if resume and return_adversarial:
        raise ConfigError("resume: the journal holds per-sample outcomes, not adversarial points; "
                          "pass return_adversarial=False to resume, or drop resume to run again")


def _journal_header(model: nn.Module, specs: list[AttackSpec], threat: ThreatModel, seed: int | None,
                    source: BlockSource, first: Block, procedure: dict | None = None) -> dict:
    from .._version import __version__

    suite = [{"label": s.label, "name": s.name, "instance": type(s.instance).__name__} if s.instance is not None
             else s.to_dict() for s in specs]
    if procedure is not None:  # a procedure suite: its settings are part of what the journal must match
        suite = [{"procedure": procedure}] + suite
    return {"journal": "gradguard-evaluate", "format": JOURNAL_FORMAT, "version": __version__,
            "model": model_fingerprint(model), "suite": suite, "threat": threat.to_dict(), "seed": seed,
            "batch_size": source.batch_size, "max_samples": source.max_samples,
            "data": {"n": source.n, "first_block": first.fingerprint()}}


def _open_journal(path: Path, header: dict, resume: bool,
                  shard: Shard) -> tuple[dict[int, BlockOutcome], list[float], JournalWriter]:
    """Finished blocks (resume) or a fresh start (the old journals removed), the seconds of each earlier part
    (per part the slowest rank's time up to its last journaled block), and this rank's writer."""
    finished: dict[int, BlockOutcome] = {}
    parts: dict[int, float] = {}
    if resume:
        records = read_journals(path, header)
        finished = {i: BlockOutcome.from_record(r) for i, r in records.items()}
        for record in records.values():
            if isinstance(record.get("part"), int) and isinstance(record.get("part_elapsed_s"), (int, float)):
                parts[record["part"]] = max(parts.get(record["part"], 0.0), float(record["part_elapsed_s"]))
    elif shard.rank == 0:
        remove_journals(path)
    shard.barrier()  # every rank has read (or rank 0 has removed) before any rank writes
    earlier = [parts.get(p, 0.0) for p in range(1, max(parts, default=0) + 1)]
    return finished, earlier, JournalWriter(own_file(path, shard.rank, shard.world_size), header)


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
        from ..viz.robustness import curve

        return curve(self.eps, self.robust_accuracy, self.clean_accuracy, self.threat.get("norm", ""), self.suite,
                     path)


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
    amp: str | None = None,
    compile: bool = False,
) -> RobustnessCurve:
    """Worst-case robust accuracy at each eps in ``eps_values`` (sorted ascending in the result).

    Work is reused where it is sound: the eps-ball grows with eps, so a sample broken at a smaller eps stays
    broken at every larger one and is not attacked again; at each eps only the samples robust at the previous
    eps are attacked. (The converse — robust at a larger eps implies robust at a smaller one — is true of the
    model but not of heuristic attacks, so it is never used.) The curve is therefore non-increasing.
    """
    started = time.perf_counter()
    _check_model(model)
    model = as_logits_model(model)  # a dict / tuple / ModelOutput: its logits (gradguard.models.Logits)
    _check_threat(threat)
    eps_list = _eps_values(eps_values)
    if procedure_of(suite) is not None:
        raise ConfigError(f"suite: {suite!r} is a procedure (its escalations depend on evidence from the whole "
                          "evaluation) and has no curve; use a list suite for the curve, e.g. 'quick'")
    largest = threat.with_eps(eps_list[-1])  # an eps in the wrong units is refused (L2 / L1: at the first block)
    specs = resolve_suite(suite, amp=amp, compile=compile)
    source = BlockSource(data, largest, batch_size, max_samples)
    shard = resolve_shard(distributed)
    cascade = Cascade(model, specs, seed)
    tallies: list[dict] = []
    with model_guard(model):
        for index, read in _progress_blocks(source, progress, shard):
            block = read() if index == 0 or shard.owns(index) else None
            if index == 0 and shard.active:
                assert block is not None
                check_same_stream(shard, source.n, block.fingerprint())
            if block is not None and shard.owns(index):
                tallies.append(_curve_block(cascade, block, threat, eps_list))
                release_freed_memory()
    total = _sum_tallies(shard.gather(tallies), len(eps_list))
    n = total["n"]
    if n == 0:
        raise InputError("data: the loader yielded no batches; pass a non-empty dataset")
    return RobustnessCurve(eps=eps_list, robust_accuracy=[r / n for r in total["robust"]],
                           clean_accuracy=total["clean"] / n, n_samples=n, threat=threat.to_dict(),
                           suite=[s.label for s in specs],
                           per_attack=[{label: count / n for label, count in table.items()}
                                       for table in total["survivors"]],
                           attacked=total["attacked"], elapsed_s=round(time.perf_counter() - started, 3), seed=seed)


def _curve_block(cascade: Cascade, block: Block, threat: ThreatModel, eps_list: list[float]) -> dict:
    """Counts of one block at every eps: a sample broken at a smaller eps is not attacked at the larger ones."""
    x, y = block.x.to(cascade.device), block.y.to(cascade.device)
    clean_pred = cascade.predict(x, y)
    robust = clean_pred == y
    tally: dict = {"n": int(y.shape[0]), "clean": int(robust.sum()), "attacked": [], "robust": [], "survivors": []}
    for i, eps in enumerate(eps_list):
        tally["attacked"].append(int(robust.sum()))
        result = cascade.run(x, y, robust, clean_pred, threat.with_eps(eps), block.index, i * len(cascade.specs),
                             keep_adversarial=False)
        robust = result.robust
        tally["robust"].append(int(robust.sum()))
        tally["survivors"].append(result.survivors)
    return tally


def _sum_tallies(tallies: list[dict], n_eps: int) -> dict:
    total: dict = {"n": 0, "clean": 0, "attacked": [0] * n_eps, "robust": [0] * n_eps,
                   "survivors": [{} for _ in range(n_eps)]}
    for tally in tallies:
        total["n"] += tally["n"]
        total["clean"] += tally["clean"]
        for i in range(n_eps):
            total["attacked"][i] += tally["attacked"][i]
            total["robust"][i] += tally["robust"][i]
            for label, count in tally["survivors"][i].items():
                total["survivors"][i][label] = total["survivors"][i].get(label, 0) + count
    return total


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
def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise InputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def collect_data(data: Any, threat: ThreatModel, max_samples: int | None = None) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors from any data form ``evaluate`` takes, checked and capped (held in memory: small sets)."""
    return collect(BlockSource(data, threat, 1024, max_samples))


def _mean(mask: Tensor) -> float:
    """The fraction of True entries, as an exact count / n (so reports and curves agree to the last digit)."""
    return int(mask.sum()) / mask.numel() if mask.numel() else float("nan")


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
