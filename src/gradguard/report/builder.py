"""Assemble report.html, report.md, summary.json and plots/*.png from a run directory.

The HTML sections live here; report.md is ``markdown``'s, the certified rows of summary.json ``certified``'s, the
numbers themselves ``summary``'s, and the figures come from ``gradguard.viz``.
"""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

import numpy as np

from .. import viz
from ..diagnostics.health import FATAL_KINDS
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..layout import PLOTS_DIR, REPORT_HTML_FILE, REPORT_MD_FILE, SUMMARY_FILE
from ..viz.certify import certified_accuracy
from ..viz.curvature import hessian_density, input_curvature_histogram
from ..viz.robustness import accuracy_vs_eps, example_grid, per_attack_bars, per_class_bars
from ..viz.training import gradient_flow, training_curves
from .certified import certified_summary
from .html import badge, evidence_text, missing, page, percent, png_tag, table
from .markdown import markdown
from .rundir import RunData, attack_groups, read_run, threat_label
from .summary import (
    APART_NOTE,
    apart_rows,
    headline_columns,
    layer_series,
    ordered_attacks,
    summarize,
    threat_text,
    worst_case_text,
)


def build_report(run_dir: str | Path, *, display_path: str | Path | None = None) -> Path:
    """Write report.html, report.md, summary.json and plots/*.png into ``run_dir``; return the HTML path.

    ``display_path`` is the directory name the report shows (when it is built in a staging folder).
    """
    run = read_run(run_dir)
    summary = summarize(run, display_path=display_path)
    summary["certified"] = certified_summary(run)
    figures: dict[str, bytes] = {}
    sections = [
        ("headline", "Headline: clean vs robust accuracy", _headline(summary)),
        ("robustness", "Robustness per attack and eps", _robustness(run, summary, figures)),
        ("certified", "Certified robustness of the smoothed model (randomized smoothing)", _certified(run, figures)),
        ("examples", "Adversarial examples", _examples(run, figures)),
        ("per-class", "Per-class robustness", _per_class(run, figures)),
        ("masking", "Gradient-masking checklist", _masking(run)),
        ("gradients", "Gradient health", _gradients(run, summary, figures)),
        ("curvature", "Curvature", _curvature(run, figures)),
        ("training", "Training curves", _training(run, figures)),
        ("data", "Data: samples and class mapping", _data(summary)),
        ("config", "Run configuration", _config(run)),
    ]
    parts = [f"run: {summary['run_dir']}", f"dataset: {summary.get('dataset') or 'unknown'}",
             f"threat: {threat_text(summary)}"]
    if summary.get("model_source"):
        parts.append(f"model: {summary['model_source']}")
    subtitle = " · ".join(escape(part) for part in parts + [f"generated {summary['generated_at']}"])
    for name, png in figures.items():
        atomic_write_bytes(run.path / PLOTS_DIR / f"{name}.png", png)
    atomic_write_json(run.path / SUMMARY_FILE, summary)
    atomic_write_text(run.path / REPORT_MD_FILE, markdown(summary, sorted(figures)))
    return atomic_write_text(run.path / REPORT_HTML_FILE, page("gradguard report", subtitle, sections))


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------
def _other_threats(summary: dict) -> str:
    rows = apart_rows(summary)
    if not rows:
        return ""
    attacks = ordered_attacks(a for _, g in rows for a in g["attacks"])
    body = [[escape(label), escape(g["label"]), _fmt(g.get("n_samples")), percent(g.get("clean_accuracy"))]
            + [percent(g["attacks"].get(a)) for a in attacks] + [percent(g.get("robust_accuracy"))]
            for label, g in rows]
    return ("<h3>Results on other samples or at other threats</h3><p><small>Single attacks run on other test "
            "samples than the headline's, or at another norm or eps. " + APART_NOTE + "</small></p>"
            + table(["model", "threat", "samples", "clean"] + [escape(a.upper()) for a in attacks] + ["worst case"],
                    body, table_id="other-threats", numeric_from=2))


def _headline(summary: dict) -> str:
    if not summary["models"]:
        return missing("No model in this run directory (gradient experiments only).")
    attacks = headline_columns(summary)
    headers = ["model", "method", "samples", "clean"] + [escape(a.upper()) for a in attacks] + ["worst case",
                                                                                              "masking"]
    rows = []
    for m in summary["models"]:
        worst = percent(m["robust_accuracy"])
        if m["robust_accuracy_source"]:
            worst += f" <small>({escape(m['robust_accuracy_source'])})</small>"
        rows.append([escape(m["label"]), escape(str(m.get("method") or "—")), _fmt(m.get("n_samples")),
                     percent(m["clean_accuracy"])]
                    + [percent(m["attacks"].get(a)) for a in attacks]
                    + [worst, badge(m["masking_verdict"]) if m["masking_verdict"] else "not checked"])
    cards = "".join(f'<div class="card"><div class="k">{escape(m["label"])}: clean → worst case</div>'
                    f'<div class="v">{percent(m["clean_accuracy"])} → {percent(m["robust_accuracy"])}</div></div>'
                    for m in summary["models"])
    note = ("<p><small>Robust accuracy = accuracy on adversarial inputs inside the threat model at "
            + escape(threat_text(summary)) + ". Each row's numbers come from one set of test samples (its "
            "\"samples\" column). The worst case counts a sample robust only if every attack it includes failed on "
            "it: " + escape("; ".join(worst_case_text(m) for m in summary["models"])) + ".</small></p>")
    return (f'<div class="cards">{cards}</div>' + table(headers, rows, table_id="headline", numeric_from=2) + note
            + _other_threats(summary))


def series_colours(run: RunData) -> dict[str, str]:
    """Each model's and gradient run's colour, the same in every plot of the report."""
    return viz.series_colours(m.label for m in run.models + run.gradient_runs)


def _data(summary: dict) -> str:
    """Per model: the data source (as given, and absolute), which samples each step used and why, the label
    mapping and where its order came from, and any chance-level warning."""
    parts: list[str] = []
    for d in summary.get("data") or []:
        rows = [["source", escape(str(d.get("dataset") or "not recorded"))
                 + (f" <small>({escape(d['dataset_absolute'])})</small>"
                    if d.get("dataset_absolute") and d.get("dataset_absolute") != d.get("dataset") else "")]]
        rows += [[escape(s["step"]), escape(s["text"])] for s in d.get("splits") or []]
        classes = d.get("classes") or []
        if classes:
            mapping = ", ".join(f"{i} → {escape(str(name))}" for i, name in enumerate(classes))
            rows.append(["classes (label → name)", mapping + (f" <small>(order from {escape(d['class_source'])})"
                                                              "</small>" if d.get("class_source") else "")])
        parts.append((f"<h3>{escape(d['label'])}</h3>" if len(summary.get("data") or []) > 1 else "")
                     + table(["", ""], rows, table_id="data" if len(parts) == 0 else None)
                     + "".join(f"<p><b>Warning:</b> {escape(str(w))}.</p>" for w in d.get("warnings") or []))
    return "".join(parts) or missing("No data recorded.")


def _config(run: RunData) -> str:
    parts = []
    if run.manifest:
        scalars = [[escape(str(k)), escape(_short(v))] for k, v in sorted(run.manifest.items()) if k != "classes"]
        parts.append(table(["setting", "value"], scalars))
    for m in run.models + run.gradient_runs:
        info = {"run": m.manifest, "trainer": m.config, "model": (m.sidecar or {}).get("model")}
        parts.append(f"<details><summary>{escape(m.label)}: full configuration</summary>"
                     f"<pre>{escape(json.dumps(info, indent=2, default=str))}</pre></details>")
    return "".join(parts) or missing("No configuration recorded.")


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


def _robustness(run: RunData, summary: dict, figures: dict) -> str:
    out = []
    curves = {m.label: m.curve for m in run.models if m.curve and m.curve.get("eps")}
    if curves:
        norm = (summary.get("threat") or next((m["threat"] for m in summary["models"] if m.get("threat")), None)
                or {}).get("norm", "linf")
        figures["accuracy_vs_eps"] = accuracy_vs_eps(curves, norm, series_colours(run))
        eps = list(dict.fromkeys(e for c in curves.values() for e in c["eps"]))
        rows = [[escape(label)] + [percent(dict(zip(c["eps"], c["robust_accuracy"], strict=True)).get(e)) for e in eps]
                for label, c in curves.items()]
        out.append(table(["model"] + [f"eps={e:g}" for e in eps], rows, numeric_from=1))
    else:
        out.append(missing("No accuracy-vs-eps curve: run `gradguard evaluate RUN_DIR --curve 0,0.05,0.1,0.2`."))
    bars = {m["label"]: {**m["attacks"], **({"worst case": m["robust_accuracy"]} if m["robust_accuracy"] is not None else {})}
            for m in summary["models"] if m["attacks"] or m["robust_accuracy"] is not None}
    if bars:
        figures["per_attack"] = per_attack_bars(bars, series_colours(run))
    side_by_side = [png_tag(figures[k], k.replace("_", " ")) for k in ("accuracy_vs_eps", "per_attack") if k in figures]
    if side_by_side:
        out.insert(0, '<div class="grid2">' + "".join(f"<div>{tag}</div>" for tag in side_by_side) + "</div>")
    for m in run.models:
        for group in attack_groups(m.attacks):
            results = group["results"]
            rows = [[escape(name), percent(r.get("robust_accuracy")), percent(r.get("success_rate")),
                     _fmt(r.get("mean_distance")), _fmt(r.get("max_distance")), _fmt(r.get("n_grad")),
                     _fmt(r.get("elapsed_s"))] for name, r in ((n, results[n]) for n in ordered_attacks(results))]
            out.append(f"<h3>{escape(m.label)}: single attacks at {escape(threat_label(group.get('threat')))} "
                       f"({group.get('n_samples', '?')} samples)</h3>" + table(
                ["attack", "robust acc.", "success rate", "mean dist.", "max dist.", "gradients/sample", "time (s)"],
                rows, numeric_from=1))
        if m.robustness:
            per_attack = m.robustness.get("per_attack") or {}
            suite = [n for n in (m.robustness.get("suite") or []) if isinstance(n, str)]
            order = list(dict.fromkeys([n for n in suite if n in per_attack] + list(per_attack)))
            rows = [[escape(name), percent(per_attack[name])] for name in order]
            rows += [[f"{escape(str(s.get('label')))} <small>(skipped: {escape(str(s.get('reason')))})</small>",
                      "not run"] for s in m.robustness.get("skipped") or [] if isinstance(s, dict)]
            rows.append(["<b>worst case</b>", f"<b>{percent(m.robustness.get('robust_accuracy'))}</b>"])
            note = (f"<p><small>Note: {escape(str(m.robustness['fallback']))}.</small></p>"
                    if m.robustness.get("fallback") else "")
            note += "".join(f"<p><b>Warning:</b> {escape(str(w))}.</p>" for w in m.robustness.get("warnings") or [])
            out.append(f"<h3>{escape(m.label)}: evaluation suite at {escape(threat_label(m.robustness.get('threat')))} "
                       f"({m.robustness.get('n_samples', '?')} samples, "
                       f"{_fmt(m.robustness.get('elapsed_s'))} s{_parts(m.robustness)})</h3>"
                       + table(["attack", "accuracy"], rows, numeric_from=1)
                       + note + _escalations(m.robustness))
    return "".join(out)


def _parts(robustness: dict) -> str:
    """" in 2 parts (resumed)" for an evaluation that was interrupted and resumed: its time is their sum."""
    parts = robustness.get("elapsed_parts_s") or []
    return f" in {len(parts)} parts (resumed)" if len(parts) > 1 else ""


def _escalations(robustness: dict) -> str:
    """The "adaptive" suite's escalations: each one, ran or not, on how many samples, and why."""
    rows = [[escape(str(e.get("stage"))), "ran" if e.get("ran") else "not run", escape(str(e.get("reason"))),
             _fmt(e.get("samples")), _fmt(e.get("broke"))] for e in robustness.get("escalations") or []]
    if not rows:
        return ""
    return "<h4>Evidence and escalations</h4>" + table(["escalation", "status", "why", "samples", "broke"], rows,
                                                         numeric_from=3)


SMOOTHED_NOTE = ("A guarantee for the <b>smoothed</b> classifier g(x) = argmax<sub>c</sub> P(f(x + δ) = c), "
                 "δ ~ N(0, σ²I), evaluated with noise draws (Cohen, Rosenfeld &amp; Kolter 2019), <b>not for the base "
                 "model f</b>: the base model's empirical robust accuracy beside it comes from attacks, is an upper "
                 "bound on its true robust accuracy, and may be at another norm. Certified accuracy at radius r = "
                 "the fraction of samples g classifies correctly with a certified L2 radius ≥ r; each certificate "
                 "holds with probability ≥ 1 − α over the noise; abstentions count as wrong.")


def _certified(run: RunData, figures: dict) -> str:
    rows = certified_summary(run)
    if not rows:
        return missing("No certificates: train with `gradguard train --method gaussian --method-arg sigma=0.25`, "
                       "then run `gradguard certify RUN_DIR --sigma 0.25`.")
    curves = {m.label: _exact_curve(m.certify) for m in run.models if m.certify and "samples" in m.certify}
    sigmas = {r["sigma"] for r in rows}
    figures["certified_accuracy"] = certified_accuracy(curves, sigmas.pop() if len(sigmas) == 1 else None,
                                                       series_colours(run))
    radii = list(dict.fromkeys(r for row in rows for r in row["certified_accuracy"]))
    headers = (["model", "σ", "n", "α", "samples", "base model clean", "smoothed (r = 0)", "abstained"]
               + [f"certified r ≥ {r}" for r in radii] + ["empirical robust acc. (base model, attacks)"])
    body = [[escape(row["label"]), _fmt(row["sigma"]), _fmt(row["n"]), _fmt(row["alpha"]), _fmt(row["n_samples"]),
             percent(row["base_clean_accuracy"]), percent(row["smoothed_accuracy"]), percent(row["abstain_rate"])]
            + [percent(row["certified_accuracy"].get(r)) for r in radii]
            + [f"{percent(row['empirical']['robust_accuracy'])} <small>({escape(row['empirical']['threat'])})</small>"
               if row["empirical"] else "not evaluated"] for row in rows]
    return (png_tag(figures["certified_accuracy"], "certified accuracy vs radius")
            + table(headers, body, table_id="certified", numeric_from=1) + f"<p><small>{SMOOTHED_NOTE}</small></p>")


def _exact_curve(certify: dict) -> dict:
    from ..evaluation.certify import exact_curve

    samples = certify["samples"]
    correct = [p == y for p, y in zip(samples["prediction"], samples["label"], strict=True)]
    return exact_curve(samples["radius"], correct)



def _examples(run: RunData, figures: dict) -> str:
    out = []
    for index, m in enumerate(run.models):
        ex = m.examples
        if not ex or not {"x", "x_adv", "y", "pred", "pred_adv"} <= set(ex):
            continue
        classes = [str(c) for c in ex["classes"]] if "classes" in ex else [str(i) for i in range(int(ex["y"].max()) + 1)]
        attack = str(ex["attack"]) if "attack" in ex else "attack"
        name = f"examples_{index}"
        figures[name] = example_grid(ex["x"], ex["x_adv"], ex["y"], ex["pred"], ex["pred_adv"], classes,
                                     f"{m.label}: {attack}")
        flipped = int(np.sum((ex["pred_adv"] != ex["y"]) & (ex["pred"] == ex["y"])))
        out.append(f"<h3>{escape(m.label)} — {escape(attack)}</h3>" + png_tag(figures[name], f"{m.label} examples")
                   + f"<p><small>{flipped} of {len(ex['y'])} correctly classified images flipped. Titles: y = true "
                   "label, p = prediction; red = wrong. Bottom row: the perturbation δ, amplified.</small></p>")
    return "".join(out) or missing("No adversarial examples stored: run `gradguard attack RUN_DIR`.")


def _per_class(run: RunData, figures: dict) -> str:
    tags = []
    for index, m in enumerate(run.models):
        per_class = (m.robustness or {}).get("per_class")
        if not per_class:
            continue
        name = f"per_class_{index}"
        figures[name] = per_class_bars(per_class, f"{m.label}: clean vs robust accuracy per class")
        tags.append(f"<div>{png_tag(figures[name], f'{m.label} per class')}</div>")
    if not tags:
        return missing("No per-class results: run `gradguard evaluate RUN_DIR`.")
    return '<div class="grid2">' + "".join(tags) + "</div>"


def _masking(run: RunData) -> str:
    out = []
    for m in run.models:
        if not m.masking:
            continue
        n_correct = (m.masking.get("settings") or {}).get("n_correct")
        n_correct = n_correct if isinstance(n_correct, int) else None
        rows = [[escape(str(c.get("name"))), badge(c.get("status")), evidence_text(c.get("evidence"), n_correct),
                 escape(str(c.get("advice") or ""))] for c in m.masking.get("checks", [])]
        scope = (f"<p><small>Checked on {escape(str(m.masking.get('n_samples', '?')))} samples; the accuracies in "
                 f"the evidence are on the {n_correct} of them classified correctly (clean-correct), unlike the "
                 "headline's, which are on all its samples.</small></p>" if n_correct is not None else "")
        out.append(f"<h3>{escape(m.label)}: verdict {badge(m.masking.get('verdict'))}</h3>" + scope
                   + table(["check", "status", "evidence", "advice"], rows))
    return "".join(out) or missing("Masking checklist not run: `gradguard diagnose RUN_DIR`.")


def _gradients(run: RunData, summary: dict, figures: dict) -> str:
    out = []
    runs = {}
    metric = ""
    for g in run.gradient_runs + [m for m in run.models if m.gradflow]:
        metric, series = layer_series(g.gradflow)
        if series:
            runs[g.label] = series
    if runs:
        figures["gradient_flow"] = gradient_flow(runs, metric, series_colours(run))
        out.append(png_tag(figures["gradient_flow"], "gradient flow"))
    rows = []
    for g in summary["gradients"]:
        for f in g["findings"] or [{"kind": "healthy", "layer": "—", "evidence": {}, "advice": "no issue found"}]:
            status = "PASS" if f.get("kind") == "healthy" else "FAIL" if f.get("kind") in FATAL_KINDS else "WARN"
            rows.append([escape(g["label"]), badge(status) + " "
                         + escape(str(f.get("kind"))), escape(str(f.get("layer"))), evidence_text(f.get("evidence")),
                         escape(str(f.get("advice") or ""))])
    if rows:
        out.append(table(["run", "finding", "layer", "evidence", "advice"], rows))
    return "".join(out) or missing("No gradient records: train with `gradguard train --monitor` or run the demo.")


def _curvature(run: RunData, figures: dict) -> str:
    """Hessian top-k, trace, density, per-layer table and input curvature from `diagnose --curvature`."""
    out = []
    for index, m in enumerate(run.models):
        curvature = (m.diagnosis or {}).get("curvature")
        if not isinstance(curvature, dict):
            continue
        top, trace = curvature.get("top_eigenvalues") or {}, curvature.get("trace") or {}
        rows = [["top eigenvalues (Lanczos)", _fmt_list(top.get("values") or [curvature.get("top_hessian_eigenvalue")]),
                 _fmt(top.get("products")), _fmt(top.get("seconds"))],
                ["trace (Hutchinson)", f"{_fmt(trace.get('value'))} ± {_fmt(trace.get('standard_error'))}",
                 _fmt(trace.get("products")), _fmt(trace.get("seconds"))]]
        inputs = curvature.get("input_curvature") or {}
        if inputs:
            quantiles = inputs.get("quantiles") or {}
            rows.append(["input curvature: mean, median, q95",
                         _fmt_list([inputs.get("mean"), quantiles.get("q50"), quantiles.get("q95")]),
                         _fmt(inputs.get("n_samples")), _fmt(inputs.get("elapsed_s"))])
        out.append(f"<h3>{escape(m.label)} ({_fmt(curvature.get('n_samples'))} samples)</h3>"
                   + table(["quantity", "value", "products / samples", "seconds"], rows))
        layers = curvature.get("per_layer") or []
        if layers:
            out.append(table(["layer", "parameters", "top eigenvalue", "trace"],
                             [[escape(str(row.get("layer"))), _fmt(row.get("parameters")), _fmt(row.get("top_eigenvalue")),
                               f"{_fmt(row.get('trace'))} ± {_fmt(row.get('trace_standard_error'))}"] for row in layers]))
        density = curvature.get("density") or {}
        if density.get("grid"):
            figures[f"hessian_density_{index}"] = hessian_density(density["grid"], density["density"],
                                                                   top.get("values") or [])
            out.append(png_tag(figures[f"hessian_density_{index}"], f"{m.label} Hessian eigenvalue density"))
        if inputs.get("values"):
            figures[f"input_curvature_{index}"] = input_curvature_histogram(inputs["values"],
                                                                            inputs.get("quantiles") or {})
            out.append(png_tag(figures[f"input_curvature_{index}"], f"{m.label} input curvature"))
    return "".join(out) or missing("Curvature not measured: `gradguard diagnose RUN_DIR --curvature`.")


def _fmt_list(values) -> str:
    return ", ".join(_fmt(value) for value in values)


def _training(run: RunData, figures: dict) -> str:
    out = []
    metric_colours = viz.series_colours(sorted({k for m in run.models + run.gradient_runs for r in m.metrics for k in r}))
    for index, m in enumerate(run.models + run.gradient_runs):
        if not m.metrics:
            continue
        name = f"training_{index}"
        figures[name] = training_curves(m.metrics, m.label, metric_colours)
        out.append(png_tag(figures[name], f"{m.label} training curves"))
    return "".join(out) or missing("No training metrics (metrics.jsonl) in this run.")


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))
