"""Evaluation strength and cost on real Fashion-MNIST (L∞, eps = 0.1), CPU.

For one small CNN (fmnist-cnn of Wong & Kolter 2018) trained here with a given method — "standard", "fgsm-rs"
(fast FGSM with random start) or "pgd" (PGD-AT) — on a training subset for a few epochs, measure on the first
``--n-eval`` test samples, in one process, one after the other:

  * gradguard's "standard" suite (APGD-CE 100 → APGD-T 100 × 9 targets → Square 5000, on survivors);
  * PGD-100 with 5 restarts (gradguard PGD, Madry step 2.5·eps/100, random starts);
  * APGD-T-100 alone (9 target classes);
  * gradguard's "fast" suite (APGD-CE 100 → APGD-T 100 × 3 targets → Square 1000);
  * torchattacks' AutoAttack (standard version: APGD-CE, APGD-T, FAB-T, Square 5000), when importable
    (`pip install --no-deps torchattacks`, a benchmark-only tool, never a gradguard dependency), with its default
    10 steps for APGD / APGD-T / FAB, and (row "torchattacks-ref") at AutoAttack's reference 100 steps.

Robust accuracy is always re-computed here from the model's predictions on the returned points (and, for
torchattacks, after checking the points lie in the eps-ball and the box). Trained models are cached in
bench/out/evaluation/<method>/ so a second run only re-measures. Writes bench/out/evaluation/<method>.json;
``--table`` prints the markdown table of every JSON written so far.

    python bench/evaluation.py --method standard
    python bench/evaluation.py --method fgsm-rs
    python bench/evaluation.py --table
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_fashion_mnist  # noqa: E402
from gradguard import Linf, evaluate  # noqa: E402
from gradguard.models import build_model, load, save  # noqa: E402
from gradguard.train import Trainer  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "evaluation"
EPS = 0.1
TRAINING: dict[str, tuple[int, dict[str, Any]]] = {  # method -> (training samples, Trainer settings): short runs, this benchmark measures evaluation
    "standard": (20000, {"epochs": 3}),
    "fgsm-rs": (6000, {"epochs": 3, "eps_warmup_epochs": 1}),
    "pgd": (6000, {"epochs": 3, "eps_warmup_epochs": 1, "method_kwargs": {"steps": 3}}),
}


def trained_model(method: str, train_samples: int | None, x_train: torch.Tensor, y_train: torch.Tensor):
    run_dir = OUT / method
    if (run_dir / "model.safetensors").exists():
        return load(run_dir).eval(), "cached"
    torch.manual_seed(0)
    model = build_model("fmnist-cnn")
    default_samples, settings = TRAINING[method]
    train_samples = train_samples or default_samples
    started = time.perf_counter()
    Trainer(model, method, threat=Linf(EPS) if method != "standard" else None, optimizer="adam", lr=1e-3,
            batch_size=128, progress=False, val_attack=None, seed=0, **settings).fit(
        (x_train[:train_samples], y_train[:train_samples]))
    save(model.eval(), run_dir / "model.safetensors", method=method, dataset="fashion-mnist")
    return model, f"trained in {time.perf_counter() - started:.0f} s"


def run_gradguard(model, x, y, suite) -> dict:
    started = time.perf_counter()
    report = evaluate(model, (x, y), Linf(EPS), suite, batch_size=500, seed=0)
    return {"robust_accuracy": report.robust_accuracy, "clean_accuracy": report.clean_accuracy,
            "per_attack": report.per_attack, "time_s": round(time.perf_counter() - started, 1),
            "attack_time_s": report.to_dict()["attack_time_s"]}


def run_torchattacks(model, x, y, steps: int | None = None) -> dict:
    """torchattacks' AutoAttack (standard version), its attacks run as its MultiAttack runs them: each on the
    samples every earlier one failed on. ``steps`` overrides the APGD / APGD-T / FAB step count (torchattacks'
    default is 10; AutoAttack's reference budget is 100). Timed per component."""
    import torchattacks

    attack = torchattacks.AutoAttack(model, norm="Linf", eps=EPS, version="standard", n_classes=10, seed=0)
    components = attack._autoattack.attacks
    if steps is not None:
        for component in components[:3]:
            component.steps = steps
    x_adv, times = x.clone(), {}
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    started = time.perf_counter()
    for component in components:
        began = time.perf_counter()
        for i in range(0, len(y), 500):
            index = i + robust[i:i + 500].nonzero().squeeze(1)
            if index.numel():
                found = component(x[index], y[index])
                with torch.no_grad():
                    broken = model(found).argmax(1) != y[index]
                x_adv[index[broken]], robust[index[broken]] = found[broken], False
        times[type(component).__name__] = round(time.perf_counter() - began, 2)
    elapsed = time.perf_counter() - started
    inside = bool(Linf(EPS).contains(x_adv, x, tol=1e-5).all())
    with torch.no_grad():
        accuracy = float((model(x_adv).argmax(1) == y).float().mean())
    return {"robust_accuracy": accuracy, "time_s": round(elapsed, 1), "attack_time_s": times,
            "points_inside_ball": inside, "version": torchattacks.__version__,
            "steps": steps or components[0].steps}


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    model, provenance = trained_model(args.method, args.train_samples, x_train, y_train)
    x, y = x_test[:args.n_eval], y_test[:args.n_eval]
    result_path = OUT / f"{args.method}.json"
    previous = json.loads(result_path.read_text()) if result_path.exists() else {}
    rows = dict(previous.get("rows", {})) if previous.get("n_eval") == len(y) else {}  # never mix sample counts

    def save(rows: dict) -> None:
        clean = next((r["clean_accuracy"] for r in rows.values() if "clean_accuracy" in r), None)
        result = {"method": args.method, "model": provenance, "n_eval": len(y), "eps": EPS, "clean_accuracy": clean,
                  "rows": rows, "threads": args.threads, "torch": torch.__version__,
                  "python": platform.python_version()}
        OUT.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=1))
    evaluations = {"standard": ("gradguard standard suite", "standard"),
                   "fast": ("gradguard fast suite", "fast"),
                   "pgd": ("PGD-100 x 5 restarts", [{"name": "pgd", "steps": 100, "restarts": 5}]),
                   "apgd-t": ("APGD-T-100 (9 targets)", [{"name": "apgd-t", "steps": 100}])}
    for key in args.rows:
        if key not in evaluations:
            continue
        label, suite = evaluations[key]
        rows[label] = run_gradguard(model, x, y, suite)
        rows[label]["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        print(f"{label:<32} {100 * rows[label]['robust_accuracy']:6.2f} %  {rows[label]['time_s']:7.1f} s", flush=True)
        save(rows)  # after every row: a run cut short by a time limit keeps what it measured
    torchattacks_rows = {"torchattacks": ("torchattacks AutoAttack", None),
                         "torchattacks-ref": ("torchattacks AutoAttack, reference budgets (steps=100)", 100)}
    for key, (label, steps) in torchattacks_rows.items():
        if key not in args.rows:
            continue
        try:
            rows[label] = run_torchattacks(model, x, y, steps)
        except ImportError:
            print("torchattacks not installed: skipped (pip install --no-deps torchattacks)")
            break
        rows[label]["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        print(f"{label:<32} {100 * rows[label]['robust_accuracy']:6.2f} %  {rows[label]['time_s']:7.1f} s", flush=True)
        save(rows)
    return json.loads(result_path.read_text())


def table() -> str:
    lines = ["| model (samples) | clean | evaluation | robust acc. | wall time | time / torchattacks AA "
             "| time / torchattacks AA at steps=100 |", "|---|---|---|---|---|---|---|"]
    for path in sorted(OUT.glob("*.json")):
        result = json.loads(path.read_text())
        references = [result["rows"].get(label, {}).get("time_s") for label in (
            "torchattacks AutoAttack", "torchattacks AutoAttack, reference budgets (steps=100)")]
        for label, row in result["rows"].items():
            ratios = [f"{row['time_s'] / r:.2f}x" if r else "n/a" for r in references]
            clean = f"{100 * result['clean_accuracy']:.1f} %" if result["clean_accuracy"] is not None else "?"
            lines.append(f"| {result['method']} ({result['n_eval']}) | {clean} | {label} | "
                         f"{100 * row['robust_accuracy']:.1f} % | {row['time_s']:.0f} s | {' | '.join(ratios)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=sorted(TRAINING), default="standard")
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument("--train-samples", type=int, default=None, help="default: per method, see TRAINING")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", default=["standard", "fast", "torchattacks", "pgd", "apgd-t"],
                        help="which evaluations to run (results merge into the method's JSON): "
                             "standard fast torchattacks torchattacks-ref pgd apgd-t")
    parser.add_argument("--train-only", action="store_true", help="train (and cache) the model, measure nothing")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the results so far")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    if args.train_only:
        torch.set_num_threads(args.threads)
        x_train, y_train, _, _ = load_fashion_mnist()
        print(trained_model(args.method, args.train_samples, x_train, y_train)[1])
        return
    measure(args)


if __name__ == "__main__":
    main()
