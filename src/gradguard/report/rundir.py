"""The run-directory layout and a tolerant reader for it.

A *model run* is a directory with one model and what was measured on it::

    run.json          what made the run (command, dataset, arguments, versions) — written by the CLI
    config.json       the trainer's resolved configuration          (gradguard.train.Trainer)
    model.safetensors + model.json                                    (gradguard.models.save)
    metrics.jsonl     one record per epoch                            (Trainer)
    attacks.json      per-attack results of `gradguard attack`, per threat (``attack_groups``)
    examples.npz      clean / adversarial images and predictions for the report's grid
    robustness.json   gradguard.evaluation.RobustnessReport.to_json()
    curve.json        gradguard.evaluation.RobustnessCurve.to_json()
    masking.json      gradguard.diagnostics.MaskingReport.to_json()
    certify.json      gradguard.certify(...).to_dict(): certified radii of the smoothed model (`gradguard certify`)
    gradflow.jsonl    GradientMonitor records;   diagnosis.json   findings + curvature of `gradguard diagnose`

A *suite run* (what `gradguard demo` writes) holds several model runs under ``models/<label>/`` and gradient
experiments under ``gradflow/<label>/``. ``read_run`` returns both kinds in one shape.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from ..layout import (
    ATTACKS_FILE,
    CERTIFY_FILE,
    CONFIG_FILE,
    CURVE_FILE,
    DIAGNOSIS_FILE,
    EXAMPLES_FILE,
    GRADFLOW_DIR,
    GRADFLOW_FILE,
    MASKING_FILE,
    METRICS_FILE,
    MODEL_JSON_FILE,
    MODELS_DIR,
    ROBUSTNESS_FILE,
    RUN_FILE,
)

RESULT_FILES = (RUN_FILE, CONFIG_FILE, MODEL_JSON_FILE, METRICS_FILE, ATTACKS_FILE, EXAMPLES_FILE, ROBUSTNESS_FILE,
                CURVE_FILE, MASKING_FILE, GRADFLOW_FILE, DIAGNOSIS_FILE, CERTIFY_FILE)


@dataclass
class ModelRun:
    """Everything found in one model run directory; missing files are None (or empty)."""

    label: str
    path: Path
    manifest: dict = field(default_factory=dict)
    config: dict | None = None
    sidecar: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    attacks: dict | None = None
    examples: dict[str, np.ndarray] | None = None
    robustness: dict | None = None
    curve: dict | None = None
    masking: dict | None = None
    gradflow: list[dict] = field(default_factory=list)
    diagnosis: dict | None = None
    certify: dict | None = None


@dataclass
class RunData:
    path: Path
    manifest: dict
    models: list[ModelRun]
    gradient_runs: list[ModelRun]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes") or next(
            (m.manifest.get("classes") for m in self.models if m.manifest.get("classes")), []) or [])


def is_model_run(path: Path) -> bool:
    return any((path / name).exists() for name in RESULT_FILES[1:])


def read_run(run_dir: str | Path) -> RunData:
    """Read a model run or a suite run; CheckpointError if the directory is missing, empty or corrupt."""
    path = Path(run_dir)
    if not path.is_dir():
        raise CheckpointError(f"run_dir: no run directory at {str(path)!r}; pass the --out folder of a gradguard "
                              "command (e.g. runs/demo)")
    manifest = read_json(path / RUN_FILE) or {}
    models = [read_model_run(p) for p in _subruns(path / MODELS_DIR)]
    if is_model_run(path):
        models.insert(0, read_model_run(path, label=manifest.get("label") or path.name))
    gradient_runs = [read_model_run(p) for p in _subruns(path / GRADFLOW_DIR)]
    if not models and not gradient_runs and not manifest:
        raise CheckpointError(f"run_dir: {str(path)!r} holds no gradguard results (no run.json, model or result "
                              "files); run `gradguard train` or `gradguard demo` first")
    return RunData(path, manifest, models, gradient_runs)


def read_model_run(path: Path, label: str | None = None) -> ModelRun:
    manifest = read_json(path / RUN_FILE) or {}
    return ModelRun(
        label=label or manifest.get("label") or path.name, path=path, manifest=manifest,
        config=read_json(path / CONFIG_FILE), sidecar=read_json(path / MODEL_JSON_FILE),
        metrics=read_jsonl(path / METRICS_FILE), attacks=read_json(path / ATTACKS_FILE),
        examples=read_npz(path / EXAMPLES_FILE), robustness=read_json(path / ROBUSTNESS_FILE),
        curve=read_json(path / CURVE_FILE), masking=read_json(path / MASKING_FILE),
        gradflow=read_jsonl(path / GRADFLOW_FILE), diagnosis=read_json(path / DIAGNOSIS_FILE),
        certify=read_json(path / CERTIFY_FILE),
    )


def read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"run_dir: {str(path)!r} is not valid JSON ({error}); delete it and re-run the command "
                              "that writes it") from None


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError) as error:
        raise CheckpointError(f"run_dir: cannot read {str(path)!r} ({error}); re-run the command that writes it") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as error:
            raise CheckpointError(f"run_dir: line {number} of {str(path)!r} is not valid JSON ({error}); the file is "
                                  "corrupt — re-run the command that writes it") from None
    return records


def read_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except Exception as error:
        raise CheckpointError(f"run_dir: {str(path)!r} is corrupt ({type(error).__name__}: {error}); re-run "
                              "`gradguard attack` to rewrite it") from None


def _subruns(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    runs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(runs, key=lambda p: ((read_json(p / RUN_FILE) or {}).get("order", 0), p.name))


def attack_groups(attacks: dict | None) -> list[dict]:
    """The results of attacks.json, one group per threat: ``{threat, n_samples, clean_accuracy, labels, results}``.

    The top level holds the latest ``gradguard attack`` run; ``other_threats`` the earlier ones at another norm or
    eps (a file written before that list existed is one group)."""
    if not attacks:
        return []
    keys = ("threat", "n_samples", "sample_set", "clean_accuracy", "labels", "results")
    latest = {key: attacks.get(key) for key in keys if key in attacks}
    groups = [latest] if latest.get("results") else []
    return groups + [dict(group) for group in attacks.get("other_threats") or [] if isinstance(group, dict)]


def sample_set(count: int, start: int = 0) -> dict:
    """Which test samples a result used: ``count`` consecutive samples of the run's test split from index ``start``
    (recorded as ``sample_set`` in robustness.json and in each attacks.json group)."""
    return {"start": int(start), "count": int(count)}


def result_samples(result: dict | None) -> tuple[dict | None, list | None, int | None]:
    """(sample set, per-sample labels, sample count) of robustness.json or of one attacks.json group."""
    if not isinstance(result, dict):
        return None, None, None
    labels = result.get("labels")
    if labels is None and isinstance(result.get("samples"), dict):
        labels = result["samples"].get("label")
    recorded = result.get("sample_set")
    return (recorded if isinstance(recorded, dict) else None), (labels if isinstance(labels, list) else None), \
        result.get("n_samples")


def same_samples(a: dict | None, b: dict | None) -> bool:
    """Whether two results (robustness.json, attacks.json groups) were measured on the same test samples: the same
    labels in the same order, the same count and, where both recorded it, the same sample set (first index, count).
    A result that recorded no per-sample labels is never taken to share samples with another: its numbers are then
    shown apart rather than mixed."""
    set_a, labels_a, n_a = result_samples(a)
    set_b, labels_b, n_b = result_samples(b)
    if labels_a is None or labels_b is None or labels_a != labels_b:
        return False
    if n_a is not None and n_b is not None and n_a != n_b:
        return False
    return set_a is None or set_b is None or set_a == set_b


def same_threat(a: dict | None, b: dict | None) -> bool:
    """Two threat dicts name the same threat: the same norm and the same eps (up to float rounding)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    try:
        eps_a, eps_b = float(a["eps"]), float(b["eps"])
    except (KeyError, TypeError, ValueError):
        return False
    return str(a.get("norm")).lower() == str(b.get("norm")).lower() and abs(eps_a - eps_b) <= 1e-9 * max(1.0, abs(eps_a))


def threat_label(threat: dict | None) -> str:
    """``linf eps=0.1``: how reports and tables name a threat."""
    if not isinstance(threat, dict):
        return "threat not recorded"
    eps = threat.get("eps")
    return f"{threat.get('norm', '?')} eps={eps:g}" if isinstance(eps, (int, float)) else f"{threat.get('norm', '?')} eps=?"
