"""Second-order study (issue 14, item 3): every training method on Fashion-MNIST (L∞, eps = 0.1) at one equal,
short budget, then clean, PGD-20 and suite accuracy, the loss Hessian's top eigenvalue (and trace, where
``gradguard.diagnostics.curvature.hessian_trace`` exists), the mean input curvature, and the training time.

Every method trains the same model (fmnist-cnn, ``--width``) on the same first ``--train-samples`` training images
for ``--epochs`` epochs (Adam, one-cycle LR peaking at ``--lr``, eps warm-up over the first epoch, batch 128, seed 0).
Results go to ``--out`` (JSON, one entry per method, rewritten atomically after each method, so an interrupted
study keeps what it finished and a rerun of some methods updates only theirs).

    python bench/second_order.py                                  # all methods, quick suite on 1000 test images
    python bench/second_order.py --suite standard --eval-samples 10000
    python bench/second_order.py --methods standard,cure --epochs 1 --train-samples 2000 --eval-samples 200
    python bench/second_order.py --table                          # the JSON as a markdown table
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_fashion_mnist  # noqa: E402
from gradguard.attacks import PGD  # noqa: E402
from gradguard.diagnostics import curvature  # noqa: E402
from gradguard.io import atomic_write_json  # noqa: E402
from gradguard.models import build_model  # noqa: E402
from gradguard.threat import Linf  # noqa: E402
from gradguard.train import Trainer  # noqa: E402

# label -> (method name, options). The multi-step methods use 3 ascent steps of 0.05 (the training.md recipe).
METHODS: dict[str, tuple[str, dict]] = {
    "standard": ("standard", {}),
    "fgsm-rs": ("fgsm-rs", {}),
    "pgd": ("pgd", {"steps": 3, "step_size": 0.05}),
    "trades": ("trades", {"beta": 2.0, "steps": 3, "step_size": 0.05}),
    "input-grad-reg": ("input-grad-reg", {"lam": 1.0}),
    "cure": ("cure", {"gamma": 4.0}),
    "gradalign": ("gradalign", {"lam": 0.2}),
    "mart": ("mart", {"beta": 6.0, "steps": 3, "step_size": 0.05}),
    "pgd+awp": ("pgd", {"steps": 3, "step_size": 0.05, "awp_gamma": 5e-3}),
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "second-order.json"


def accuracy(model, x, y, batch: int = 1000) -> float:
    with torch.no_grad():
        return sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch)) / len(y)


def pgd_accuracy(model, x, y, threat, steps: int = 20, batch: int = 1000) -> float:
    attack = PGD(model, threat, steps=steps, seed=0)
    return sum(int(attack.run(x[i:i + batch], y[i:i + batch]).correct.sum()) for i in range(0, len(y), batch)) / len(y)


def suite_accuracy(model, x, y, threat, suite: str) -> dict:
    from gradguard.evaluation import evaluate

    started = time.perf_counter()
    report = evaluate(model, (x, y), threat, suite=suite, seed=0)
    return {"suite": suite, "robust_acc": report.robust_accuracy, "per_attack": report.per_attack,
            "elapsed_s": round(time.perf_counter() - started, 1)}


def curvature_numbers(model, x_train, y_train, x_eval, y_eval, samples: int) -> dict:
    """Top Hessian eigenvalue (and trace when available) on the first ``samples`` training images; mean input
    curvature on the evaluation images."""
    xh, yh = x_train[:samples], y_train[:samples]
    started = time.perf_counter()
    result = {"hessian_top_eigenvalue": curvature.top_hessian_eigenvalue(model, xh, yh, iters=50, tol=1e-3,
                                                                         batch_size=500, seed=0)}
    trace = getattr(curvature, "hessian_trace", None)
    if trace is not None:
        estimate = trace(model, xh, yh, batch_size=500, seed=0)
        result["hessian_trace"] = float(getattr(estimate, "value", estimate))
    values = curvature.input_curvature(model, x_eval, y_eval, batch_size=500)
    result["input_curvature_mean"] = float(values.mean())
    result["curvature_s"] = round(time.perf_counter() - started, 1)
    return result


def run_method(label: str, args, data) -> dict:
    x_train, y_train, x_test, y_test = data
    name, options = METHODS[label]
    threat = Linf(args.eps)
    torch.manual_seed(args.seed)
    model = build_model("fmnist-cnn", width=args.width)
    trainer = Trainer(model, name, threat=threat, epochs=args.epochs, batch_size=128, optimizer="adam", lr=args.lr,
                      schedule="cyclic", eps_warmup_epochs=min(1, args.epochs), method_kwargs=dict(options),
                      val_attack=None, progress=False, seed=args.seed)
    started = time.perf_counter()
    history = trainer.fit((x_train, y_train))
    train_s = time.perf_counter() - started
    model.eval()
    x_eval, y_eval = x_test[:args.eval_samples], y_test[:args.eval_samples]
    record = {"method": name, "options": options, "train_s": round(train_s, 1),
              "train_loss": history[-1]["train_loss"], "clean_acc": accuracy(model, x_eval, y_eval),
              "pgd20_acc": pgd_accuracy(model, x_eval, y_eval, threat)}
    if args.suite != "none":
        record["suite"] = suite_accuracy(model, x_eval, y_eval, threat, args.suite)
    record.update(curvature_numbers(model, x_train, y_train, x_eval, y_eval, args.hessian_samples))
    events = [event.get("action") for event in trainer.events]
    if events:
        record["events"] = events
    return record


def table(results: dict) -> str:
    settings = results.get("settings", {})
    rows = ["| method | train (s) | clean | PGD-20 | suite | λ_max(H) | tr(H) | input curvature |",
            "|---|---|---|---|---|---|---|---|"]
    for label, r in results.get("methods", {}).items():
        suite = r.get("suite", {})
        trace = r.get("hessian_trace")
        rows.append(f"| {label} | {r['train_s']:.0f} | {r['clean_acc']:.2%} | {r['pgd20_acc']:.2%} | "
                    + (f"{suite['robust_acc']:.2%} ({suite['suite']})" if suite else "–")
                    + f" | {r['hessian_top_eigenvalue']:.3g} | " + (f"{trace:.4g}" if trace is not None else "–")
                    + f" | {r['input_curvature_mean']:.3g} |")
    header = (f"Fashion-MNIST, L∞ eps {settings.get('eps')}, fmnist-cnn width {settings.get('width')}, "
              f"{settings.get('train_samples')} training images × {settings.get('epochs')} epochs, "
              f"evaluated on the first {settings.get('eval_samples')} test images; Hessian on "
              f"{settings.get('hessian_samples')} training images.")
    return header + "\n\n" + "\n".join(rows).replace("%", " %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--eval-samples", type=int, default=1000, help="test images for clean / PGD-20 / suite")
    parser.add_argument("--hessian-samples", type=int, default=1000, help="training images for the Hessian numbers")
    parser.add_argument("--suite", default="quick", help="evaluation suite ('quick', 'standard', or 'none')")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--width", type=int, default=1, help="fmnist-cnn width multiplier")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--table", action="store_true", help="print the results in --out as a markdown table")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    labels = [label.strip() for label in args.methods.split(",") if label.strip()]
    unknown = [label for label in labels if label not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    data = (x_train[:args.train_samples], y_train[:args.train_samples], x_test, y_test)
    settings = {key: getattr(args, key) for key in ("epochs", "train_samples", "eval_samples", "hessian_samples",
                                                     "suite", "eps", "width", "lr", "seed")}
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if results.get("settings") not in (None, settings):
        results = {}  # a different budget: start a fresh study instead of mixing numbers
    results.update(settings=settings, machine={"platform": platform.platform(), "torch": torch.__version__,
                                               "threads": torch.get_num_threads()},
                   command="python " + shlex.join(sys.argv))
    results.setdefault("methods", {})
    for label in labels:
        print(f"[second-order] {label} ...", flush=True)
        results["methods"][label] = run_method(label, args, data)
        atomic_write_json(args.out, results)
        print(json.dumps({label: results["methods"][label]}, default=str), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
