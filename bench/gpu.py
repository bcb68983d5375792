"""GPU benchmark: attack speed in fp32 / bf16 / fp16 (± channels_last), suite times, and robust accuracy agreement.

    python bench/gpu.py --device cuda            # the real run: about 2-4 minutes on one recent GPU (estimate)
    python bench/gpu.py --device cpu --smoke     # proves the script works: narrow models, tiny budgets, < 1 min

Workload (CIFAR-shaped, available offline): gradguard's embedded 8×8 digits upsampled ×4 to 32×32 and repeated to
3 channels; a small CNN (``small-cnn``) and PreActResNet-18 (``preact-resnet18``), each briefly trained with fast
FGSM adversarial training (eps = 8/255) so that a fraction of the test images is robust and the suites do real work.
On all 449 test images (``--images``), at L∞ eps = 8/255:

1. PGD-20 (one restart, early stop) in fp32, bf16 and fp16 autocast, each also with channels_last (model and
   inputs): seconds, speed-up over fp32, robust accuracy.
   ``--smoke``: narrow models (width 8), no training (labels are the model's own predictions), 4 images, PGD-2,
   suites with 2 steps / 2 target classes / 10 queries, one CPU thread.
2. The ``fast`` and ``standard`` suites via ``gradguard.evaluate`` in fp32 and with ``amp`` given to every attack:
   seconds per stage and robust accuracy.
3. Agreement: every amp robust accuracy must lie within ``TOLERANCE`` (absolute) of fp32's on the same attack,
   since every reported success is re-checked in float32 and only the search path may differ.

Writes ``bench/out/gpu.json`` (atomically) and prints a markdown table. The device is named in both
(``torch.cuda.get_device_name``). Exit status 1 when an agreement check fails.

Status: the GPU numbers are UNMEASURED — no GPU was available when this script was written; only
``--device cpu --smoke`` has been run. Put the numbers into ``bench/RESULTS.md`` once it has run on a GPU.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from gradguard import Linf
from gradguard.attacks import PGD
from gradguard.attacks.base import prepare_model, resolve_device
from gradguard.data import load_dataset
from gradguard.evaluation import evaluate, get_suite
from gradguard.io import atomic_write_json
from gradguard.models import build_model

EPS = 8 / 255
TOLERANCE = 0.02  # |robust accuracy(amp) − robust accuracy(fp32)| allowed, absolute
PRECISIONS = (None, "bf16", "fp16")
MODELS = ("small-cnn", "preact-resnet18")
OUT = Path(__file__).resolve().parent / "out" / "gpu.json"


# ------------------------------------------------------------------------------------------------
# Data, models, timing
# ------------------------------------------------------------------------------------------------
def cifar_shaped_digits(device: torch.device) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): digits 8×8 → 32×32 (nearest), 3 channels, on ``device``."""
    data = load_dataset("digits")

    def shape(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, scale_factor=4, mode="nearest").repeat(1, 3, 1, 1).to(device)

    return shape(data.x_train), data.y_train.to(device), shape(data.x_test), data.y_test.to(device)


def train_fast_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> nn.Module:
    """Fast FGSM adversarial training (Wong, Rice & Kolter 2020): random start, one step of 1.25·eps, Adam 1e-3."""
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), device=y.device)
        for start in range(0, len(y), 128):
            xb, yb = x[order[start:start + 128]], y[order[start:start + 128]]
            delta = ((torch.rand_like(xb) * 2 - 1) * EPS).requires_grad_(True)
            loss = nn.functional.cross_entropy(model((xb + delta).clamp(0, 1)), yb)
            (grad,) = torch.autograd.grad(loss, delta)
            x_adv = (xb + (delta.detach() + 1.25 * EPS * grad.sign()).clamp(-EPS, EPS)).clamp(0, 1)
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x_adv), yb).backward()
            optimiser.step()
    return model.eval()


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of ``work()``, with the device synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()})"


def label(amp: str | None, channels_last: bool = False) -> str:
    return (amp or "fp32") + (" + channels_last" if channels_last else "")


# ------------------------------------------------------------------------------------------------
# The measurements
# ------------------------------------------------------------------------------------------------
def bench_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, steps: int,
              warm_up: bool = True) -> list[dict]:
    """PGD-``steps`` in every precision, in the default layout and in channels_last."""
    nhwc = prepare_model(copy.deepcopy(model), device, channels_last=True)
    rows = []
    for channels_last in (False, True):
        for amp in PRECISIONS:
            attack = PGD(nhwc if channels_last else model, Linf(eps=EPS), steps=steps, seed=0, amp=amp,
                         channels_last=channels_last)
            if warm_up:
                attack.run(x[:8], y[:8])  # kernels, autotuning, autocast caches
            seconds, result = timed(device, partial(attack.run, x, y))
            rows.append({"config": label(amp, channels_last), "amp": amp, "channels_last": channels_last,
                         "seconds": round(seconds, 3), "robust_accuracy": result.accuracy})
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_fp32"] = round(base / row["seconds"], 2) if row["seconds"] > 0 else None
    return rows


def suite_specs(name: str, amp: str | None, smoke: bool) -> list[dict]:
    specs = get_suite(name)
    for spec in specs:
        if smoke:  # tiny budgets: the point of --smoke is that every code path runs
            spec.update({"steps": 2} if "steps" in spec else {"queries": 10})
            if "n_target_classes" in spec:
                spec["n_target_classes"] = 2
        if amp is not None:
            spec["amp"] = amp
    return specs


def bench_suites(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, smoke: bool,
                 batch_size: int) -> list[dict]:
    rows = []
    for suite in ("fast", "standard"):
        for amp in PRECISIONS:
            def run_suite(suite: str = suite, amp: str | None = amp) -> Any:
                return evaluate(model, (x, y), Linf(eps=EPS), suite_specs(suite, amp, smoke), batch_size=batch_size,
                                seed=0)

            seconds, report = timed(device, run_suite)
            rows.append({"suite": suite, "amp": amp, "config": label(amp), "seconds": round(seconds, 3),
                         "clean_accuracy": report.clean_accuracy, "robust_accuracy": report.robust_accuracy,
                         "stage_seconds": dict(report.attack_time_s), "per_attack": dict(report.per_attack)})
    return rows


def agreement(pgd_rows: list[dict], suite_rows: list[dict]) -> list[dict]:
    """Every amp robust accuracy against fp32's on the same attack (and layout)."""
    checks = []
    groups = [[r for r in pgd_rows if r["channels_last"] == cl] for cl in (False, True)]
    groups += [[r for r in suite_rows if r["suite"] == s] for s in ("fast", "standard")]
    for group in groups:
        reference = group[0]
        for row in group[1:]:
            gap = abs(row["robust_accuracy"] - reference["robust_accuracy"])
            what = row.get("suite", "pgd")
            checks.append({"attack": what, "config": row["config"], "gap": round(gap, 4), "ok": gap <= TOLERANCE})
    return checks


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    lines = [f"## bench/gpu.py on {results['device_name']} (torch {results['torch']}, "
             f"{results['images']} images, L∞ eps = 8/255{', SMOKE budgets' if results['smoke'] else ''})", ""]
    for name, model in results["models"].items():
        lines += [f"### {name} — clean accuracy {model['clean_accuracy']:.3f}, trained in {model['train_seconds']} s",
                  "", f"| PGD-{results['pgd_steps']} | seconds | speed-up vs fp32 | robust accuracy |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['config']} | {r['seconds']:.3f} | {r['speedup_vs_fp32']} | {r['robust_accuracy']:.4f} |"
                  for r in model["pgd"]]
        lines += ["", "| suite | precision | seconds | robust accuracy |", "|---|---|---:|---:|"]
        lines += [f"| {r['suite']} | {r['config']} | {r['seconds']:.3f} | {r['robust_accuracy']:.4f} |"
                  for r in model["suites"]]
        failed = [c for c in model["agreement"] if not c["ok"]]
        lines += ["", f"Agreement with fp32 (tolerance {TOLERANCE}): "
                  + ("all within" if not failed else "FAILED: " + ", ".join(f"{c['attack']} {c['config']} "
                                                                             f"gap {c['gap']}" for c in failed)), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="cuda | cpu | auto (default)")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets and few images: checks the script runs")
    parser.add_argument("--images", type=int, default=None, help="test images (default 449, smoke 4)")
    parser.add_argument("--epochs", type=int, default=None, help="fast-FGSM training epochs (default 15, smoke 0)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny batches: one thread wastes least on a shared machine
    images = args.images or (4 if args.smoke else 449)
    epochs = args.epochs if args.epochs is not None else (0 if args.smoke else 15)
    pgd_steps = 2 if args.smoke else 20
    x_train, y_train, x_test, y_test = cifar_shaped_digits(device)
    x, y = x_test[:images], y_test[:images]

    results: dict = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
                     "smoke": args.smoke, "images": int(x.shape[0]), "pgd_steps": pgd_steps, "eps": EPS,
                     "tolerance": TOLERANCE, "models": {}}
    for name in args.models.split(","):
        kwargs: dict = {"input_shape": [3, 32, 32], "num_classes": 10}
        if args.smoke:  # narrow models: the smoke run checks the code paths, not the speed
            kwargs["width"] = 8
        model = build_model(name, **kwargs).to(device)
        train_seconds = 0.0
        if epochs:
            train_seconds, model = timed(device, partial(train_fast_fgsm, model, x_train, y_train, epochs))
        model.eval()
        with torch.no_grad():
            predictions = model(x).argmax(1)
        # An untrained smoke model gets its own predictions as labels, so that every attack has samples to work on.
        labels = predictions if epochs == 0 else y
        clean = float((predictions == labels).float().mean())
        pgd_rows = bench_pgd(model, x, labels, device, pgd_steps, warm_up=not args.smoke)
        suite_rows = bench_suites(model, x, labels, device, args.smoke, batch_size=256)
        results["models"][name] = {"clean_accuracy": clean, "train_seconds": round(train_seconds, 1),
                                   "pgd": pgd_rows, "suites": suite_rows,
                                   "agreement": agreement(pgd_rows, suite_rows)}
    atomic_write_json(args.out, results)
    print(markdown(results))
    print(f"\nwrote {args.out}")
    ok = all(c["ok"] for m in results["models"].values() for c in m["agreement"])
    return 0 if ok or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
