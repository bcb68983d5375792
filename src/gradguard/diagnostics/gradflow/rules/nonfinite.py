"""nonfinite: NaN/inf in the loss, a gradient, a weight or the input. Runs first: the other rules then read only
the samples before it (``rules/__init__.py``)."""
from __future__ import annotations

from typing import Any

from ...findings import Finding
from ..records import RecordTable

KIND = "nonfinite"
ADVICE = (
    "The loss or the gradients became NaN/inf, and every update from here on is garbage. Check the data "
    "(torch.isfinite(x).all()), guard logs and divisions with an epsilon (log(p + 1e-12), x / (n + 1e-12)), "
    "lower the learning rate and clip gradients by norm (Trainer(clip_grad_norm=1.0)); under float16 "
    "autocast use torch.amp.GradScaler, which skips the steps whose gradients overflow."
)


def check(table: RecordTable) -> list[Finding]:
    """NaN/inf in the loss (any step passed to step()), a gradient or a weight (sampled steps). Names the layer
    the backward pass reached first among those with a non-finite gradient (the one nearest the loss)."""
    rows, steps, layers = table.rows, table.steps, table.layers
    loss_steps = [rows[(step, layer)]["loss_nonfinite_step"] for step in steps for layer in layers
                  if (step, layer) in rows and rows[(step, layer)].get("loss_nonfinite_step") is not None]
    bad = [(step, layer) for step in steps for layer in layers if (step, layer) in rows
           and (rows[(step, layer)].get("grad_finite") is False or rows[(step, layer)].get("weight_finite") is False
                or rows[(step, layer)].get("loss_finite") is False)]
    inputs = [step for step in steps for layer in layers
              if (step, layer) in rows and rows[(step, layer)].get("input_finite") is False]
    if not (bad or loss_steps or inputs):
        return []
    first_record = bad[0][0] if bad else None
    first = min(s for s in (first_record, min(loss_steps, default=None), min(inputs, default=None)) if s is not None)
    at = first_record if first_record is not None else first
    grads = [layer for layer in layers if (at, layer) in rows and rows[(at, layer)].get("grad_finite") is False]
    weights = [layer for layer in layers if (at, layer) in rows and rows[(at, layer)].get("weight_finite") is False]
    evidence: dict[str, Any] = {"first_step": first, "loss_nonfinite_step": min(loss_steps, default=None),
                                "input_nonfinite_step": min(inputs, default=None), "sampled_step": at,
                                "nonfinite_grad_layers": list(reversed(grads)), "nonfinite_weight_layers": weights,
                                "nonfinite_samples": len({step for step, _ in bad})}
    totals = table.with_steps([s for s in steps if s < first]).total_grad_norms()
    if totals:
        evidence["last_finite_grad_norm"] = totals[-1][1]
    layer = grads[-1] if grads else weights[0] if weights else "(input)" if inputs else "(loss)"
    return [Finding(KIND, layer, evidence, ADVICE)]
