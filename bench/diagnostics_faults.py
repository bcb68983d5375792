"""Labelled fault benchmark for GradientMonitor (issue 15): is each verdict right, and how early?

Short training runs on digits (8×8) and Fashion-MNIST (28×28, a fixed training subset) for the four model families
of ``diag_models`` (MLP, CNN, ResNet with BatchNorm, a tiny ViT with LayerNorm and nn.MultiheadAttention), each
healthy (Adam and SGD with momentum) and with one planted fault, several seeds each. The monitor runs as a user
runs it — ``GradientMonitor(model, every=..., optimizer=opt, on_finding=<callable>)`` plus ``monitor.step(loss)``
— and the callable records the step at which each finding first appears.

A fault run counts as detected when its fault's finding kind appears; a healthy run is a false alarm when any
finding appears, at the end or at any sampled step before (what ``on_finding`` would have warned about). Results (per kind: recall, median first-detection step; false-alarm rate; every run's findings
and the statistics the thresholds look at) go to ``--out`` (JSON, rewritten after each run).

    python bench/diagnostics_faults.py                  # full run: 2 datasets × 4 families × ≤ 12 scenarios × 5 seeds
    python bench/diagnostics_faults.py --quick          # 1 seed, digits only, fewer steps (the test runs this)
    python bench/diagnostics_faults.py --table          # the JSON as markdown
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_header, write_json  # noqa: E402
from diag_models import build  # noqa: E402
from gradguard.data import load_dataset  # noqa: E402
from gradguard.diagnostics.gradflow import (  # noqa: E402
    GradientMonitor,
    RecordTable,
    findings_from_records,
    not_learning_level,
)
from gradguard.diagnostics.gradflow.records import largest_jump  # noqa: E402
from gradguard.diagnostics.health import RECENT_SAMPLES, START_SAMPLES  # noqa: E402

FAMILIES = ("mlp", "cnn", "resnet", "transformer")
DATASETS = ("digits", "fashion-mnist")


@dataclass
class Scenario:
    """One way to train: ``fault`` is the finding kind it plants (None = healthy)."""

    fault: str | None
    optimiser: str = "adam"  # "adam" (lr 1e-3) or "sgd" (momentum 0.9)
    lr: float | None = None
    model: dict = field(default_factory=dict)  # extra diag_models knobs
    plant: Callable[[nn.Module, str], None] | None = None  # edits the built model in place
    input_scale: float = 1.0
    nan_at: int | None = None  # corrupt one pixel of this step's batch with NaN
    stall_layer: bool = False  # lr = 0 for one middle layer's parameter group


def _first_param_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


def _dead_biases(model: nn.Module, family: str) -> None:
    """Biases of -5 in front of every ReLU (BatchNorm's shift for the ResNet): units that never fire."""
    with torch.no_grad():
        for module in model.modules():
            if family == "resnet" and isinstance(module, nn.BatchNorm2d):
                module.bias.fill_(-5.0)
            elif family == "transformer" and isinstance(module, nn.Linear) and module.out_features > module.in_features:
                module.bias.fill_(-5.0)  # the MLP's fc1 (dim -> 2·dim), the one in front of the activation
            elif family in ("mlp", "cnn") and isinstance(module, (nn.Linear, nn.Conv2d)):
                module.bias.fill_(-5.0)


def _saturating_init(model: nn.Module, family: str) -> None:
    """N(0, 1) weights in front of tanh (the classic bad init; BatchNorm's scale 8 for the ResNet): pre-activations
    with a standard deviation of several units, far out on tanh's asymptotes."""
    with torch.no_grad():
        for module in model.modules():
            if family == "resnet" and isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(8.0)
            elif family == "transformer" and isinstance(module, nn.Linear) and module.out_features > module.in_features:
                nn.init.normal_(module.weight)
            elif family in ("mlp", "cnn") and isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight)


class SigmoidStack(nn.Module):
    """A plain (non-residual) stack of ``depth`` width-preserving Linear/1×1-conv + sigmoid layers: gradients
    through it shrink by ≈ 0.25·gain per layer, which is the vanishing-gradient fault, planted after the stem."""

    def __init__(self, width: int, depth: int, conv: bool):
        super().__init__()
        make = (lambda: nn.Conv2d(width, width, 1)) if conv else (lambda: nn.Linear(width, width))
        self.layers = nn.Sequential(*[m for _ in range(depth) for m in (make(), nn.Sigmoid())])

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def _sigmoid_stack_after_stem(model: nn.Module, family: str) -> None:
    """Vanishing for the residual families, whose skips otherwise carry the gradient through any depth."""
    if family == "resnet":  # model = Sequential(conv, bn, act, blocks..., pool, flatten, linear)
        stem_width = model[0].out_channels
        model[2] = nn.Sequential(SigmoidStack(stem_width, 10, conv=True))
    elif family == "transformer":
        dim = model.embed.out_channels
        embed = model.embed
        model.embed = nn.Sequential(embed, SigmoidStack(dim, 10, conv=True))


def _vanishing_knobs(family: str) -> tuple[dict, Callable | None]:
    if family == "mlp":
        return {"depth": 12, "width": 64, "activation": "sigmoid"}, None
    if family == "cnn":
        return {"depth": 8, "activation": "sigmoid"}, None
    return {}, _sigmoid_stack_after_stem


def scenarios(family: str) -> dict[str, Scenario]:
    vanishing_model, vanishing_plant = _vanishing_knobs(family)
    # The transformer's MLP uses GELU by default; the dead/saturated faults need a ReLU/tanh there.
    relu = {"activation": "relu"}
    tanh = {"activation": "tanh"}
    return {
        "healthy-adam": Scenario(None, "adam"),
        "healthy-sgd": Scenario(None, "sgd"),
        "vanishing": Scenario("vanishing", "sgd", model=vanishing_model, plant=vanishing_plant),
        **({"exploding": Scenario("exploding", "sgd", lr=EXPLODING_LR, model={"activation": "gelu"})}
           if family in EXPLODING_FAMILIES else {}),
        "dead": Scenario("dead", "adam", model=relu, plant=_dead_biases),
        "saturated": Scenario("saturated", "sgd", model=tanh, plant=_saturating_init),
        "stalled": Scenario("stalled", "adam", stall_layer=True),
        "nonfinite": Scenario("nonfinite", "adam", nan_at=7),
        "inputs_not_normalised": Scenario("inputs_not_normalised", "adam", input_scale=255.0),
        "lr_too_low": Scenario("lr_too_low", "adam", lr=1e-9),
        **({"not_learning": Scenario("not_learning", "sgd", lr=NOT_LEARNING_LR),
            "not_learning_gelu": Scenario("not_learning", "sgd", lr=NOT_LEARNING_LR, model={"activation": "gelu"})}
           if family in NOT_LEARNING_FAMILIES else {}),
    }


HEALTHY_LR = {"adam": 1e-3, "sgd": 0.02}
# Exploding: SGD with momentum at lr 0.5 and a smooth activation (GELU). Planted only where a too-high learning
# rate really makes the gradient norm explode (measured on digits, 60 steps: the GELU MLP and the ViT grow
# 1e5-1e18x into inf). The CNN (global average pool) and the BatchNorm ResNet do not: at lr 2 the CNN's
# gradient peaks 56x above its start and training stalls at loss 2.41, the ResNet trains to loss 0.68; with
# ReLU, a too-high lr kills the units first ("dead", as in bench/diagnostics_calibration.py).
EXPLODING_LR = 1.0
EXPLODING_FAMILIES = ("mlp", "transformer")
# Not learning: the CNN at SGD (momentum 0.9) lr 2, with its ReLUs and with GELU. Its gradient spikes (3-1.3e5x on
# digits and Fashion-MNIST, 5 seeds, sometimes past the 1e3 "exploding" bar) and its loss then sits above chance
# (recent median 2.32-2.56 against ln 10 = 2.303) instead of falling; at lr 1 the same CNN still learns (0.5-2.0).
# The other families do something else at a too-high lr (the MLP and ViT explode, the ResNet trains).
NOT_LEARNING_LR = 2.0
NOT_LEARNING_FAMILIES = ("cnn",)


def _optimiser(model: nn.Module, scenario: Scenario) -> torch.optim.Optimizer:
    lr = scenario.lr if scenario.lr is not None else HEALTHY_LR[scenario.optimiser]
    if scenario.stall_layer:
        layers = _first_param_layers(model)
        frozen = layers[len(layers) // 2]
        stalled_ids = {id(p) for p in frozen.parameters(recurse=False)}
        groups = [{"params": [p for p in model.parameters() if id(p) not in stalled_ids]},
                  {"params": list(frozen.parameters(recurse=False)), "lr": 0.0}]
    else:
        groups = [{"params": list(model.parameters())}]
    if scenario.optimiser == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.Adam(groups, lr=lr)


def load(name: str, train_samples: int) -> tuple[Tensor, Tensor]:
    data = load_dataset(name)
    x, y = data.x_train[:train_samples].float(), data.y_train[:train_samples]
    return x, y


def run_one(family: str, dataset: str, name: str, scenario: Scenario, seed: int, data: tuple[Tensor, Tensor],
            steps: int, every: int, batch: int) -> dict:
    x, y = data
    torch.manual_seed(seed)
    model = build(family, tuple(x.shape[1:]), 10, **scenario.model)
    if scenario.plant is not None:
        scenario.plant(model, family)
    optimiser = _optimiser(model, scenario)
    first_seen: dict[str, int] = {}

    def note(finding) -> None:
        first_seen.setdefault(finding.kind, monitor.step_count - 1)

    generator = torch.Generator().manual_seed(seed)
    losses = []
    started = time.perf_counter()
    model.train()
    with GradientMonitor(model, every=every, optimizer=optimiser, on_finding=note) as monitor:
        for step in range(steps):
            index = torch.randint(len(y), (batch,), generator=generator)
            xb, yb = x[index] * scenario.input_scale, y[index]
            if scenario.nan_at is not None and step == scenario.nan_at:
                xb = xb.clone()
                xb.view(-1)[0] = math.nan
            loss = nn.functional.cross_entropy(model(xb), yb)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            monitor.step(loss.detach())
            losses.append(float(loss.detach()))
    elapsed = time.perf_counter() - started
    findings = findings_from_records(monitor.records)
    kinds = sorted({f.kind for f in findings})
    return {"family": family, "dataset": dataset, "scenario": name, "fault": scenario.fault, "seed": seed,
            "kinds": kinds, "first_step": first_seen,
            "detected": (scenario.fault in kinds) if scenario.fault else None,
            # a finding seen at any sampled step (on_finding) counts, also one gone by the end of the run
            "false_alarm": bool(kinds or first_seen) if scenario.fault is None else None,
            "findings": [f.to_dict() for f in findings], "statistics": statistics_of(monitor.records),
            "loss_start": losses[0], "loss_end": losses[-1], "elapsed_s": round(elapsed, 2),
            "sampled_losses": [round(v, 4) for v in losses[::every]]}


def statistics_of(records: list[dict]) -> dict:
    """The numbers each threshold compares, over the samples before the first non-finite value (as the rules do),
    so the healthy runs' values show how much margin every threshold has."""
    bad = [r["step"] for r in records if False in (r.get("grad_finite"), r.get("loss_finite"), r.get("weight_finite"),
                                                     r.get("input_finite"))]
    records = [r for r in records if not bad or r["step"] < min(bad)]
    if not records:
        return {}
    table = RecordTable(records)
    layers = table.layers
    ends = table.depth_ends()
    depth = table.depth_ratios(*ends) if ends else []
    totals = table.total_grad_norms()
    start = statistics.median(v for _, v in totals[:START_SAMPLES]) if totals else 0.0
    updates = {layer: statistics.median(v for _, v in series[-RECENT_SAMPLES:])
               for layer in layers if (series := table.series(layer, "update_ratio"))}
    typical = statistics.median(updates.values()) if updates else 0.0
    model_ratio = [v for _, v in table.model_update_ratios()]
    losses = table.losses()
    level = not_learning_level(table)

    def recent_max(key: str) -> float | None:
        values = [statistics.median(v for _, v in series[-RECENT_SAMPLES:])
                  for layer in layers if (series := table.series(layer, key))]
        return max(values) if values else None

    inputs = [v for layer in layers for _, v in table.series(layer, "input_rms")]
    return {
        "depth_ratio_recent": statistics.median(r for _, r in depth[-RECENT_SAMPLES:]) if depth else None,
        "grad_growth": max(v for _, v in totals) / start if totals and start > 0 else None,
        "grad_jump": largest_jump(totals, start)[1] if totals else None,
        "min_relative_update": (min(updates.values()) / typical) if updates and typical > 0 else None,
        "model_update_ratio": statistics.median(model_ratio) if model_ratio else None,
        "loss_change": (abs(statistics.median(losses[:START_SAMPLES]) - statistics.median(losses[-RECENT_SAMPLES:]))
                        / max(abs(statistics.median(losses[:START_SAMPLES])), 1e-12)) if len(losses) >= 2 else None,
        "dead_fraction_max": recent_max("dead_fraction"),
        "saturated_fraction_max": recent_max("saturated_fraction"),
        "input_rms": statistics.median(inputs) if inputs else None,
        "not_learning_ratio": level["ratio"] if level else None,
        "loss_recent": level["loss_recent"] if level else None,
    }


def summarise(runs: list[dict]) -> dict:
    by_fault: dict[str, list[dict]] = {}
    for run in runs:
        by_fault.setdefault(run["fault"] or "healthy", []).append(run)
    summary = {}
    for fault, group in by_fault.items():
        if fault == "healthy":
            alarms = [r for r in group if r["false_alarm"]]
            summary[fault] = {"runs": len(group), "false_alarms": len(alarms),
                              "false_alarm_rate": len(alarms) / len(group),
                              "alarm_kinds": sorted({k for r in alarms for k in [*r["kinds"], *r["first_step"]]})}
        else:
            hits = [r for r in group if r["detected"]]
            steps = [r["first_step"][fault] for r in hits if fault in r["first_step"]]
            summary[fault] = {"runs": len(group), "detected": len(hits), "recall": len(hits) / len(group),
                              "first_step_median": statistics.median(steps) if steps else None,
                              "first_step_max": max(steps) if steps else None,
                              "missed": [f"{r['dataset']}/{r['family']}/s{r['seed']}" for r in group if not r["detected"]],
                              "other_kinds": sorted({k for r in group for k in r["kinds"] if k != fault})}
    return summary


def table(result: dict) -> str:
    s = result["summary"]
    lines = [f"{result['settings']}", "", "| fault | runs | recall | first seen (median / max step) | also raised |",
             "|---|---|---|---|---|"]
    for fault, row in s.items():
        if fault == "healthy":
            continue
        lines.append(f"| {fault} | {row['runs']} | {row['recall']:.1%} ({row['detected']}) | "
                     f"{row['first_step_median']} / {row['first_step_max']} | {', '.join(row['other_kinds']) or '–'} |")
    h = s.get("healthy")
    if h:
        lines.append(f"| healthy (false alarms) | {h['runs']} | {h['false_alarm_rate']:.1%} ({h['false_alarms']}) | "
                     f"| {', '.join(h['alarm_kinds']) or '–'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, digits only, 40 steps")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--scenarios", default=None, help="comma-separated subset of the scenario names")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-samples", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "diagnostics-faults.json"))
    parser.add_argument("--table", action="store_true", help="print the JSON at --out as markdown and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return 0
    if args.quick:
        args.seeds, args.datasets, args.steps = 1, "digits", 40
    torch.set_num_threads(args.threads)
    settings = {"steps": args.steps, "every": args.every, "batch": args.batch, "seeds": args.seeds,
                "train_samples": args.train_samples, "datasets": args.datasets, "families": args.families}
    result = {**run_header(settings=settings), "runs": [], "summary": {}}
    wanted = set(args.scenarios.split(",")) if args.scenarios else None
    started = time.perf_counter()
    for dataset in args.datasets.split(","):
        data = load(dataset, args.train_samples)
        for family in args.families.split(","):
            for name, scenario in scenarios(family).items():
                if wanted and name not in wanted:
                    continue
                for seed in range(args.seeds):
                    run = run_one(family, dataset, name, scenario, seed, data, args.steps, args.every, args.batch)
                    result["runs"].append(run)
                    flag = ("ok" if (run["detected"] or run["false_alarm"] is False) else "MISS/ALARM")
                    print(f"{dataset:13s} {family:11s} {name:22s} s{seed} {flag:10s} {run['kinds']} "
                          f"{run['elapsed_s']}s", flush=True)
                    result["summary"] = summarise(result["runs"])
                    result["elapsed_s"] = round(time.perf_counter() - started, 1)
                    write_json(args.out, result)
    print(table(result))
    print(f"total {result['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
