"""What one attack pass costs under each setting gradguard offers: eager, channels_last, bf16 autocast, both, and
torch.compile — on the Fashion-MNIST CNN (bench/evaluation.py's models) and the CIFAR-shaped PreActResNet-18
(bench/cifar_suite.py), interleaved rounds, median seconds of one input-gradient pass and one forward pass.

    python bench/pass_cost.py                      # results/pass-cost.json and a markdown table
    python bench/pass_cost.py --no-compile         # skip torch.compile (tens of seconds to compile)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_fashion_mnist  # noqa: E402
from gradguard.models import load  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = {"fmnist-pgd": (HERE / "out" / "evaluation" / "pgd" / "model.safetensors", 250),
          "cifar-w16": (HERE / "out" / "cifar" / "fashion-mnist-32x32x3-w16-n10000-e5" / "model.safetensors", 100)}


def passes(model, x, y, channels_last: bool, bf16: bool):
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def gradient():
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(xg)
        torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), xg)

    def forward():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x)
    return gradient, forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, _, x_test, y_test = load_fashion_mnist()
    result = {"threads": args.threads, "rounds": args.rounds, "torch": torch.__version__, "models": {}}
    for name, (path, batch) in MODELS.items():
        if not path.exists():
            print(f"{name}: no model at {path}; skipped")
            continue
        x, y = x_test[:batch], y_test[:batch]
        if name.startswith("cifar"):
            x = F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1).contiguous()
        variants = {}
        for label, channels_last, bf16, compiled in [("eager", False, False, False), ("channels_last", True, False, False),
                                                      ("bf16", False, True, False), ("bf16+channels_last", True, True, False),
                                                      ("compile", False, False, True)]:
            if compiled and args.no_compile:
                continue
            model = load(path).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            if compiled:
                model = torch.compile(model)  # type: ignore[assignment]  # an OptimizedModule
            gradient, forward = passes(model, x, y, channels_last, bf16)
            began = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gradient(), forward()  # warm-up (compiles)
            variants[label] = {"gradient": gradient, "forward": forward, "first_call_s": time.perf_counter() - began}
        times: dict[str, dict[str, list[float]]] = {k: {"gradient": [], "forward": []} for k in variants}
        for _ in range(args.rounds):
            for label, fns in variants.items():
                for kind in ("gradient", "forward"):
                    began = time.perf_counter()
                    fns[kind]()
                    times[label][kind].append(time.perf_counter() - began)
        medians = {k: {kind: statistics.median(v) for kind, v in t.items()} for k, t in times.items()}
        result["models"][name] = {"batch": batch, "median_s": medians,
                                  "first_call_s": {k: round(v["first_call_s"], 2) for k, v in variants.items()}}
        for label, m in medians.items():
            print(f"{name:<12} {label:<20} gradient {1e3 * m['gradient']:8.1f} ms "
                  f"({m['gradient'] / medians['eager']['gradient']:.2f}x)  forward {1e3 * m['forward']:8.1f} ms "
                  f"({m['forward'] / medians['eager']['forward']:.2f}x)", flush=True)
    out = HERE / "results" / "pass-cost.json"
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
