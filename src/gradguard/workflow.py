"""Train, attack, evaluate and diagnose a model INTO a run directory — the work behind every CLI command.

A *run directory* (layout: ``gradguard.report.rundir``) holds one model and everything measured on it, so that
``gradguard report`` can rebuild the report at any time. The functions here are what the ``gradguard`` commands
call; they are plain Python, so a script or a notebook can build the same run directories::

    from gradguard import workflow
    with workflow.staged_run_dir("runs/pgd") as staging:
        workflow.train_into(staging, workflow.load_data("digits"), model_name="mlp", method="pgd", ...)
    model = workflow.load_run_model(Path("runs/pgd"), "cpu")
    workflow.attack_into(Path("runs/pgd"), model, dataset, threat, ["fgsm", "pgd"], samples=500, ...)

Files are never half-written: a new run directory is built in a staging folder and renamed into place on
success (``staged_run_dir``); results added to an existing run are written atomically after all the work.

This module is a facade: the code lives in ``gradguard.runs``, one module per concern (``console``, ``context``,
``staging``, ``train``, ``attack``, ``evaluate``, ``diagnose``, ``demo``), and ``gradguard.workflow`` stays the
documented path to it.
"""
from __future__ import annotations

from .runs.attack import (  # noqa: F401
    ATTACK_SAMPLES,
    EXAMPLES_SHOWN,
    ExamplePicker,
    attack_into,
    merge_attack_results,
    run_samples,
)
from .runs.console import NOTES, log, progress, say, say_notes, timed  # noqa: F401
from .runs.context import (  # noqa: F401
    DEFAULT_EPS,
    absolute_path,
    absolute_source,
    available_attacks,
    chance_note,
    check_first_pass,
    data_record,
    device_record,
    iter_batches,
    load_data,
    load_run_model,
    make_attack,
    make_threat_from,
    open_test_split,
    resolve_device,
    resolve_model,
    run_dataset,
    run_threat,
    samples_label,
    say_classes,
    start_model_run,
    test_samples,
    test_split,
)
from .runs.demo import DEMO_FMNIST, DEMO_SETTINGS, demo_into, demo_settings, suite_name  # noqa: F401
from .runs.diagnose import diagnose_into  # noqa: F401
from .runs.evaluate import evaluate_into, in_layout, runnable_suite  # noqa: F401
from .runs.staging import (  # noqa: F401
    JOURNAL_FILE,
    KeptPartialRun,
    check_writable,
    holds_journal,
    one_line,
    read_manifest,
    staged_run_dir,
    write_manifest,
)
from .runs.train import train_into  # noqa: F401
