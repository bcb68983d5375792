"""Measure the gradient-health statistics of the demo models that set GradientMonitor's thresholds.

    python bench/diagnostics_calibration.py [--seeds 3] [--epochs 4]

For each demo model (healthy and sick), several seeds, it trains on digits with a GradientMonitor sampling
every other step and prints the statistics each threshold in gradguard/diagnostics/gradflow/rules/ looks at:
first/last gradient-RMS ratio (start and recent), total-gradient growth and jump, the largest raw (pre-clipping)
layer gradient norm, max dead and saturated fractions, the smallest per-layer update ratio relative to the
median — plus, as ground truth, dead units over all training inputs and test accuracy, and the findings raised.
The output table is copied into docs/diagnose.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dead_over_inputs  # noqa: E402
from gradguard import models  # noqa: E402
from gradguard.data import load_dataset  # noqa: E402
from gradguard.diagnostics.gradflow import GradientMonitor, RecordTable, findings_from_records  # noqa: E402
from gradguard.diagnostics.gradflow.records import largest_jump  # noqa: E402
from gradguard.diagnostics.health import RECENT_SAMPLES, START_SAMPLES  # noqa: E402


def mlp(linears: int, width: int, activation: type[nn.Module], **kwargs) -> nn.Module:
    """The zoo MLP on 8×8 digits with `linears` Linear layers in all (the zoo's depth counts hidden ones)."""
    return models.mlp(depth=linears - 1, width=width, activation=activation.__name__.lower(), input_shape=(1, 8, 8),
                      **kwargs)


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 64, 64), nn.ReLU(), nn.Linear(64, 10))


# name -> (builder, optimiser, lr, clip_norm, sick kind expected or None)
DEMOS = {
    "sigmoid-12 (default init), SGD": (lambda: mlp(12, 64, nn.Sigmoid), "sgd", 0.1, None, "vanishing"),
    "sigmoid-12 (default init), Adam": (lambda: mlp(12, 64, nn.Sigmoid), "adam", 1e-3, None, "vanishing"),
    "relu-12 He init, SGD": (lambda: mlp(12, 64, nn.ReLU, init="he"), "sgd", 0.01, None, None),
    "relu-12 He init, Adam": (lambda: mlp(12, 64, nn.ReLU, init="he"), "adam", 1e-3, None, None),
    "relu-12 + BatchNorm, Adam": (lambda: mlp(12, 64, nn.ReLU, norm=True), "adam", 1e-3, None, None),
    "mlp 64-128-10 relu, Adam": (lambda: mlp(2, 128, nn.ReLU), "adam", 1e-2, None, None),
    "small cnn relu, Adam": (small_cnn, "adam", 1e-3, None, None),
    "tanh-4 default init, SGD": (lambda: mlp(4, 64, nn.Tanh), "sgd", 0.1, None, None),
    "relu-4, SGD lr=1 (too high)": (lambda: mlp(4, 64, nn.ReLU), "sgd", 1.0, None, "not exploding (units die)"),
    "relu-4, SGD lr=2 (huge)": (lambda: mlp(4, 64, nn.ReLU), "sgd", 2.0, None, "exploding"),
    "relu-4, SGD lr=2 + clip_grad_norm 1": (lambda: mlp(4, 64, nn.ReLU), "sgd", 2.0, 1.0, "not exploding"),
    "relu-4, SGD lr=2 + clip_grad_norm 0.3": (lambda: mlp(4, 64, nn.ReLU), "sgd", 2.0, 0.3, "not exploding"),
    "relu-4 bias -5": (lambda: mlp(4, 64, nn.ReLU, bias=-5.0), "adam", 1e-3, None, "dead"),
    "tanh-4 N(0,1) init": (lambda: mlp(4, 64, nn.Tanh, init="large"), "sgd", 0.1, None, "saturated"),
}


def run_demo(builder, optimiser_name: str, lr: float, clip: float | None, seed: int, epochs: int, data,
             every: int = 2) -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(seed)
    model = builder()
    if optimiser_name == "sgd":
        optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = data.x_train, data.y_train
    with GradientMonitor(model, every=every, optimizer=optimiser) as monitor:
        for _ in range(epochs):
            order = torch.randperm(len(y))
            for start in range(0, len(y), 64):
                batch = order[start:start + 64]
                optimiser.zero_grad()
                nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                if clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimiser.step()
    return model, monitor.records


def whole_data_check(model: nn.Module, data) -> dict:
    """Test accuracy, and the largest fraction of a layer's ReLU units never positive over ALL training inputs."""
    model.eval()
    with torch.no_grad():
        accuracy = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    return {"test_accuracy": accuracy, "dead_all_inputs_max": max(dead_over_inputs(model, data.x_train), default=None)}


def statistics_of(records: list[dict]) -> dict:
    table = RecordTable(records)
    steps, layers = table.steps, table.layers
    ratios = table.depth_ratios(layers[0], layers[-1])
    out = {"nonfinite": any(r.get("grad_finite") is False or r.get("weight_finite") is False for r in records)}
    if ratios:
        out["ratio_start"] = statistics.median(v for _, v in ratios[:START_SAMPLES])
        out["ratio_recent"] = statistics.median(v for _, v in ratios[-RECENT_SAMPLES:])
    finite_steps = steps
    if out["nonfinite"]:
        first_bad = min(r["step"] for r in records if r.get("grad_finite") is False or r.get("weight_finite") is False)
        finite_steps = [s for s in steps if s < first_bad]
    totals = table.with_steps(finite_steps).total_grad_norms()
    if len(totals) >= 2:
        start = statistics.median(v for _, v in totals[:START_SAMPLES])
        out["growth"] = max(v for _, v in totals) / start
        out["jump"] = largest_jump(totals, start)[1]
    dead = [r["dead_fraction"] for r in records if r.get("dead_fraction") is not None]
    saturated = [r["saturated_fraction"] for r in records if r.get("saturated_fraction") is not None]
    out["dead_recent_max"] = max(_recent_by_layer(table, "dead_fraction"), default=None)
    out["saturated_recent_max"] = max(_recent_by_layer(table, "saturated_fraction"), default=None)
    out["dead_max"] = max(dead, default=None)
    out["saturated_max"] = max(saturated, default=None)
    updates = {layer: statistics.median(v for _, v in table.series(layer, "update_ratio")[-RECENT_SAMPLES:])
               for layer in layers if table.series(layer, "update_ratio")}
    if len(updates) >= 2:
        typical = statistics.median(updates.values())
        out["min_update_relative"] = min(updates.values()) / typical if typical > 0 else None
    return out


def _recent_by_layer(table: RecordTable, key: str):
    for layer in table.layers:
        series = table.series(layer, key)
        if series:
            yield statistics.median(v for _, v in series[-RECENT_SAMPLES:])


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and (value == 0 or 1e-2 <= abs(value) < 1e3):
        return f"{value:.3g}"
    return f"{value:.1e}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("digits")
    columns = ["ratio_start", "ratio_recent", "growth", "jump", "raw_grad_max", "nonfinite", "dead_recent_max",
               "dead_all_inputs_max", "saturated_recent_max", "min_update_relative", "test_accuracy"]
    print("| demo | expected | seed | " + " | ".join(columns) + " | findings |")
    print("|" + "---|" * (len(columns) + 4))
    began = time.perf_counter()
    for name, (builder, optimiser, lr, clip, expected) in DEMOS.items():
        for seed in range(args.seeds):
            model, records = run_demo(builder, optimiser, lr, clip, seed, args.epochs, data)
            stats = statistics_of(records) | whole_data_check(model, data)
            stats["raw_grad_max"] = max((r["raw_grad_norm"] for r in records if r.get("raw_grad_norm") is not None),
                                        default=None)
            kinds = sorted({f.kind for f in findings_from_records(records)})
            print(f"| {name} | {expected or 'healthy'} | {seed} | " + " | ".join(fmt(stats.get(c)) for c in columns)
                  + f" | {', '.join(kinds) or 'none'} |", flush=True)
    print(f"\n{time.perf_counter() - began:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
