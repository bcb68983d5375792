"""Shared benchmark helpers: real Fashion-MNIST, the literature's small CNN, short training runs, timing.

Fashion-MNIST comes from Debian's package: `apt-get install -y dataset-fashion-mnist`.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from gradguard.data import load_dataset
from gradguard.errors import DataError
from gradguard.models import build_model


def run_header(**fields) -> dict:
    """What every result JSON starts with: the command, torch/python versions, the start time, then ``fields``."""
    import platform
    import shlex
    import sys

    return {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), **fields,
            "torch": torch.__version__, "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def write_json(path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename): a crash never leaves half a JSON."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def load_fashion_mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images (N, 1, 28, 28) in [0, 1], labels int64, via gradguard.data."""
    try:
        data = load_dataset("fashion-mnist")
    except DataError as error:
        raise SystemExit(f"{error}\n(install it with `apt-get install -y dataset-fashion-mnist`)") from None
    return data.x_train, data.y_train, data.x_test, data.y_test


def dead_over_inputs(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Per ReLU module: the fraction of its units (features; channels, dim 1) that are positive for no element of
    any row of ``x`` — dead over these inputs, the ground truth a per-batch monitor can only estimate."""
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [float((~(out > 0).movedim(1, 0).reshape(out.shape[1], -1).any(1)).float().mean()) for out in outputs]


def fmnist_cnn() -> nn.Module:
    """Conv16-4x4/s2 -> Conv32-4x4/s2 -> FC100 -> FC10 (Wong & Kolter 2018's small Fashion-MNIST CNN), from the zoo."""
    return build_model("fmnist-cnn")


def train_quick(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, eps: float = 0.0,
                lr: float = 1e-3, batch_size: int = 128, seed: int = 0) -> nn.Module:
    """A short Adam run; with eps > 0 it is fast FGSM adversarial training (random start, step 1.25·eps)."""
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for start in range(0, len(y), batch_size):
            xb, yb = x[order[start:start + batch_size]], y[order[start:start + batch_size]]
            if eps > 0:
                delta = (torch.rand_like(xb) * 2 - 1) * eps
                delta.requires_grad_(True)
                loss = nn.functional.cross_entropy(model((xb + delta).clamp(0, 1)), yb)
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() + 1.25 * eps * grad.sign()).clamp(-eps, eps)
                xb = (xb + delta).clamp(0, 1)
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimiser.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Run every variant once per round, ``repeats`` rounds, and return each one's median seconds.

    Interleaving spreads the machine's noise (other processes, frequency changes) over all variants.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
