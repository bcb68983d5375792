"""report.md: the headline, the results kept apart, the certificates and the gradient findings as markdown tables,
written from summary.json's dict alone (the HTML report is ``builder``'s)."""
from __future__ import annotations

from ..layout import PLOTS_DIR
from .html import percent
from .summary import APART_NOTE, apart_rows, headline_columns, ordered_attacks, threat_text, worst_case_text


def markdown(summary: dict, figure_names: list[str]) -> str:
    lines = ["# gradguard report", "",
             f"- run: `{summary['run_dir']}`", f"- dataset: {summary.get('dataset') or 'unknown'}",
             f"- threat: {threat_text(summary)}"]
    if summary.get("model_source"):
        lines.append(f"- model: `{summary['model_source']}`")
    lines += [f"- generated: {summary['generated_at']}", "", "## Clean vs robust accuracy", ""]
    attacks = headline_columns(summary)
    if summary["models"]:
        lines.append("| model | method | samples | clean | " + " | ".join(a.upper() for a in attacks)
                     + " | worst case | masking |")
        lines.append("|---" * (6 + len(attacks)) + "|")
        for m in summary["models"]:
            cells = [m["label"], str(m.get("method") or "—"), _plain_count(m.get("n_samples")),
                     percent(m["clean_accuracy"])]
            cells += [percent(m["attacks"].get(a)) for a in attacks]
            cells += [percent(m["robust_accuracy"]), m["masking_verdict"] or "not checked"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Worst case: " + "; ".join(worst_case_text(m) for m in summary["models"]) + "."]
    else:
        lines.append("No model in this run.")
    lines += _markdown_other_threats(summary)
    lines += _markdown_certified(summary)
    if summary["gradients"]:
        lines += ["", "## Gradient health", ""]
        for g in summary["gradients"]:
            kinds = ", ".join(g["kinds"]) or "no issue found"
            lines.append(f"- **{g['label']}**: {kinds}")
    if figure_names:
        lines += ["", "## Plots", ""] + [f"![{name}]({PLOTS_DIR}/{name}.png)" for name in figure_names]
    return "\n".join(lines) + "\n"


def _markdown_certified(summary: dict) -> list[str]:
    rows = summary.get("certified") or []
    if not rows:
        return []
    radii = list(dict.fromkeys(r for row in rows for r in row["certified_accuracy"]))
    lines = ["", "## Certified robustness (randomized smoothing)", "",
             "A guarantee for the smoothed classifier (Gaussian noise of std σ), not for the base model; "
             "the base model's empirical robust accuracy (attacks) is shown beside it.", "",
             "| model | σ | smoothed (r = 0) | abstained | " + " | ".join(f"r ≥ {r}" for r in radii)
             + " | empirical (base model) |", "|---" * (5 + len(radii)) + "|"]
    for row in rows:
        empirical = row["empirical"]
        cells = [row["label"], f"{row['sigma']:g}", percent(row["smoothed_accuracy"]), percent(row["abstain_rate"])]
        cells += [percent(row["certified_accuracy"].get(r)) for r in radii]
        cells.append(f"{percent(empirical['robust_accuracy'])} ({empirical['threat']})" if empirical else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _markdown_other_threats(summary: dict) -> list[str]:
    rows = apart_rows(summary)
    if not rows:
        return []
    attacks = ordered_attacks(a for _, g in rows for a in g["attacks"])
    lines = ["", "## Results on other samples or at other threats", "", APART_NOTE, "",
             "| model | threat | samples | clean | " + " | ".join(a.upper() for a in attacks) + " | worst case |",
             "|---" * (5 + len(attacks)) + "|"]
    for label, g in rows:
        cells = [label, g["label"], _plain_count(g.get("n_samples")), percent(g.get("clean_accuracy"))]
        cells += [percent(g["attacks"].get(a)) for a in attacks] + [percent(g.get("robust_accuracy"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plain_count(value) -> str:
    return str(value) if isinstance(value, int) else "—"
