"""vanishing: the first layer's gradient RMS far below the last layer's (or fallen far since the start).
``rules/__init__.py`` drops it when "dead" holds and the first layer's gradient is exactly zero."""
from __future__ import annotations

import math

from ...findings import Finding
from ...health import RECENT_SAMPLES, START_SAMPLES, VANISHING_DROP, VANISHING_RATIO
from ..records import RecordTable, grad_rms, median

KIND = "vanishing"
ADVICE = (
    "Gradients shrink on their way to the early layers, so those layers barely learn. Use a ReLU-family "
    "activation (ReLU, LeakyReLU, GELU) instead of sigmoid/tanh, He init (nn.init.kaiming_normal_) for "
    "ReLU or Glorot init (nn.init.xavier_uniform_) for tanh, add normalisation layers (BatchNorm/LayerNorm), "
    "or residual connections so gradients have a short path back."
)


def check(table: RecordTable) -> list[Finding]:
    ends = table.depth_ends()
    if ends is None:
        return []
    first, last = ends
    ratios = table.depth_ratios(first, last)
    if not ratios:
        return []
    recent = median(r for _, r in ratios[-RECENT_SAMPLES:])
    start = median(r for _, r in ratios[:START_SAMPLES])
    drop = start / recent if recent > 0 else math.inf
    if recent >= VANISHING_RATIO and (len(ratios) < START_SAMPLES + RECENT_SAMPLES or drop < VANISHING_DROP):
        return []
    recent_steps = [s for s, _ in ratios[-RECENT_SAMPLES:]]
    rows = table.rows
    evidence = {
        "first_layer": first, "last_layer": last,
        "grad_ratio_first_last": recent, "grad_ratio_first_last_at_start": start,
        "grad_norm_first": median(rows[(s, first)]["grad_norm"] for s in recent_steps),
        "grad_norm_last": median(rows[(s, last)]["grad_norm"] for s in recent_steps),
        "per_layer_grad_rms": {layer: _median_rms(table, recent_steps, layer) for layer in table.layers},
        "ratio_threshold": VANISHING_RATIO, "measure": "gradient RMS (norm / sqrt(numel)), median of recent samples",
    }
    return [Finding(KIND, first, evidence, ADVICE)]


def _median_rms(table: RecordTable, steps: list[int], layer: str) -> float | None:
    values = [grad_rms(table.get(s, layer)) for s in steps]
    known = [v for v in values if v is not None]
    return median(known) if known else None
