"""GradientMonitor overhead: a training loop with and without the monitor, interleaved, median ratio.

    python bench/monitor_overhead.py [--repeats 7] [--steps 100] [--threads 1]

Two workloads: the literature's small Fashion-MNIST CNN (batch 128, real data) and a 12-layer ReLU MLP on
digits (batch 64: little compute per layer, so the hooks' fixed cost weighs most — the worst case). Each
round times the same number of optimiser steps plain, with the monitor sampling every 10 steps, and (for
reference) every 50 steps and every step; the order inside a round alternates. Reported: median over rounds of the
per-round time ratio monitored / plain. Target: <= 1.05 at every=10.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmnist_cnn, load_fashion_mnist  # noqa: E402
from gradguard.data import load_dataset  # noqa: E402
from gradguard.diagnostics import GradientMonitor  # noqa: E402
from gradguard.models import build_model  # noqa: E402


def deep_relu_mlp(depth: int = 12, width: int = 64) -> nn.Module:
    """`depth` Linear layers of `width` with ReLU between, on 8×8 digits (the zoo MLP counts hidden layers)."""
    return build_model("mlp", depth=depth - 1, width=width, input_shape=(1, 8, 8))


def train_steps(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], every: int | None) -> float:
    """Seconds for len(batches) Adam steps; every=None trains without a monitor."""
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = GradientMonitor(model, every=every, optimizer=optimiser) if every else None
    start = time.perf_counter()
    if monitor is not None:
        monitor.attach()
    for x, y in batches:
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    if monitor is not None:
        monitor.detach()
    return time.perf_counter() - start


def measure(name: str, build, batches, repeats: int) -> dict:
    torch.manual_seed(0)
    initial = build()
    variants = {"plain": None, "every=10": 10, "every=50": 50, "every=1": 1}
    times: dict[str, list[float]] = {key: [] for key in variants}
    train_steps(copy.deepcopy(initial), batches[:10], None)  # warm-up (allocator, kernels)
    for round_index in range(repeats):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for key in order:
            times[key].append(train_steps(copy.deepcopy(initial), batches, variants[key]))
    ratio = {key: statistics.median(t / p for t, p in zip(times[key], times["plain"], strict=False)) for key in variants if key != "plain"}
    result = {"workload": name, "steps": len(batches), "repeats": repeats,
              "plain_s_median": statistics.median(times["plain"]),
              "every10_s_median": statistics.median(times["every=10"]),
              "every1_s_median": statistics.median(times["every=1"]),
              "ratio_every10": ratio["every=10"], "ratio_every50": ratio["every=50"], "ratio_every1": ratio["every=1"],
              # extra seconds per sampled step, from the every=1 run
              "sampled_step_extra_ms": 1e3 * (statistics.median(times["every=1"]) - statistics.median(times["plain"])) / len(batches)}
    print(json.dumps(result), flush=True)
    return result


def batches_of(x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int) -> list:
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    chosen = [order[(i * batch_size) % (len(y) - batch_size):][:batch_size] for i in range(steps)]
    return [(x[index], y[index]) for index in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "monitor_overhead.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    x_train, y_train, _, _ = load_fashion_mnist()
    results.append(measure("fmnist-cnn, Fashion-MNIST, batch 128", fmnist_cnn,
                           batches_of(x_train, y_train, 128, args.steps), args.repeats))
    digits = load_dataset("digits")
    results.append(measure("12-layer ReLU MLP, digits, batch 64", deep_relu_mlp,
                           batches_of(digits.x_train, digits.y_train, 64, args.steps), args.repeats))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
