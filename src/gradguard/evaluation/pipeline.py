"""evaluate(): the data streamed block by block, each block through the cascade, journaled, then one report.

The protocol follows AutoAttack (Croce & Hein, ICML 2020): samples the model already misclassifies are never
attacked (they count as not robust); each attack runs only on the samples every earlier attack failed on; a
sample is robust only if no attack found an adversarial point for it. The cascade itself is ``cascade.py``, the
result types ``results.py``; this module wires stream -> cascade -> journal -> report, with the journal header
and resume glue and the warnings (chance-level accuracy, a randomised model) a report carries.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.base import model_guard
from ..errors import ConfigError, InputError
from ..models.outputs import as_logits_model, inner_model
from ..threat import ThreatModel, check_threat
from .cascade import NOT_BROKEN, BlockOutcome, Cascade, check_model
from .distributed import Shard, check_same_stream, resolve_shard
from .journal import FORMAT as JOURNAL_FORMAT
from .journal import JournalWriter, model_fingerprint, own_file, read_journals, remove_journals
from .randomness import randomness_warnings
from .results import RobustnessReport, exact_mean, per_class_table
from .stream import Block, BlockSource, progress_blocks, release_freed_memory
from .suites import AttackSpec, procedure_of, resolve_suite


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
    check_model(model)
    model = as_logits_model(model)  # a dict / tuple / ModelOutput: its logits (gradguard.models.Logits)
    check_threat(threat)
    specs = resolve_suite(suite, amp=amp, compile=compile)
    source = BlockSource(data, threat, batch_size, max_samples)
    shard = resolve_shard(distributed)
    _check_journal_arguments(journal, resume, return_adversarial)
    procedure = procedure_of(suite)
    adaptive = None
    if procedure is not None:
        if isinstance(data, Iterator):  # a generator: it cannot come again for the escalations
            raise InputError(f"data: the {suite!r} suite reads the data a second time where its evidence calls for "
                             "escalations, and a one-shot iterator cannot be read again; pass tensors, a Dataset or "
                             "a DataLoader, or choose suite='standard' to stream it once")
        from .adaptive import AdaptiveCascade

        adaptive = AdaptiveCascade(model, specs, seed, source.batch_size, procedure, threat.norm)
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
            for index, read in progress_blocks(source, progress, shard):
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


def _skipped(specs: list[AttackSpec], threat: ThreatModel) -> list[dict]:
    if threat.eps == 0:
        return []
    return [{"label": s.label, "reason": s.unsupported(threat)} for s in specs if not s.supports(threat)]


def _report(outcomes: list[BlockOutcome], n_blocks: int, specs: list[AttackSpec], threat: ThreatModel,
            elapsed: float, seed: int | None, shard: Shard, keep_adversarial: bool) -> RobustnessReport:
    outcomes = _complete(outcomes, n_blocks)
    labels = torch.cat([o.labels for o in outcomes])
    clean_correct = torch.cat([o.clean_pred for o in outcomes]) == labels
    broken_by = torch.cat([o.broken_by for o in outcomes])
    robust = clean_correct & (broken_by == NOT_BROKEN)
    skipped = _skipped(specs, threat)
    ran = [(k, s) for k, s in enumerate(specs) if s.label not in {item["label"] for item in skipped}]
    per_attack = {s.label: exact_mean(clean_correct & ((broken_by == NOT_BROKEN) | (broken_by > k))) for k, s in ran}
    times = {s.label: round(sum(o.time_s.get(s.label, 0.0) for o in outcomes), 3) for _, s in ran}
    x_adv = torch.cat([o.x_adv for o in outcomes if o.x_adv is not None]) if keep_adversarial else None
    budget = {s.label: {"gradients": sum(o.budget.get(s.label, (0, 0))[0] for o in outcomes),
                        "forwards": sum(o.budget.get(s.label, (0, 0))[1] for o in outcomes)} for _, s in ran}
    return RobustnessReport(
        clean_accuracy=exact_mean(clean_correct), robust_accuracy=exact_mean(robust),
        per_attack=per_attack, per_class=per_class_table(labels, clean_correct, robust),
        n_samples=int(labels.shape[0]), threat=threat.to_dict(), suite=[s.label for _, s in ran],
        elapsed_s=round(elapsed, 3), robust=robust, clean_correct=clean_correct, broken_by=broken_by,
        predictions_adv=torch.cat([o.predictions_adv for o in outcomes]), labels=labels, x_adv=x_adv,
        attacks=[s.to_dict() for s in specs], skipped=skipped, attack_time_s=times, seed=seed,
        world_size=shard.world_size, attack_budget=budget,
    )


def _complete(outcomes: list[BlockOutcome], n_blocks: int) -> list[BlockOutcome]:
    """The outcomes in block order; every block of the stream must be there exactly once."""
    if n_blocks == 0:
        raise InputError("data: the loader yielded no batches; pass a non-empty dataset")
    by_index = {o.index: o for o in outcomes}
    missing = sorted(set(range(n_blocks)) - set(by_index))
    if missing:
        raise InputError(f"data: blocks {missing[:5]} were not evaluated; every rank must pass the same data")
    return [by_index[i] for i in range(n_blocks)]


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
