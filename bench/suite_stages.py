"""Stage by stage: gradguard's ``standard`` suite vs AutoAttack's reference code, and both against the floor.

For each benchmark model (the three Fashion-MNIST CNNs of bench/evaluation.py, the TRADES recipe's width-3 CNN of
bench/train_fmnist.py, the CIFAR-shaped PreActResNet-18 of bench/cifar_suite.py), on the same first ``--n-eval``
test images at L∞ eps = 0.1, one implementation after the other (the order alternates from model to model):

  * AutoAttack's reference (`pip install --no-deps ../shared/vendor/auto-attack`), version "standard"
    (APGD-CE → APGD-T → FAB-T → Square 5000), its components called as ``run_standard_evaluation`` calls them;
  * gradguard's ``standard`` suite through ``gradguard.evaluate``.

Per stage: wall time, robust accuracy after the stage (re-computed from the model's predictions on the returned
points), and **the floor**: every model call a stage makes is recorded (batch size; gradient or forward-only) by a
thin wrapper, and priced at the model's own cost for that call — one timed forward+backward (input gradient) or
forward pass at that batch size, measured here. ``time / floor`` is what the implementation adds on top of the
passes its budget needs; a stage cannot be faster than its floor without making fewer or cheaper passes.

    python bench/suite_stages.py                              # every model found; results/suite-stages.json
    python bench/suite_stages.py --models fmnist-pgd --n-eval 100
    python bench/suite_stages.py --table
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_suite import OUT as CIFAR_OUT  # noqa: E402
from cifar_suite import Stage, reference_stages, run_cascade, run_gradguard  # noqa: E402
from common import load_fashion_mnist, run_header, write_json  # noqa: E402
from gradguard import Linf  # noqa: E402
from gradguard.models import load  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "suite-stages.json"
EPS = 0.1
MODELS = ("fmnist-standard", "fmnist-fgsm-rs", "fmnist-pgd", "recipe", "cifar-w16")


class CallLog(nn.Module):
    """The model, unchanged, with a log of its calls: (batch size, gradient pass?) per call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], torch.is_grad_enabled() and x.requires_grad))
        return self.model(x)


class PassCost:
    """Seconds of one forward+backward (input gradient) or forward-only pass at a batch size, measured on demand
    (median of a few repeats) and cached per (batch, kind); batch sizes are rounded up to a power of two above 16
    so that a handful of measurements price every call."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model, x, y
        self.cache: dict[tuple[int, bool], float] = {}

    def __call__(self, batch: int, gradient: bool) -> float:
        size = batch if batch <= 16 else min(1 << (batch - 1).bit_length(), len(self.y))
        key = (size, gradient)
        if key not in self.cache:
            self.cache[key] = self._measure(size, gradient) / size
        return self.cache[key] * batch

    def _measure(self, size: int, gradient: bool) -> float:
        x, y = self.x[:size], self.y[:size]
        def one() -> None:
            if gradient:
                xg = x.clone().requires_grad_(True)
                loss = F.cross_entropy(self.model(xg), y, reduction="sum")
                torch.autograd.grad(loss, xg)
            else:
                with torch.no_grad():
                    self.model(x)
        one()
        times = []
        for _ in range(5):
            began = time.perf_counter()
            one()
            times.append(time.perf_counter() - began)
        return statistics.median(times)


def floor_seconds(calls: list[tuple[int, bool]], cost: PassCost) -> float:
    return sum(cost(batch, gradient) for batch, gradient in calls)


def load_models(names: list[str], recipe: Path | None) -> dict[str, tuple[nn.Module, str]]:
    found = {}
    for name in names:
        if name.startswith("fmnist-"):
            path = HERE / "out" / "evaluation" / name.removeprefix("fmnist-") / "model.safetensors"
            hint = f"python bench/evaluation.py --method {name.removeprefix('fmnist-')} --train-only"
        elif name == "recipe":
            runs = sorted((HERE / "out").glob("recipe/*/model.safetensors")) + sorted(
                (HERE / "out").glob("train_fmnist/recipe*/model.safetensors"))
            path = recipe / "model.safetensors" if recipe else (runs[-1] if runs else HERE / "out" / "recipe")
            hint = ("python bench/train_fmnist.py --method trades --method-option beta=2 --method-option steps=3 "
                    "--method-option step_size=0.05 --width 3 --suite none --out bench/out/recipe")
        else:
            path = CIFAR_OUT / "fashion-mnist-32x32x3-w16-n10000-e5" / "model.safetensors"
            hint = "python bench/cifar_suite.py --rows gradguard"
        if not path.exists():
            print(f"{name}: no model at {path}; skipped (make it with: {hint})", flush=True)
            continue
        found[name] = (load(path).eval(), str(path.relative_to(HERE.parent)))
    return found


def measure_model(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, reference_first: bool,
                  record: Callable[[dict], None], compile_row: bool = False) -> dict:
    logged = CallLog(model).eval()
    cost = PassCost(model, x, y)
    threat = Linf(EPS)
    result: dict = {"n_eval": len(y), "rows": {}}

    def run_reference() -> dict:
        stages: list[Stage] = []
        for label, attack in reference_stages(logged, EPS):
            def logged_attack(xb, yb, attack=attack, label=label):
                logged.calls.clear()
                out = attack(xb, yb)
                stage_calls[label] = list(logged.calls)
                return out
            stages.append((label, logged_attack))
        stage_calls: dict[str, list] = {}
        row = run_cascade(logged, threat, x, y, stages, lambda r: None, batch_size=len(y))
        for stage in row["stages"]:
            stage["floor_s"] = round(floor_seconds(stage_calls.get(stage["stage"], []), cost), 2)
        return row

    def run_ours(compile: bool = False) -> dict:
        from gradguard.evaluation.suites import AttackSpec

        stage_calls: dict[str, list] = {}
        original_build = AttackSpec.build

        def build(self, model, threat, seed, **overrides):  # the calls after a stage's attack is built are its own
            stage_calls[self.label] = logged.calls = []
            return original_build(self, model, threat, seed, **overrides)
        AttackSpec.build = build  # type: ignore[method-assign]
        try:
            row = run_gradguard(logged, threat, x, y, compile=compile)
        finally:
            AttackSpec.build = original_build  # type: ignore[method-assign]
        for stage in row["stages"]:
            stage["floor_s"] = round(floor_seconds(stage_calls.get(stage["stage"], []), cost), 2)
        return row

    order = [("reference", run_reference), ("gradguard", run_ours)]
    order = order if reference_first else order[::-1]
    if compile_row:
        order.append(("gradguard+compile", lambda: run_ours(compile=True)))
    for key, run in order:
        print(f"{time.strftime('%H:%M:%S')} {name}: {key} (load average {open('/proc/loadavg').read().split()[0]})",
              flush=True)
        result["rows"][key] = run()
        for stage in result["rows"][key]["stages"]:
            print(f"  {stage['stage']:<10} {100 * stage['accuracy']:6.2f} %  {stage['time_s']:7.1f} s  "
                  f"floor {stage['floor_s']:7.1f} s", flush=True)
        record(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--n-eval", type=int, default=300, help="test images per Fashion-MNIST model")
    parser.add_argument("--n-eval-cifar", type=int, default=100, help="test images for the PreActResNet-18")
    parser.add_argument("--recipe", type=Path, help="run directory of the recipe model (default: newest found)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile-row", action="store_true",
                        help="also run gradguard with compile=True (torch.compile; its compile time is in the stages)")
    parser.add_argument("--json", type=Path, default=RESULT)
    parser.add_argument("--table", action="store_true", help="print the markdown table of the --json results")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.json.read_text())))
        return
    torch.set_num_threads(args.threads)
    _, _, x_test, y_test = load_fashion_mnist()
    result = {**run_header(eps=EPS, threads=args.threads), "models": {}}

    def write() -> None:
        write_json(args.json, result)

    for k, name in enumerate(args.models):
        found = load_models([name], args.recipe)  # one at a time: a model trained meanwhile is picked up
        if not found:
            continue
        model, source = found[name]
        n = args.n_eval_cifar if name.startswith("cifar") else args.n_eval
        x, y = x_test[:n], y_test[:n]
        if name.startswith("cifar"):
            x = F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1).contiguous()

        def record(row: dict, name=name, source=source) -> None:
            result["models"][name] = {"source": source, **row}
            write()
        measure_model(name, model, x, y, reference_first=k % 2 == 0, record=record, compile_row=args.compile_row)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    write()
    print(table(result), flush=True)


def table(result: dict) -> str:
    lines = ["| model (N) | stage | reference s | gradguard s | ratio | reference acc. | gradguard acc. "
             "| floor s (ref / gg) | time / floor (ref / gg) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in result["models"].items():
        rows = entry["rows"]
        if "reference" not in rows or "gradguard" not in rows:
            continue
        ours = {s["stage"].lower(): s for s in rows["gradguard"]["stages"]}
        totals = [0.0, 0.0]
        for stage in rows["reference"]["stages"]:
            mine = ours.get(stage["stage"].lower())
            totals[0] += stage["time_s"]
            if mine is None:
                lines.append(f"| {name} ({entry['n_eval']}) | {stage['stage']} | {stage['time_s']:.1f} | not run | | "
                             f"{100 * stage['accuracy']:.2f} % | | {stage['floor_s']:.1f} / – | "
                             f"{stage['time_s'] / max(stage['floor_s'], 1e-9):.2f} / – |")
                continue
            totals[1] += mine["time_s"]
            lines.append(
                f"| {name} ({entry['n_eval']}) | {stage['stage']} | {stage['time_s']:.1f} | {mine['time_s']:.1f} | "
                f"{mine['time_s'] / max(stage['time_s'], 1e-9):.2f} | {100 * stage['accuracy']:.2f} % | "
                f"{100 * mine['accuracy']:.2f} % | {stage['floor_s']:.1f} / {mine['floor_s']:.1f} | "
                f"{stage['time_s'] / max(stage['floor_s'], 1e-9):.2f} / {mine['time_s'] / max(mine['floor_s'], 1e-9):.2f} |")
        lines.append(f"| **{name}** | **total** | **{totals[0]:.1f}** | **{totals[1]:.1f}** | "
                     f"**{totals[1] / max(totals[0], 1e-9):.2f}** | {100 * rows['reference']['robust_accuracy']:.2f} % | "
                     f"{100 * rows['gradguard']['robust_accuracy']:.2f} % | | |")
    compiled = {name: entry for name, entry in result["models"].items() if "gradguard+compile" in entry["rows"]}
    if compiled:
        lines += ["", "| model (N) | stage | reference s | gradguard s | gradguard compile=True s (compiling included) "
                  "| compile / reference | acc. reference / compile |", "|---|---|---|---|---|---|---|"]
        for name, entry in compiled.items():
            rows = entry["rows"]
            plain = {s["stage"].lower(): s for s in rows.get("gradguard", {}).get("stages", [])}
            fast = {s["stage"].lower(): s for s in rows["gradguard+compile"]["stages"]}
            for stage in rows.get("reference", {}).get("stages", []):
                key = stage["stage"].lower()
                if key not in fast:
                    continue
                lines.append(f"| {name} ({entry['n_eval']}) | {stage['stage']} | {stage['time_s']:.1f} | "
                             f"{plain.get(key, {}).get('time_s', float('nan')):.1f} | {fast[key]['time_s']:.1f} | "
                             f"{fast[key]['time_s'] / max(stage['time_s'], 1e-9):.2f} | "
                             f"{100 * stage['accuracy']:.2f} / {100 * fast[key]['accuracy']:.2f} % |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
