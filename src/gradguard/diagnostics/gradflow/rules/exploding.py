"""exploding: the whole model's gradient norm grows or jumps; or (``overflowed``) it grew and then overflowed to
NaN/inf between two samples, which ``rules/__init__.py`` asks only when the finite samples show no explosion."""
from __future__ import annotations

import math

from ...findings import WHOLE_MODEL, Finding
from ...health import EXPLODING_BEFORE_OVERFLOW, EXPLODING_GROWTH, EXPLODING_JUMP, START_SAMPLES
from ..records import RecordTable, growth, largest_jump, median

KIND = "exploding"
ADVICE = (
    "Gradient norms grow or jump (or turn NaN/inf), so updates overshoot. Clip gradients by norm "
    "(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), or Trainer(clip_grad_norm=1.0)), lower the "
    "learning rate (try 10x lower), and use He/Glorot init and normalisation layers to keep scales stable."
)


def check(table: RecordTable) -> list[Finding]:
    totals = table.total_grad_norms()
    if len(totals) < 2:
        return []
    grown = growth(totals)
    jump_step, jump = largest_jump(totals, grown["start_grad_norm"])
    if grown["growth"] < EXPLODING_GROWTH and jump < EXPLODING_JUMP:
        return []
    # Blame the layer whose own gradient grew the most.
    layer_growth: dict[str, float] = {}
    for layer in table.layers:
        series = table.series(layer, "grad_norm")
        if len(series) >= 2:
            first = median(v for _, v in series[:START_SAMPLES])
            layer_growth[layer] = max(v for _, v in series) / first if first > 0 else math.inf
    worst = max(layer_growth, key=lambda layer: layer_growth[layer]) if layer_growth else table.layers[0]
    evidence = {**grown, "largest_jump": jump, "jump_step": jump_step, "layer_growth": layer_growth.get(worst),
                "growth_threshold": EXPLODING_GROWTH, "jump_threshold": EXPLODING_JUMP}
    return [Finding(KIND, worst, evidence, ADVICE)]


def overflowed(table: RecordTable, nonfinite: list[Finding]) -> list[Finding]:
    """An explosion that overflowed between two samples: gradients went NaN/inf (not from the input) after the
    finite samples' total gradient norm grew >= EXPLODING_BEFORE_OVERFLOW x while the loss rose above its start."""
    if not nonfinite or nonfinite[0].evidence.get("input_nonfinite_step") is not None:
        return []
    totals = table.total_grad_norms()
    losses = table.losses()
    if len(totals) < 2 or len(losses) < 2:
        return []
    grown = growth(totals)
    loss_start = median(losses[:START_SAMPLES])
    if grown["growth"] < EXPLODING_BEFORE_OVERFLOW or losses[-1] <= loss_start:
        return []
    evidence = {**grown, "overflow_step": nonfinite[0].evidence["first_step"], "loss_start": loss_start,
                "loss_before_overflow": losses[-1], "growth_threshold": EXPLODING_BEFORE_OVERFLOW}
    return [Finding(KIND, WHOLE_MODEL, evidence, ADVICE)]
