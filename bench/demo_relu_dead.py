"""Is the `dead` finding on the Fashion-MNIST demo's ReLU MLP true? Ground truth over all training inputs (issue 15).

Trains the demo's gradient-experiment model — zoo MLP, 8 hidden ReLU layers of 64, He init, SGD with momentum 0.9,
batch 32, 4 epochs on the first 10 000 Fashion-MNIST training images, monitor every 5 steps — at a given learning
rate for 3 seeds, and prints per seed: test accuracy, the fraction of each ReLU layer's units that never fire on
any of the 10 000 training inputs, and the monitor's findings (kind, layer, per-batch dead fraction).

    python bench/demo_relu_dead.py --lr 0.05     # the demo's old setting: dead units, one seed collapses
    python bench/demo_relu_dead.py --lr 0.01     # the demo's setting for 28x28 data now: healthy, no finding
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dead_over_inputs  # noqa: E402
from gradguard.data import load_dataset  # noqa: E402
from gradguard.diagnostics.gradflow import GradientMonitor  # noqa: E402
from gradguard.models import build_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("fashion-mnist")
    x, y = data.x_train[:10000], data.y_train[:10000]
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = build_model("mlp", depth=8, width=64, activation="relu", init="he", input_shape=(1, 28, 28))
        optimiser = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        with GradientMonitor(model, every=5, optimizer=optimiser) as monitor:
            for _ in range(4):
                order = torch.randperm(len(y))
                for start in range(0, len(y), 32):
                    batch = order[start:start + 32]
                    loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    monitor.step(loss.detach())
        model.eval()
        with torch.no_grad():
            accuracy = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
        findings = [(f.kind, f.layer, round(f.evidence.get("dead_fraction", 0.0), 3)) for f in monitor.findings()]
        print(json.dumps({"lr": args.lr, "seed": seed, "test_accuracy": round(accuracy, 4),
                          "dead_over_all_inputs": [round(v, 3) for v in dead_over_inputs(model, x)], "findings": findings}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
