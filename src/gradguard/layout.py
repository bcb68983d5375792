"""The names of the files and folders in a run directory, in one place (layer 0: imports nothing).

A run directory holds one model and everything measured on it (``gradguard.report.rundir`` reads it back); a suite
run (the demo) holds several such directories under ``models/``. Every module that reads or writes one of these files
(the commands, ``gradguard.runs``, the trainer, the monitor, the report, ...) names it through these constants, so
that a name is spelled once; ``tests/test_architecture.py`` (R9) holds that.
"""
from __future__ import annotations

# what the run is
RUN_FILE = "run.json"  # the manifest: command, data, threat, seed, how it ran
MODEL_WEIGHTS_FILE = "model.safetensors"  # the weights (gradguard.models.save)
MODEL_JSON_FILE = "model.json"  # how to rebuild the model (its source)

# training (gradguard.train.Trainer, GradientMonitor)
CONFIG_FILE = "config.json"  # the trainer's resolved configuration, compared on resume
METRICS_FILE = "metrics.jsonl"  # one record per epoch
STEPS_FILE = "steps.jsonl"  # one record per optimiser step
EVENTS_FILE = "events.jsonl"  # what the trainer's callbacks did (guard, early stop, monitor actions)
CHECKPOINT_DIR = "checkpoint"  # the newest training checkpoints, for resume
CHECKPOINT_STEM = "epoch-{epoch:04d}"  # one checkpoint in CHECKPOINT_DIR: STEM.safetensors + STEM.json
CHECKPOINT_RECORDS = "epoch-*.json"  # the JSON halves of every checkpoint in CHECKPOINT_DIR (a glob pattern)
GRADFLOW_FILE = "gradflow.jsonl"  # the gradient monitor's records (also its default file in a framework's run)
CURVATURE_FILE = "curvature.jsonl"  # the monitor's sharpness records, beside GRADFLOW_FILE

# measurements on the trained model
ATTACKS_FILE = "attacks.json"  # results of `gradguard attack`, per threat
EXAMPLES_FILE = "examples.npz"  # clean / adversarial images for the report's grid
ROBUSTNESS_FILE = "robustness.json"  # the suite evaluation (RobustnessReport.to_json)
JOURNAL_FILE = "robustness.journal.jsonl"  # evaluate's per-block journal, while an evaluation is unfinished
CURVE_FILE = "curve.json"  # accuracy against eps (RobustnessCurve.to_json)
DIAGNOSIS_FILE = "diagnosis.json"  # gradient findings and curvature (also written beside GRADFLOW_FILE)
MASKING_FILE = "masking.json"  # the gradient-masking checklist (MaskingReport.to_json)
CERTIFY_FILE = "certify.json"  # randomized-smoothing certificates (`gradguard certify`)
CERTIFY_PLOT_FILE = "certify.png"  # certified accuracy against radius

# the report (gradguard report) and its plots
SUMMARY_FILE = "summary.json"  # the numbers the report shows
REPORT_HTML_FILE = "report.html"  # the self-contained report page
REPORT_MD_FILE = "report.md"  # the report as markdown tables
PLOTS_DIR = "plots"  # the report's and diagnose's PNGs
HESSIAN_DENSITY_PLOT = "hessian_density.png"  # in PLOTS_DIR, by `diagnose --curvature`
INPUT_CURVATURE_PLOT = "input_curvature.png"  # in PLOTS_DIR, by `diagnose --curvature`

# a suite run (the demo): one run directory per model, one per gradient experiment
MODELS_DIR = "models"  # models/<label>/: one model run each
GRADFLOW_DIR = "gradflow"  # gradflow/<label>/: one gradient experiment each
