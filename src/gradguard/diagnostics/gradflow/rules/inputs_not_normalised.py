"""inputs_not_normalised: the first layer's input RMS (median over samples) above INPUT_RMS_LIMIT."""
from __future__ import annotations

from ...findings import Finding
from ...health import INPUT_RMS_LIMIT
from ..records import RecordTable, median

KIND = "inputs_not_normalised"
ADVICE = (
    "The inputs reaching the first layer are large (pixels left in 0-255?), which inflates the first "
    "layer's activations and gradients and makes learning-rate choice fragile. Scale them to [0, 1] "
    "(x / 255) or standardise them ((x - mean) / std per channel, e.g. gradguard.models.normalise)."
)


def check(table: RecordTable) -> list[Finding]:
    """Inputs not normalised: the first layer's input RMS (median over samples) above INPUT_RMS_LIMIT."""
    for layer in table.layers:
        series = table.series(layer, "input_rms")
        if series:
            rms = median(v for _, v in series)
            if rms <= INPUT_RMS_LIMIT:
                return []
            peaks = [v for _, v in table.series(layer, "input_absmax")]
            evidence = {"input_rms": rms, "input_absmax": max(peaks) if peaks else None,
                        "threshold": INPUT_RMS_LIMIT, "samples": len(series)}
            return [Finding(KIND, layer, evidence, ADVICE)]
    return []
