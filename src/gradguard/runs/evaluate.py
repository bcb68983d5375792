"""``evaluate_into``: ``gradguard.evaluation.evaluate`` (+ ``evaluate_curve``) on a run's test samples, journaled
for ``--resume``, into robustness.json (+ curve.json); with the suite's channels_last form (``in_layout``) and the
"classic" fallback for a named suite whose attacks are not installed (``runnable_suite``).

``gradguard.workflow`` re-exports the public names; ``gradguard evaluate`` and the demo call ``evaluate_into``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..layout import CURVE_FILE, ROBUSTNESS_FILE
from .console import log
from .context import device_record, test_samples
from .staging import JOURNAL_FILE, holds_journal, one_line


def evaluate_into(run_dir: Path, model, dataset, threat, *, suite, samples: int | None, batch_size: int,
                  curve: list[float] | None, curve_suite, seed: int, device, resume: bool = False,
                  amp: str | None = None, channels_last: bool = False, compile: bool = False) -> dict:
    """gradguard.evaluation.evaluate (+ evaluate_curve) on the first ``samples`` test samples, streamed batch by
    batch; write robustness.json (+ curve.json) atomically at the end.

    Each finished batch is journaled to ``run_dir/robustness.journal.jsonl``; after an interruption, ``resume=True``
    continues from the journal (a journal from another model, suite, threat or data is refused) and ends with the
    report of an uninterrupted run. The journal is removed once robustness.json is written.

    ``amp`` runs the attacks' gradients and queries under autocast (successes re-checked in float32);
    ``channels_last`` runs model and attacks in the NHWC layout. Under torchrun ``evaluate`` shards the batches
    over the ranks itself (each rank journals its own file); rank 0 alone writes the results."""
    import math

    from ..attacks.base import prepare_model
    from ..evaluation import evaluate, evaluate_curve
    from ..io import atomic_write_json
    from ..report.rundir import sample_set
    from ..runtime import distributed

    data = test_samples(dataset)
    if curve:  # the curve runs after the evaluation: its eps are checked for units now, before any work
        threat.with_eps(max(curve)).check_input_size(math.prod(data.input_shape))
    if resume and not holds_journal(run_dir):
        raise ConfigError(f"resume: no unfinished evaluation in {str(run_dir)!r} (no {JOURNAL_FILE}); run without "
                          "--resume")
    suite, note = runnable_suite(suite, threat)
    curve_suite, curve_note = runnable_suite(curve_suite, threat)
    model = prepare_model(model, device, channels_last=channels_last)
    shown = sys.stderr.isatty() and distributed.is_main_process()
    record = device_record(device, amp=amp, channels_last=channels_last)
    report = evaluate(model, data, threat, suite=in_layout(suite, channels_last), batch_size=batch_size, seed=seed,
                      max_samples=samples, progress=shown, journal=run_dir / JOURNAL_FILE, resume=resume, amp=amp,
                      compile=compile)
    robustness = {**_with_class_names(report.to_dict(), data.classes), **record,
                  "sample_set": sample_set(report.n_samples)}
    robustness.update(split=getattr(data, "split_info", None) or None, classes=list(data.classes),
                      class_source=getattr(data, "class_source", "") or None)
    if note:
        robustness["fallback"] = note
    distributed.barrier()  # every rank's journal is closed before rank 0 removes them
    distributed.rank0_first(lambda: _write_and_drop_journal(run_dir, robustness))
    curve_data = None
    if curve:
        curve_data = evaluate_curve(model, data, threat, curve, suite=in_layout(curve_suite, channels_last),
                                    batch_size=batch_size, seed=seed, max_samples=samples, progress=shown,
                                    amp=amp, compile=compile).to_dict()
        curve_data.update(record, sample_set=sample_set(curve_data["n_samples"]))
        if curve_note:
            curve_data["fallback"] = curve_note
        distributed.rank0_first(lambda: atomic_write_json(run_dir / CURVE_FILE, curve_data))
    return {"robustness": robustness, "curve": curve_data}


def _write_and_drop_journal(run_dir: Path, robustness: dict) -> None:
    from ..evaluation.journal import remove_journals
    from ..io import atomic_write_json

    atomic_write_json(run_dir / ROBUSTNESS_FILE, robustness)
    remove_journals(run_dir / JOURNAL_FILE)


def in_layout(suite, channels_last: bool):
    """``suite`` with every named attack set to run in the channels_last layout (as it is without
    ``channels_last``); a suite name becomes its list of specs, which resolve to the same attacks and labels."""
    from ..evaluation.suites import get_suite, procedure_of

    if not channels_last or procedure_of(suite) is not None:  # a procedure suite runs in the default layout
        return suite

    specs = get_suite(suite) if isinstance(suite, str) else list(suite)
    return [{**spec, "channels_last": True} if isinstance(spec, dict) else
            {"name": spec, "channels_last": True} if isinstance(spec, str) else spec for spec in specs]


def runnable_suite(suite, threat) -> tuple[Any, str | None]:
    """The suite itself when all its attacks are installed; else (a named suite only) the "classic" FGSM + PGD-40
    suite and a note saying so, which goes into robustness.json and the report."""
    from ..evaluation import resolve_suite

    try:
        for spec in resolve_suite(suite):
            spec.supports(threat)  # imports the attack class
    except ConfigError as error:
        if not isinstance(suite, str) or "not available" not in str(error):
            raise
        note = (f"suite {suite!r} needs attacks that are not installed ({one_line(error)}); "
                "ran the 'classic' suite (FGSM, PGD-40) instead, which overestimates robustness")
        log(f"[gradguard] warning: {note}")
        return "classic", note
    return suite, None


def _with_class_names(robustness: dict, classes: list[str]) -> dict:
    per_class = robustness.get("per_class")
    if isinstance(per_class, dict) and all(str(k).isdigit() and int(k) < len(classes) for k in per_class):
        robustness["per_class"] = {classes[int(k)]: v for k, v in per_class.items()}
    return robustness
