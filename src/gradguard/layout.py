"""The names of the files and folders in a run directory, in one place (layer 0: imports nothing).

A run directory holds one model and everything measured on it (``gradguard.report.rundir`` reads it back); a suite
run (the demo) holds several such directories under ``models/``. The commands and ``gradguard.runs`` name the files
through these constants, so that a name is spelled once.
"""
from __future__ import annotations

# what the run is
RUN_FILE = "run.json"  # the manifest: command, data, threat, seed, how it ran
MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_JSON_FILE = "model.json"  # how to rebuild the model (its source)

# training (gradguard.train.Trainer, GradientMonitor)
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"
EVENTS_FILE = "events.jsonl"
CHECKPOINT_DIR = "checkpoint"
GRADFLOW_FILE = "gradflow.jsonl"
CURVATURE_FILE = "curvature.jsonl"

# measurements on the trained model
ATTACKS_FILE = "attacks.json"
EXAMPLES_FILE = "examples.npz"
ROBUSTNESS_FILE = "robustness.json"
JOURNAL_FILE = "robustness.journal.jsonl"  # evaluate's per-block journal, while an evaluation is unfinished
CURVE_FILE = "curve.json"
DIAGNOSIS_FILE = "diagnosis.json"
MASKING_FILE = "masking.json"
CERTIFY_FILE = "certify.json"
CERTIFY_PLOT_FILE = "certify.png"

# the report (gradguard report) and its plots
SUMMARY_FILE = "summary.json"
REPORT_HTML_FILE = "report.html"
REPORT_MD_FILE = "report.md"
PLOTS_DIR = "plots"
HESSIAN_DENSITY_PLOT = "hessian_density.png"
INPUT_CURVATURE_PLOT = "input_curvature.png"

# a suite run (the demo): one run directory per model, one per gradient experiment
MODELS_DIR = "models"
GRADFLOW_DIR = "gradflow"
