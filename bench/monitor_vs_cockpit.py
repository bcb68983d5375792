"""GradientMonitor's training-loop overhead against Cockpit's "economy" configuration (issue 15).

    python bench/monitor_vs_cockpit.py [--steps 96] [--repeats 5] [--inner cnn=6] [--model-steps resnet=48]
    python bench/monitor_vs_cockpit.py --table          # the markdown table of the last results JSON

Cockpit is a bench-only dependency (never in requirements.txt / pyproject):

    /work/main/.venv/bin/pip install --no-deps cockpit-for-pytorch backpack-for-pytorch
    /work/main/.venv/bin/pip install einops unfoldNd json-tricks pandas seaborn

(cockpit 1.0.2 imports ``pkg_resources`` only for its version string; setuptools >= 81 no longer ships it, so
this script puts a stub in ``sys.modules`` when it is missing.)

One workload per model: real Fashion-MNIST (batch 128), the same batches and the same optimiser (SGD with
default arguments, lr 0.01: the setting Cockpit documents and whose update its Alpha quantity computes through
BackPACK) for every variant. Variants, each on a fresh copy of the same initial weights:

- ``plain``: zero_grad, forward, cross-entropy, backward, step;
- ``monitor k``: the same loop with ``GradientMonitor(model, every=k, optimizer=opt)`` attached;
- ``cockpit k``: Cockpit's documented loop: ``backpack.extend`` on model and loss, per-sample losses, and
  ``with cockpit(global_step, info={...}): loss.backward(...)`` with ``configuration("economy",
  track_schedule=schedules.linear(k))``.

k = 1 (every step) and k = 16. A round runs the plain and monitor variants ``--inner`` times each (interleaved,
alternating order) and each Cockpit variant once, in the middle; a variant's time in a round is its mean run time
there, and the reported ratio is the median over rounds of (variant time / plain time) of the same round. Models
Cockpit/BackPACK cannot run are recorded as ``"unsupported: <error>"``; what BackPACK warns on a model it does
run (e.g. BatchNorm in training mode) is kept under ``cockpit_warnings``.
Targets: monitor <= 1.15x at k=1 and <= 1.02x at k=16.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmnist_cnn, load_fashion_mnist, run_header, write_json  # noqa: E402
from diag_models import build  # noqa: E402
from gradguard.diagnostics import GradientMonitor  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "monitor-overhead.json"
MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn": fmnist_cnn,
    "resnet": lambda: build("resnet", (1, 28, 28)),
    "transformer": lambda: build("transformer", (1, 28, 28)),
}
INTERVALS = (1, 16)
LR = 0.01


def import_cockpit() -> tuple[Any, str | None]:
    """(cockpit module namespace, None) or (None, why not)."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:  # cockpit/__init__ only asks it for its own version string
        stub = types.ModuleType("pkg_resources")

        class DistributionNotFound(Exception):
            pass

        def get_distribution(name: str) -> Any:
            raise DistributionNotFound(name)

        stub.DistributionNotFound, stub.get_distribution = DistributionNotFound, get_distribution  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = stub
    try:
        import backpack
        import cockpit
        from cockpit.utils import schedules
        from cockpit.utils.configuration import configuration
    except ImportError as error:
        return None, f"not installed: {error}"
    return types.SimpleNamespace(Cockpit=cockpit.Cockpit, configuration=configuration, schedules=schedules,
                                 extend=backpack.extend), None


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def run_plain(model: nn.Module, batches: Batches) -> float:
    optimiser = torch.optim.SGD(model.parameters(), lr=LR)
    start = time.perf_counter()
    for x, y in batches:
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return time.perf_counter() - start


def run_monitor(model: nn.Module, batches: Batches, every: int) -> float:
    optimiser = torch.optim.SGD(model.parameters(), lr=LR)
    monitor = GradientMonitor(model, every=every, optimizer=optimiser)
    start = time.perf_counter()
    with monitor:
        for x, y in batches:
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
    elapsed = time.perf_counter() - start
    assert monitor.records, "the monitor recorded nothing"
    return elapsed


def run_cockpit(cp: Any, model: nn.Module, batches: Batches, every: int) -> float:
    """Cockpit's documented training loop (README / docs "Getting started")."""
    model = cp.extend(model)
    loss_fn = cp.extend(nn.CrossEntropyLoss(reduction="mean"))
    individual_loss_fn = nn.CrossEntropyLoss(reduction="none")
    optimiser = torch.optim.SGD(model.parameters(), lr=LR)
    cockpit = cp.Cockpit(model.parameters(),
                         quantities=cp.configuration("economy", track_schedule=cp.schedules.linear(every)))
    start = time.perf_counter()
    for global_step, (x, y) in enumerate(batches):
        optimiser.zero_grad()
        outputs = model(x)
        loss = loss_fn(outputs, y)
        losses = individual_loss_fn(outputs, y)
        with cockpit(global_step, info={"batch_size": x.shape[0], "individual_losses": losses, "loss": loss,
                                        "optimizer": optimiser}):
            loss.backward(create_graph=cockpit.create_graph(global_step))
        optimiser.step()
    return time.perf_counter() - start


def measure(name: str, builder: Callable[[], nn.Module], batches: Batches, repeats: int, inner: int, cp: Any,
            cockpit_missing: str | None) -> dict:
    torch.manual_seed(0)
    initial = builder()
    variants: dict[str, Callable[[Batches], float]] = {"plain": lambda b: run_plain(copy.deepcopy(initial), b)}
    for k in INTERVALS:
        def monitored(b: Batches, k: int = k) -> float:
            return run_monitor(copy.deepcopy(initial), b, k)

        variants[f"monitor_{k}"] = monitored
    unsupported: dict[str, str] = {}
    notes: set[str] = set()
    for k in INTERVALS:
        key = f"cockpit_{k}"
        if cockpit_missing is not None:
            unsupported[key] = cockpit_missing
            continue
        try:  # one short trial run: does BackPACK/Cockpit handle this model at all? (and what does it warn?)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run_cockpit(cp, copy.deepcopy(initial), batches[:2], k)
            notes.update(str(w.message).splitlines()[0][:200] for w in caught)
        except Exception as error:  # noqa: BLE001 - any failure means "cannot run this model"
            unsupported[key] = f"unsupported: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
            continue
        def with_cockpit(b: Batches, k: int = k) -> float:
            return run_cockpit(cp, copy.deepcopy(initial), b, k)

        variants[key] = with_cockpit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in variants.values():  # warm-up (allocator, kernels, first-call costs) on a few batches
            fn(batches[:4])
    # One round: the cheap variants (plain, monitor) `inner` times each, interleaved and in alternating order, with
    # each Cockpit run placed in the middle; a variant's time in a round is its mean over its runs in that round.
    cheap = [key for key in variants if not key.startswith("cockpit")]
    costly = [key for key in variants if key.startswith("cockpit")]
    times: dict[str, list[float]] = {key: [] for key in variants}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Cockpit warns about unknown optimisers etc. every step
        for round_index in range(repeats):
            spent: dict[str, list[float]] = {key: [] for key in variants}
            for j in range(inner):
                if j == inner // 2:
                    for key in costly if round_index % 2 == 0 else reversed(costly):
                        spent[key].append(variants[key](batches))
                for key in cheap if (round_index + j) % 2 == 0 else reversed(cheap):
                    spent[key].append(variants[key](batches))
            for key in variants:
                times[key].append(statistics.fmean(spent[key]))
            print(f"[{name}] round {round_index + 1}/{repeats}: "
                  + ", ".join(f"{k}={times[k][-1]:.2f}s" for k in variants), file=sys.stderr, flush=True)
    result: dict[str, Any] = {"model": name, "steps": len(batches), "repeats": repeats, "inner": inner,
                              "params": sum(p.numel() for p in initial.parameters()),
                              "seconds_median": {k: statistics.median(v) for k, v in times.items()},
                              "seconds": times, "cockpit_warnings": sorted(notes)}
    ratios: dict[str, Any] = {}
    for key in ["monitor_1", "monitor_16", "cockpit_1", "cockpit_16"]:
        if key in unsupported:
            ratios[key] = unsupported[key]
        else:
            ratios[key] = statistics.median(t / p for t, p in zip(times[key], times["plain"], strict=True))
    result["ratio"] = ratios
    result["plain_ms_per_step"] = 1e3 * result["seconds_median"]["plain"] / len(batches)
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}), flush=True)
    return result


def batches_of(x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int) -> Batches:
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    return [(x[order[i * batch_size:(i + 1) * batch_size]], y[order[i * batch_size:(i + 1) * batch_size]])
            for i in range(steps)]


def table(data: dict) -> str:
    """Markdown: one row per model, the median per-round time ratio against the plain loop."""
    def cell(value: Any) -> str:
        return f"{value:.3f}×" if isinstance(value, float) else str(value).replace("|", "/")

    lines = [f"Rounds: {data['repeats']}, threads: {data['threads']}, batch {data['batch']}, SGD lr {data['lr']}; "
             "ratio = median over rounds of (variant time / plain time) in the same round (runs per round of plain "
             "and monitor: " + ", ".join(f"{r['model']} {r.get('inner', 1)}" for r in data["results"]) + ").", "",
             "| model | steps | plain ms/step | plain | monitor every 1 | monitor every 16 | cockpit every 1 "
             "| cockpit every 16 |", "|---|---|---|---|---|---|---|---|"]
    for result in data["results"]:
        r = result["ratio"]
        lines.append(f"| {result['model']} | {result['steps']} | {result['plain_ms_per_step']:.1f} | 1.000× | "
                     f"{cell(r['monitor_1'])} | {cell(r['monitor_16'])} | {cell(r['cockpit_1'])} | "
                     f"{cell(r['cockpit_16'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=96, help="optimiser steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--inner", default="1", help="runs of plain/monitor per round (Cockpit: one), as N or "
                        "MODEL=N,...: more runs of the cheap variants average out the machine's noise")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="cnn,resnet,transformer")
    parser.add_argument("--model-steps", default="", help="per-model step counts overriding --steps, e.g. resnet=48")
    parser.add_argument("--no-cockpit", action="store_true", help="time plain and monitor only")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return 0
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    torch.set_num_threads(args.threads)
    cp, missing = (None, "not run (--no-cockpit)") if args.no_cockpit else import_cockpit()
    x_train, y_train, _, _ = load_fashion_mnist()
    def per_model(option: str, text: str, default: int) -> dict[str, int]:
        values = {name: default for name in models}
        for item in filter(None, text.split(",")):
            name, _, count = item.partition("=")
            if name not in values or not count.isdigit() or int(count) < 1:
                parser.error(f"{option}: expected MODEL=N (N >= 1) for a model in --models, got {item!r}")
            values[name] = int(count)
        return values

    steps = per_model("--model-steps", args.model_steps, args.steps)
    inner = (per_model("--inner", "", int(args.inner)) if args.inner.isdigit()
             else per_model("--inner", args.inner, 1))
    data = run_header(threads=args.threads, steps=args.steps, repeats=args.repeats, batch=128, lr=LR,
                      optimizer="SGD (default arguments)", intervals=list(INTERVALS), results=[])
    for name in models:
        batches = batches_of(x_train, y_train, 128, steps[name])
        data["results"].append(measure(name, MODELS[name], batches, args.repeats, inner[name], cp, missing))
        write_json(args.out, data)
    print(table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
