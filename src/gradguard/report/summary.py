"""The numbers a report shows, distilled from a run directory into one JSON-able dict (summary.json)."""
from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .rundir import ModelRun, RunData, attack_groups, same_threat, threat_label

HEADLINE_ATTACK_ORDER = ("fgsm", "bim", "pgd", "mifgsm", "apgd-ce", "apgd-dlr", "apgd-t", "square", "cw", "deepfool")
GRADIENT_METRIC_PREFERENCE = ("grad_norm", "gradient_norm", "grad_rms", "grad_mean_abs")


def summarize(run: RunData, display_path=None) -> dict:
    """summary.json: per model clean / per-attack / worst-case robust accuracy, masking verdicts, gradient findings.

    Each model's headline combines only results at one threat (norm and eps: ``headline_threat``); results at
    other threats are listed apart in ``other_threats``, each labelled with its own threat. Model paths are
    relative to the run directory, so the summary stays true when the directory moves.
    """
    models = [model_summary(m, run.path) for m in run.models]
    return {
        "format": "gradguard-summary", "format_version": 2,
        "run_dir": str(display_path if display_path is not None else run.path),
        "command": run.manifest.get("command"),
        "dataset": run.manifest.get("dataset") or next((m.manifest.get("dataset") for m in run.models), None),
        "threat": _common_threat(models) or run.manifest.get("threat"),
        "model_source": models[0]["model_source"] if len(models) == 1 else None,
        "models": models,
        "gradients": [gradient_summary(g, run.path) for g in (run.gradient_runs + [m for m in run.models if m.gradflow])],
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def model_summary(model: ModelRun, root) -> dict:
    threat = headline_threat(model)
    groups = attack_groups(model.attacks)
    headline = next((g for g in groups if same_threat(g.get("threat"), threat)), None)
    suite = dict((model.robustness or {}).get("per_attack") or {}) if _suite_counts(model, threat) else {}
    robust, source = worst_case(model)
    return {
        "label": model_label(model),
        "path": _relative(model.path, root),
        "architecture": ((model.sidecar or {}).get("model") or {}).get("name"),
        "model_source": _with_output(model.manifest.get("model_source_text") or _described_source(model),
                                     model.manifest.get("model_output")),
        "model_output": model.manifest.get("model_output"),
        "method": _method_name(model),
        "threat": threat,
        "clean_accuracy": clean_accuracy(model),
        "attacks": _accuracies(headline),
        "suite": suite,
        "suite_names": (model.robustness or {}).get("suite") if suite else None,
        "robust_accuracy": robust,
        "robust_accuracy_source": source,
        "n_samples": ((model.robustness or {}).get("n_samples") if suite else None) or (headline or {}).get("n_samples"),
        "other_threats": [_threat_group_summary(g) for g in groups if g is not headline],
        "masking_verdict": (model.masking or {}).get("verdict"),
        "masking_checks": {c.get("name"): c.get("status") for c in (model.masking or {}).get("checks", [])},
        "epochs": len(model.metrics),
    }


def headline_threat(model: ModelRun) -> dict | None:
    """The threat a model's headline is at: the evaluation suite's, else the run's own (run.json) when single
    attacks ran at it, else the latest single attacks' threat, else the run's own."""
    robustness_threat = (model.robustness or {}).get("threat")
    if isinstance(robustness_threat, dict):
        return robustness_threat
    groups = attack_groups(model.attacks)
    own = model.manifest.get("threat") if isinstance(model.manifest.get("threat"), dict) else None
    if own is not None and any(same_threat(g.get("threat"), own) for g in groups):
        return own
    if groups and isinstance(groups[0].get("threat"), dict):
        return groups[0]["threat"]
    return own or _threat(model)


def worst_case(model: ModelRun) -> tuple[float | None, str | None]:
    """Robust accuracy at the model's headline threat over everything run there: per sample across the suite and
    the single attacks when they saw the same samples (a sample is robust only if no attack broke it), else the
    lowest of the accuracies (each is an upper bound on the true robust accuracy, so the lowest is the tightest).
    Results at any other threat never enter it."""
    threat = headline_threat(model)
    robustness = (model.robustness or {}) if _suite_counts(model, threat) else {}
    group = next((g for g in attack_groups(model.attacks) if same_threat(g.get("threat"), threat)), {})
    return _combined(robustness, group)


def _combined(robustness: dict, group: dict) -> tuple[float | None, str | None]:
    results = group.get("results") or {}
    samples = robustness.get("samples") or {}
    robust = samples.get("robust")
    same_samples = isinstance(robust, list) and samples.get("label") == group.get("labels")
    per_sample = [r["correct"] for r in results.values() if isinstance(r.get("correct"), list)]
    if same_samples and isinstance(robust, list) and per_sample and all(len(c) == len(robust) for c in per_sample):
        combined = [all(values) for values in zip(robust, *per_sample, strict=True)]
        return sum(combined) / max(1, len(combined)), "suite + single attacks, per sample"
    candidates = {"suite": robustness.get("robust_accuracy"),
                  **{name: r.get("robust_accuracy") for name, r in results.items()}}
    numbers = {k: float(v) for k, v in candidates.items() if isinstance(v, (int, float))}
    if not numbers:
        return None, None
    best = min(numbers, key=lambda k: numbers[k])
    return numbers[best], ("suite" if best == "suite" else "lowest single attack")


def _suite_counts(model: ModelRun, threat: dict | None) -> bool:
    """The evaluation suite is part of the headline when it ran at the headline threat (or recorded none)."""
    if not model.robustness:
        return False
    recorded = model.robustness.get("threat")
    return not isinstance(recorded, dict) or same_threat(recorded, threat)


def _threat_group_summary(group: dict) -> dict:
    robust, source = _combined({}, group)
    return {"threat": group.get("threat"), "label": threat_label(group.get("threat")),
            "n_samples": group.get("n_samples"), "clean_accuracy": group.get("clean_accuracy"),
            "attacks": _accuracies(group), "robust_accuracy": robust, "robust_accuracy_source": source}


def model_label(model: ModelRun) -> str:
    """A model's name in the report's table and cards: for a model gradguard did not train (``--model SPEC``), its
    source (``mymodels:Net + net.pth``), not the run directory's name; else the run's own label."""
    source = model.manifest.get("model_source")
    if model.manifest.get("command") == "train" or not isinstance(source, dict) or not source.get("spec"):
        return model.label
    weights = source.get("weights")
    return str(source["spec"]) + (f" + {Path(str(weights)).name}" if weights else "")


def _with_output(text: str | None, output: str | None) -> str | None:
    """The model's source line with where its logits came from (``model output: .logits``) when not a tensor."""
    if not output or output in ("tensor", "unknown"):
        return text
    return f"{text or 'model'}; model output: {output}"


def _described_source(model: ModelRun) -> str | None:
    """One line naming where a model came from, from the source model.json records (None when there is none)."""
    source = (model.sidecar or {}).get("source")
    if not isinstance(source, dict):
        return None
    from ..models import describe_source

    return describe_source(source)


def _common_threat(models: list[dict]) -> dict | None:
    threats = [m["threat"] for m in models if m.get("threat")]
    if threats and all(same_threat(t, threats[0]) for t in threats):
        return threats[0]
    return None


def clean_accuracy(model: ModelRun) -> float | None:
    for source in (model.robustness, model.attacks):
        if source and source.get("clean_accuracy") is not None:
            return float(source["clean_accuracy"])
    for record in reversed(model.metrics):
        if isinstance(record.get("val_clean_acc"), (int, float)):
            return float(record["val_clean_acc"])
    return None


def _accuracies(group: dict | None) -> dict[str, float]:
    results = (group or {}).get("results") or {}
    return {name: float(results[name]["robust_accuracy"]) for name in ordered_attacks(results)}


def ordered_attacks(names) -> list[str]:
    """Attack names weakest-first as in the papers (FGSM, BIM, PGD, ...), unknown names last."""
    return sorted(set(names), key=lambda n: (HEADLINE_ATTACK_ORDER.index(n) if n in HEADLINE_ATTACK_ORDER else 99, n))


def gradient_summary(run: ModelRun, root) -> dict:
    findings = gradient_findings(run)
    return {"label": run.label, "path": _relative(run.path, root), "activation": run.manifest.get("activation"),
            "findings": findings, "kinds": sorted({f.get("kind") for f in findings if f.get("kind")}),
            "final_train_accuracy": _last(run.metrics, "train_clean_acc")}


def gradient_findings(run: ModelRun) -> list[dict]:
    """Stored findings (diagnosis.json), else recomputed from gradflow.jsonl with the monitor's own rules."""
    if run.diagnosis and run.diagnosis.get("gradient_findings") is not None:
        return list(run.diagnosis["gradient_findings"])
    if not run.gradflow:
        return []
    try:
        from ..diagnostics import findings_from_records
    except ImportError:
        return []
    return [_plain(f) for f in findings_from_records(run.gradflow)]


def layer_series(records: list[dict]) -> tuple[str, dict[str, list[float]]]:
    """(metric name, {layer: [values over sampled steps]}) from GradientMonitor records, layers in model order."""
    keys = [k for k in dict.fromkeys(k for r in records for k in r)
            if isinstance(next((r[k] for r in records if k in r), None), (int, float))]
    metric = next((k for k in GRADIENT_METRIC_PREFERENCE if k in keys), None) or next(
        (k for k in keys if "grad" in k and k not in ("step",)), None)
    series: dict[str, list[float]] = {}
    if metric is None:
        return "", series
    per_parameter = all(isinstance(r.get("numel"), int) and r["numel"] > 0 for r in records)
    for record in records:
        value = record.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value) and record.get("layer") is not None:
            if per_parameter:  # RMS = norm / sqrt(#parameters): comparable across layers of different sizes
                value = value / math.sqrt(record["numel"])
            series.setdefault(str(record["layer"]), []).append(float(value))
    return (f"{metric} / sqrt(numel) (RMS)" if per_parameter else metric), series


def _plain(finding: Any) -> dict:
    if isinstance(finding, dict):
        return finding
    if hasattr(finding, "to_dict"):
        return finding.to_dict()
    return {key: getattr(finding, key, None) for key in ("kind", "layer", "evidence", "advice")}


def _threat(model: ModelRun) -> dict | None:
    for source in (model.robustness, model.attacks, model.manifest, model.config):
        if source and isinstance(source.get("threat"), dict):
            return source["threat"]
    return None


def _method_name(model: ModelRun) -> str | None:
    method = (model.config or {}).get("method") or model.manifest.get("method")
    if isinstance(method, dict):
        return method.get("name")
    return method


def _last(records: list[dict], key: str):
    for record in reversed(records):
        if isinstance(record.get(key), (int, float)):
            return float(record[key])
    return None


def _relative(path, root) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)
