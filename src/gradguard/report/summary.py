"""The numbers a report shows, distilled from a run directory into one JSON-able dict (summary.json)."""
from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .rundir import ModelRun, RunData, attack_groups, result_samples, same_samples, same_threat, threat_label

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
        "dataset": _dataset_shown(run.manifest) or next((_dataset_shown(m.manifest) for m in run.models), None),
        "data": [data_summary(m) for m in run.models],
        "threat": _common_threat(models) or run.manifest.get("threat"),
        "model_source": models[0]["model_source"] if len(models) == 1 else None,
        "models": models,
        "gradients": [gradient_summary(g, run.path) for g in (run.gradient_runs + [m for m in run.models if m.gradflow])],
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def model_summary(model: ModelRun, root) -> dict:
    """One model's headline: clean, single-attack and worst-case accuracy measured on ONE set of test samples at
    the headline threat. Single attacks at that threat that ran on other samples than the evaluation suite are not
    mixed into it: they go to ``other_samples`` (with their own count, clean accuracy and worst case)."""
    threat = headline_threat(model)
    groups = attack_groups(model.attacks)
    at_threat = next((g for g in groups if same_threat(g.get("threat"), threat)), None)
    robustness = (model.robustness or {}) if _suite_counts(model, threat) else {}
    headline = at_threat
    if robustness and at_threat is not None and not same_samples(robustness, at_threat):
        headline = None  # the single attacks saw other samples: shown apart, never in this headline
    robust, source = _combined(robustness, headline or {})
    basis = robustness or headline or {}
    return {
        "label": model_label(model),
        "path": _relative(model.path, root),
        "architecture": ((model.sidecar or {}).get("model") or {}).get("name"),
        "model_source": _with_output(model.manifest.get("model_source_text") or _described_source(model),
                                     model.manifest.get("model_output")),
        "model_output": model.manifest.get("model_output"),
        "method": _method_name(model),
        "threat": threat,
        "clean_accuracy": _number(basis.get("clean_accuracy")) if basis else clean_accuracy(model),
        "attacks": _accuracies(headline),
        "suite": dict(robustness.get("per_attack") or {}),
        "suite_names": robustness.get("suite") if robustness else None,
        "robust_accuracy": robust,
        "robust_accuracy_source": source,
        "worst_case_over": _worst_case_over(robustness, headline or {}) if robust is not None else [],
        "n_samples": basis.get("n_samples"),
        "sample_set": result_samples(basis)[0],
        "other_samples": [_threat_group_summary(at_threat)] if at_threat is not None and headline is None else [],
        "other_threats": [_threat_group_summary(g) for g in groups if g is not at_threat],
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
    """Robust accuracy at the model's headline threat over everything run there ON THE SAME SAMPLES: per sample
    across the suite and the single attacks (a sample is robust only if no attack broke it), else the lowest of
    their accuracies (each is an upper bound on the true robust accuracy of those samples, so the lowest is the
    tightest). Single attacks on other samples, and results at any other threat, never enter it."""
    summary = model_summary(model, model.path)
    return summary["robust_accuracy"], summary["robust_accuracy_source"]


def _combined(robustness: dict, group: dict) -> tuple[float | None, str | None]:
    """The worst case over the suite (``robustness``) and the single attacks (``group``), which the caller has
    checked ran on the same samples (or either is empty)."""
    results = group.get("results") or {}
    robust = (robustness.get("samples") or {}).get("robust") if robustness else None
    per_sample = [r["correct"] for r in results.values() if isinstance(r.get("correct"), list)]
    lists: list[list] = ([robust] if isinstance(robust, list) else []) + per_sample
    complete = (not robustness or isinstance(robust, list)) and len(per_sample) == len(results)
    if complete and len(lists) > 1 and len({len(values) for values in lists}) == 1:
        combined = [all(values) for values in zip(*lists, strict=True)]
        return sum(combined) / max(1, len(combined)), ("suite + single attacks, per sample" if robustness
                                                       else "single attacks, per sample")
    candidates = {"suite": robustness.get("robust_accuracy"),
                  **{name: r.get("robust_accuracy") for name, r in results.items()}}
    numbers = {k: float(v) for k, v in candidates.items() if isinstance(v, (int, float))}
    if not numbers:
        return None, None
    best = min(numbers, key=lambda k: numbers[k])
    return numbers[best], ("suite" if best == "suite" else "lowest single attack")


def _worst_case_over(robustness: dict, group: dict) -> list[str]:
    """What a worst case includes: "suite (APGD-CE, APGD-T)" and the single attacks, in the papers' order."""
    parts = []
    if robustness:
        names = ", ".join(str(n) for n in robustness.get("suite") or [])
        skipped = "; ".join(f"{s.get('label')} skipped: {s.get('reason')}" for s in robustness.get("skipped") or []
                            if isinstance(s, dict))
        inside = "; ".join(part for part in (names, skipped) if part)
        parts.append(f"suite ({inside})" if inside else "suite")
    return parts + [name.upper() for name in ordered_attacks((group.get("results") or {}))]


def worst_case_text(model: dict) -> str:
    """One sentence: what a model's headline worst case combines and on how many samples, and what is apart."""
    over = model.get("worst_case_over") or []
    if model.get("robust_accuracy") is None or not over:
        return f"{model['label']}: no robust accuracy measured"
    how = (" (per sample)" if "per sample" in str(model.get("robust_accuracy_source"))
           else " (the lowest of them)" if len(over) > 1 else "")
    counted = f" on the same {model['n_samples']} samples" if model.get("n_samples") else ""
    text = f"{model['label']}: worst case over {', '.join(over)}{counted}{how}"
    for group in model.get("other_samples") or []:
        text += (f"; {', '.join(a.upper() for a in ordered_attacks(group['attacks']))} ran on another set of "
                 f"{group.get('n_samples')} samples and are shown apart")
    return text


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _suite_counts(model: ModelRun, threat: dict | None) -> bool:
    """The evaluation suite is part of the headline when it ran at the headline threat (or recorded none)."""
    if not model.robustness:
        return False
    recorded = model.robustness.get("threat")
    return not isinstance(recorded, dict) or same_threat(recorded, threat)


def _threat_group_summary(group: dict) -> dict:
    robust, source = _combined({}, group)
    return {"threat": group.get("threat"), "label": threat_label(group.get("threat")),
            "n_samples": group.get("n_samples"), "sample_set": group.get("sample_set"),
            "clean_accuracy": group.get("clean_accuracy"),
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


def _dataset_shown(manifest: dict) -> str | None:
    """The data source as the user spelled it (run.json ``dataset_given``), else as stored."""
    return manifest.get("dataset_given") or manifest.get("dataset")


def data_summary(model: ModelRun) -> dict:
    """Which samples each step of a model's run used and why (the split record of run.json, robustness.json and
    attacks.json), the class mapping (label order) and where it came from, and the data warnings (chance level)."""
    manifest, robustness = model.manifest, model.robustness or {}
    groups = attack_groups(model.attacks)
    latest = groups[0] if groups else {}
    classes = next((r for r in (robustness, latest, manifest) if r.get("classes")), {})  # the latest mapping used
    used = []
    for step, record in (("run made on" if manifest.get("command") != "train" else "trained on", manifest.get("split")),
                         ("validated on", manifest.get("validation_split")), ("evaluate", robustness.get("split")),
                         ("attack", latest.get("split"))):
        if isinstance(record, dict) and record.get("text"):
            used.append({"step": step, **record})
    return {
        "label": model.label, "dataset": _dataset_shown(manifest), "dataset_absolute": manifest.get("dataset"),
        "splits": used,
        "classes": classes.get("classes"), "class_source": classes.get("class_source"),
        "warnings": list(latest.get("warnings") or []),
    }


# ------------------------------------------------------------------------------------------------
# views of the summary that the HTML report, report.md and the CLI's headline share
# ------------------------------------------------------------------------------------------------
def headline_columns(summary: dict) -> list[str]:
    return ordered_attacks(a for m in summary["models"] for a in m["attacks"])


def threat_text(summary: dict) -> str:
    """The headline threat for titles: one for the whole run, else "per model" (each row then names its own)."""
    if summary.get("threat"):
        return threat_label(summary["threat"])
    if any(m.get("threat") for m in summary["models"]):
        return "per model: " + "; ".join(f"{m['label']} {threat_label(m.get('threat'))}" for m in summary["models"])
    return "not recorded"


def apart_rows(summary: dict) -> list[tuple[str, dict]]:
    """(model label, group) for every result kept out of its model's headline: single attacks at the headline
    threat on other samples than the suite, and results at another threat; each group names its threat and count."""
    return [(m["label"], group) for m in summary["models"]
            for group in (m.get("other_samples") or []) + (m.get("other_threats") or [])]


APART_NOTE = ("Not part of the worst case above, which only combines results at the same threat on the same "
              "samples.")
