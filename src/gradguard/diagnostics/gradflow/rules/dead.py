"""dead: ReLU units never positive over the sampled batch, a recent fraction at or above DEAD_FRACTION."""
from __future__ import annotations

from typing import Any

from ...findings import Finding
from ...health import DEAD_FRACTION, RECENT_SAMPLES
from ..records import RecordTable, median

KIND = "dead"
ADVICE = (
    "These ReLU units output zero for every input, so they get no gradient and never recover. Initialise "
    "biases at zero with He init, lower the learning rate, add normalisation before the activation, or use "
    "LeakyReLU/GELU, which keep a gradient for negative inputs."
)


def fraction_findings(table: RecordTable, kind: str, key: str, threshold: float, advice: str) -> list[Finding]:
    """One ``kind`` finding per layer whose recent median of ``key`` (a fraction of units) reaches ``threshold``."""
    findings = []
    for layer in table.layers:
        series = table.series(layer, key)
        if not series:
            continue
        recent = median(v for _, v in series[-RECENT_SAMPLES:])
        evidence: dict[str, Any] = {key: recent, "at_start": series[0][1]}
        if recent >= threshold:
            activation = next((table.rows[(s, layer)].get("activation") for s, _ in reversed(series)), None)
            evidence.update(activation=activation, threshold=threshold, samples=len(series))
            findings.append(Finding(kind, layer, evidence, advice))
    return findings


def check(table: RecordTable) -> list[Finding]:
    return fraction_findings(table, KIND, "dead_fraction", DEAD_FRACTION, ADVICE)
