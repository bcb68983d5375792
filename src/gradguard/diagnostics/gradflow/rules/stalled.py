"""stalled: a layer whose update ratio is far below the model's typical one (frozen, or starved of gradient)."""
from __future__ import annotations

from ...findings import Finding
from ...health import RECENT_SAMPLES, STALLED_FACTOR
from ..records import RecordTable, median

KIND = "stalled"
ADVICE = (
    "This layer's weights barely move compared with the rest of the model. Check that it is not frozen "
    "and that its learning rate is not tiny; if the layer is early in the network this is usually vanishing "
    "gradients: use ReLU-family activations, He/Glorot init, normalisation layers or residual connections "
    "(an adaptive optimiser such as Adam also evens out per-layer step sizes)."
)


def check(table: RecordTable) -> list[Finding]:
    ratios = {}
    for layer in table.layers:
        series = table.series(layer, "update_ratio")
        if series:
            ratios[layer] = median(v for _, v in series[-RECENT_SAMPLES:])
    if len(ratios) < 2:
        return []
    typical = median(ratios.values())
    findings = []
    for layer, ratio in ratios.items():
        if typical > 0 and ratio < STALLED_FACTOR * typical:
            evidence = {"update_ratio": ratio, "median_update_ratio": typical, "relative": ratio / typical,
                        "threshold": STALLED_FACTOR}
            findings.append(Finding(KIND, layer, evidence, ADVICE))
    return findings
