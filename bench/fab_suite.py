"""What FAB-T adds to the "standard" suite, in L∞, L2 and L1, beside the reference AutoAttack, on Fashion-MNIST.

For each trained Fashion-MNIST CNN (fmnist-cnn, cached by bench/evaluation.py under
bench/out/evaluation/<method>/model.safetensors) and each norm, on the first ``--n-eval`` test images, one after the
other in one process:

  * gradguard ``"standard"`` (APGD-CE → APGD-T → FAB-T → Square 5000), per stage: robust accuracy and seconds;
  * gradguard ``"lite"`` (the same without FAB-T);
  * the reference AutoAttack (``from autoattack import AutoAttack``, ``version="standard"``), its four components
    called as its ``run_standard_evaluation`` calls them, each on the samples every earlier one left.

Robust accuracy is always re-computed here from the model's predictions at the returned points (a point outside
the eps-ball or the box counts as not found). Radii: L∞ 0.1 and L2 1.0 (the issue's), L1 10 — Tramèr & Boneh's
(2019) L1 budget for 28×28 MNIST digits, the same image size; gradguard's Square has no L1 version, so in L1
gradguard's suites skip it while the reference runs its L1 Square.

    OMP_NUM_THREADS=1 python bench/fab_suite.py --methods pgd --n-eval 600
    python bench/fab_suite.py --table
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_suite import Stage, checked_robust, predictions, run_cascade  # noqa: E402
from cifar_suite import reference_stages as cifar_reference_stages  # noqa: E402
from common import load_fashion_mnist, run_header, write_json  # noqa: E402
from gradguard import evaluate  # noqa: E402
from gradguard.models import load  # noqa: E402
from gradguard.threat import ThreatModel, make_threat  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = HERE / "out" / "evaluation"
RESULT = HERE / "results" / "fab.json"
RADII = {"linf": 0.1, "l2": 1.0, "l1": 10.0}


def run_suite(model: nn.Module, threat: ThreatModel, x: torch.Tensor, y: torch.Tensor, suite: str) -> dict:
    """gradguard's named suite, per stage re-checked from the model's predictions."""
    started = time.perf_counter()
    report = evaluate(model, (x, y), threat, suite, batch_size=len(y), seed=0, return_adversarial=True)
    elapsed = time.perf_counter() - started
    assert report.x_adv is not None
    still, inside = checked_robust(model, threat, x, y, report.x_adv)
    clean = predictions(model, x) == y
    stages = []
    for index, (label, accuracy) in enumerate(report.per_attack.items()):
        broken = (report.broken_by >= 0) & (report.broken_by <= index) & ~still
        stages.append({"stage": label, "accuracy": float((clean & ~broken).float().mean()),
                       "reported_accuracy": accuracy, "time_s": round(report.attack_time_s.get(label, 0.0), 1)})
    return {"clean_accuracy": float(clean.float().mean()), "robust_accuracy": float((clean & still).float().mean()),
            "reported_robust_accuracy": report.robust_accuracy, "points_inside": inside, "stages": stages,
            "time_s": round(elapsed, 1)}


def reference_stages(model: nn.Module, norm: str, eps: float) -> list[Stage]:
    """AutoAttack's components for this norm (cifar_suite's, called as ``run_standard_evaluation`` calls them),
    labelled like gradguard's stages."""
    return [(label.lower(), attack) for label, attack in cifar_reference_stages(model, eps, norm)]


def fab_share(row: dict) -> float:
    """FAB-T's seconds over the row's total."""
    total = sum(stage["time_s"] for stage in row["stages"])
    fab = sum(stage["time_s"] for stage in row["stages"] if stage["stage"] == "fab-t")
    return fab / total if total else float("nan")


def table(result: dict) -> str:
    lines = [f"N = {result['n_eval']} test images, {result['threads']} thread(s), torch {result['torch']}.", "",
             "| model | norm, eps | row | clean | after each stage | robust | time (s) | FAB-T share |",
             "|---|---|---|---|---|---|---|---|"]
    for key, rows in result["runs"].items():
        method, norm = key.split("/")
        for label, row in rows.items():
            stages = " → ".join(f"{s['stage']} {100 * s['accuracy']:.2f}" for s in row["stages"])
            share = fab_share(row)
            lines.append(f"| {method} | {norm} {RADII[norm]:g} | {label} | {100 * row['clean_accuracy']:.2f} % | "
                         f"{stages} | **{100 * row['robust_accuracy']:.2f} %** | {sum(s['time_s'] for s in row['stages']):.1f} | "
                         f"{'–' if share != share or label.endswith('lite') else f'{100 * share:.0f} %'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["pgd"], help="cached models (bench/evaluation.py --method)")
    parser.add_argument("--norms", nargs="+", default=list(RADII), choices=list(RADII))
    parser.add_argument("--n-eval", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models-dir", type=Path, default=MODELS, help="where <method>/model.safetensors live")
    parser.add_argument("--rows", nargs="+", default=["standard", "lite", "reference"],
                        choices=["standard", "lite", "reference"])
    parser.add_argument("--json", type=Path, default=RESULT, help="where the results go (default: %(default)s)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the --json results")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.json.read_text())))
        return
    torch.set_num_threads(args.threads)
    _, _, x_test, y_test = load_fashion_mnist()
    x, y = x_test[:args.n_eval], y_test[:args.n_eval]
    result = {**run_header(n_eval=len(y), radii=RADII, threads=args.threads), "runs": {}}

    def write() -> None:
        write_json(args.json, result)

    for method in args.methods:
        path = args.models_dir / method / "model.safetensors"
        if not path.exists():
            raise SystemExit(f"--methods: no cached model at {path}; train it with "
                             f"`python bench/evaluation.py --method {method}` or pass --models-dir")
        model = load(path).eval()
        for norm in args.norms:
            threat = make_threat(norm, RADII[norm])
            rows: dict = result["runs"].setdefault(f"{method}/{norm}", {})
            for key in args.rows:
                print(f"{time.strftime('%H:%M:%S')} {method} {norm} {key}", flush=True)
                if key == "reference":
                    rows["reference AutoAttack"] = run_cascade(
                        model, threat, x, y, reference_stages(model, norm, RADII[norm]),
                        lambda row: None, batch_size=len(y))
                else:
                    rows[f"gradguard {key}"] = run_suite(model, threat, x, y, key)
                write()
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    write()
    print(table(result), flush=True)


if __name__ == "__main__":
    main()
