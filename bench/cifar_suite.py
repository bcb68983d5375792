"""CIFAR-shaped workload: gradguard's standard suite vs AutoAttack's reference code vs torchattacks, stage by stage.

One PreActResNet-18 (BatchNorm, 3×32×32, channel ``--width``) is trained adversarially with fast FGSM + random
start (``gradguard.train.Trainer``, method "fgsm-rs") and cached in bench/out/cifar/. Without ``--cifar-root`` the
images are Fashion-MNIST padded to 32×32 and repeated to 3 channels (eps = 0.1, the literature's Fashion-MNIST
radius); with ``--cifar-root`` (the folder of the official *binary* archives: data_batch_*.bin, test_batch.bin)
they are CIFAR-10 (eps = 8/255). On the same model and the first ``--n-eval`` test images, one after the other:

  * gradguard's "standard" suite (APGD-CE 100 → APGD-T 100 × 9 targets → Square 5000) via ``gradguard.evaluate``;
  * AutoAttack's reference implementation (Croce & Hein, `pip install --no-deps ../shared/vendor/auto-attack`),
    version "standard" (APGD-CE → APGD-T → FAB-T → Square 5000), its components run as its
    ``run_standard_evaluation`` runs them: each on the samples every earlier one failed on, timed per stage;
  * torchattacks' AutoAttack (`pip install --no-deps torchattacks`), default settings, the same way.

Every robust accuracy is re-computed here from the model's predictions on the returned points, after checking the
points lie in the eps-ball and the box. The JSON (bench/results/cifar.json) is rewritten after every stage, so a
run cut short keeps what it measured; ``--table`` prints the markdown table from it.

    nohup python bench/cifar_suite.py > bench/out/cifar.log 2>&1 &     # width 16, 10k images x 5 epochs, N=100
    nohup python bench/cifar_suite.py --width 4 --train-samples 4000 --epochs 4 --n-eval 50 > ... &  # results/cifar.md
    python bench/cifar_suite.py --table

The defaults suit a quiet 2-core CPU; bench/results/cifar.md says what was run on the shared one, and why.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_fashion_mnist, run_header, write_json  # noqa: E402
from gradguard import Linf, evaluate  # noqa: E402
from gradguard.models import build_model, load, save  # noqa: E402
from gradguard.threat import ThreatModel  # noqa: E402
from gradguard.train import Trainer  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "cifar"
RESULT = HERE / "results" / "cifar.json"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Stage = tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def fashion_mnist_as_cifar() -> Data:
    """Fashion-MNIST, zero-padded from 28×28 to 32×32 and repeated to 3 channels: CIFAR's shape, real images."""
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    def widen(x):
        return F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1).contiguous()
    return widen(x_train), y_train, widen(x_test), y_test


def read_cifar_binary(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Records of CIFAR-10's binary format: 1 label byte + 3072 pixel bytes (3×32×32, channel-major)."""
    raw = np.concatenate([np.fromfile(f, dtype=np.uint8) for f in files])
    if raw.size % 3073:
        raise SystemExit(f"--cifar-root: {files} is not whole 3073-byte CIFAR-10 records (truncated download?)")
    records = raw.reshape(-1, 3073)
    x = torch.from_numpy(records[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    return x, torch.from_numpy(records[:, 0].astype(np.int64))


def cifar10(root: Path) -> Data:
    train_files, test_file = sorted(root.glob("data_batch_*.bin")), root / "test_batch.bin"
    if not train_files or not test_file.exists():
        raise SystemExit(f"--cifar-root: no data_batch_*.bin / test_batch.bin in {root} (the *binary* archive)")
    return (*read_cifar_binary(train_files), *read_cifar_binary([test_file]))


def trained_model(args, dataset: str, eps: float, x_train: torch.Tensor, y_train: torch.Tensor
                  ) -> tuple[nn.Module, dict]:
    """The cached model, or a fresh fast-FGSM (random start) adversarial training run, saved for next time."""
    run_dir = OUT / f"{dataset}-w{args.width}-n{args.train_samples}-e{args.epochs}"
    if (run_dir / "model.safetensors").exists():
        info = json.loads((run_dir / "training.json").read_text())
        return load(run_dir / "model.safetensors").eval(), {**info, "provenance": "cached"}
    torch.manual_seed(0)
    normalise = {"mean": CIFAR_MEAN, "std": CIFAR_STD} if dataset == "cifar10" else {}
    model = build_model("preact-resnet18", width=args.width, **normalise)
    settings = {"method": "fgsm-rs", "epochs": args.epochs, "batch_size": 128, "optimizer": "sgd", "lr": 0.2,
                "schedule": "cyclic", "l2": 2.5e-4, "eps_warmup_epochs": 1, "train_samples": args.train_samples}
    started = time.perf_counter()
    history = Trainer(model, "fgsm-rs", threat=Linf(eps), epochs=args.epochs, batch_size=128, optimizer="sgd",
                      lr=0.2, schedule="cyclic", l2=2.5e-4, eps_warmup_epochs=1, val_attack="pgd",
                      val_max_samples=500, progress=False, seed=0,
                      on_epoch_end=lambda m: print(json.dumps(m), flush=True)).fit(
        (x_train[:args.train_samples], y_train[:args.train_samples]), (x_train[-2000:], y_train[-2000:]))
    info = {**settings, "train_time_s": round(time.perf_counter() - started, 1),
            "last_epoch": {k: v for k, v in history[-1].items() if isinstance(v, (int, float, str))}}
    save(model.eval(), run_dir / "model.safetensors", method="fgsm-rs", dataset=dataset)
    (run_dir / "training.json").write_text(json.dumps(info, indent=1))
    return model, {**info, "provenance": "trained in this run"}


def predictions(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def checked_robust(model: nn.Module, threat: ThreatModel, x: torch.Tensor, y: torch.Tensor,
                   x_adv: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Per-sample robustness re-computed from the model's predictions at ``x_adv``; points outside the eps-ball
    or the box count as not found (the sample stays robust), and the bool says whether all were inside."""
    inside = threat.contains(x_adv, x, tol=1e-5)
    return (predictions(model, x_adv) == y) | ~inside, bool(inside.all())


def run_cascade(model: nn.Module, threat: ThreatModel, x: torch.Tensor, y: torch.Tensor, stages: list[Stage],
                record: Callable[[dict], None], batch_size: int, points: dict | None = None) -> dict:
    """Run ``stages`` one after the other, each on the samples every earlier one failed on (AutoAttack's cascade);
    after each stage, re-check the points, record accuracy and seconds (and per sample: the stage that broke it, and
    whether it is robust at the end). ``points``: a dict that receives the final points as ``x_adv``."""
    robust = predictions(model, x) == y
    x_adv = x.clone()
    broken_by = torch.where(robust, -1, -2)  # per sample: the stage that broke it; -1 robust, -2 wrong when clean
    row: dict = {"clean_accuracy": float(robust.float().mean()), "stages": [], "points_inside": True}
    for number, (name, attack) in enumerate(stages):
        began = time.perf_counter()
        for i in range(0, len(y), batch_size):
            index = i + robust[i:i + batch_size].nonzero().squeeze(1)
            if index.numel():
                found = attack(x[index], y[index]).detach()
                broken = predictions(model, found) != y[index]
                x_adv[index[broken]], robust[index[broken]] = found[broken], False
                broken_by[index[broken]] = number
        seconds = time.perf_counter() - began
        still, inside = checked_robust(model, threat, x, y, x_adv)
        row["points_inside"] &= inside
        row["stages"].append({"stage": name, "accuracy": float((still & robust).float().mean()),
                              "time_s": round(seconds, 1)})
        print(f"  {name:<12} {100 * row['stages'][-1]['accuracy']:6.2f} %  {seconds:7.1f} s", flush=True)
        record(row)
    row["robust_accuracy"] = row["stages"][-1]["accuracy"]
    row["time_s"] = round(sum(s["time_s"] for s in row["stages"]), 1)
    row["broken_by"] = broken_by.tolist()
    row["robust"] = (still & robust).int().tolist() if stages else robust.int().tolist()
    if points is not None:
        points["x_adv"] = x_adv
    return row


def run_gradguard(model: nn.Module, threat: ThreatModel, x: torch.Tensor, y: torch.Tensor, suite="standard",
                  compile: bool = False) -> dict:
    started = time.perf_counter()
    report = evaluate(model, (x, y), threat, suite, batch_size=len(y), seed=0, return_adversarial=True,
                      compile=compile)
    elapsed = time.perf_counter() - started
    assert report.x_adv is not None
    still, inside = checked_robust(model, threat, x, y, report.x_adv)
    stages, clean = [], predictions(model, x) == y
    for index, (label, accuracy) in enumerate(report.per_attack.items()):
        # re-computed: clean-correct samples not broken, per the model, by this stage or an earlier one
        broken = (report.broken_by >= 0) & (report.broken_by <= index) & ~still
        stages.append({"stage": label, "accuracy": float((clean & ~broken).float().mean()),
                       "reported_accuracy": accuracy, "time_s": round(report.attack_time_s.get(label, 0.0), 1)})
    return {"clean_accuracy": float(clean.float().mean()), "stages": stages, "points_inside": inside,
            "robust_accuracy": float((clean & still).float().mean()), "reported_robust_accuracy":
            report.robust_accuracy, "time_s": round(elapsed, 1)}


def reference_stages(model: nn.Module, eps: float, norm: str = "linf") -> list[Stage]:
    """AutoAttack's reference components, configured by its own ``version="standard"``, called as its
    ``run_standard_evaluation`` calls them."""
    from autoattack import AutoAttack

    reference_norm = {"linf": "Linf", "l2": "L2", "l1": "L1"}[norm]
    aa = AutoAttack(model, norm=reference_norm, eps=eps, version="standard", seed=0, device="cpu", verbose=False)
    def apgd_ce(x, y):
        aa.apgd.loss, aa.apgd.seed = "ce", aa.get_seed()
        return aa.apgd.perturb(x, y)
    def apgd_t(x, y):
        aa.apgd_targeted.seed = aa.get_seed()
        return aa.apgd_targeted.perturb(x, y)
    def fab_t(x, y):
        aa.fab.targeted, aa.fab.n_restarts, aa.fab.seed = True, 1, aa.get_seed()
        return aa.fab.perturb(x, y)
    def square(x, y):
        aa.square.seed = aa.get_seed()
        return aa.square.perturb(x, y)
    return [("APGD-CE", apgd_ce), ("APGD-T", apgd_t), ("FAB-T", fab_t), ("Square", square)]


def torchattacks_stages(model: nn.Module, eps: float) -> tuple[list[Stage], dict]:
    """torchattacks' AutoAttack components (default settings), in its MultiAttack order, and their budgets."""
    import torchattacks

    attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
    components = attack._autoattack.attacks
    budgets = {type(c).__name__: {k: getattr(c, k) for k in ("steps", "n_restarts", "n_queries", "n_classes",
                                                             "n_target_classes") if hasattr(c, k)}
               for c in components}
    budgets["version"] = torchattacks.__version__
    return [(type(c).__name__, c) for c in components], budgets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar-root", type=Path, help="folder of CIFAR-10's binary archive (default: Fashion-MNIST)")
    parser.add_argument("--width", type=int, default=16, help="PreActResNet-18 base channels (64 = the paper's)")
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 on a shared machine (2 threads oversubscribed were 40x slower here)")
    parser.add_argument("--rows", nargs="+", default=["gradguard", "reference", "torchattacks"])
    parser.add_argument("--json", type=Path, default=RESULT, help="where the results go (default: %(default)s)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the --json results")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.json.read_text())))
        return
    torch.set_num_threads(args.threads)
    dataset = "cifar10" if args.cifar_root else "fashion-mnist-32x32x3"
    eps = 8 / 255 if args.cifar_root else 0.1
    x_train, y_train, x_test, y_test = cifar10(args.cifar_root) if args.cifar_root else fashion_mnist_as_cifar()
    print(f"{time.strftime('%H:%M:%S')} data {dataset}: train {tuple(x_train.shape)}, test {tuple(x_test.shape)}",
          flush=True)
    model, training = trained_model(args, dataset, eps, x_train, y_train)
    model.eval()
    training["clean_accuracy_test_10k"] = float((predictions(model, x_test) == y_test).float().mean())
    print(f"{time.strftime('%H:%M:%S')} model: {training}", flush=True)
    threat, x, y = Linf(eps), x_test[:args.n_eval], y_test[:args.n_eval]
    result = {**run_header(dataset=dataset, eps=eps, n_eval=len(y),
                           model={"name": "preact-resnet18", "width": args.width, **training}, threads=args.threads),
              "rows": {}}

    def write() -> None:
        write_json(args.json, result)

    def record(label: str, row: dict) -> None:
        result["rows"][label] = row
        write()

    for key in args.rows:
        print(f"{time.strftime('%H:%M:%S')} {key} (load average {open('/proc/loadavg').read().split()[0]})",
              flush=True)
        if key == "gradguard":
            row = run_gradguard(model, threat, x, y)
            for stage in row["stages"]:
                print(f"  {stage['stage']:<12} {100 * stage['accuracy']:6.2f} %  {stage['time_s']:7.1f} s", flush=True)
            record("gradguard standard suite", row)
        elif key == "reference":
            label = "AutoAttack reference (standard)"
            record(label, run_cascade(model, threat, x, y, reference_stages(model, eps),
                                      partial(record, label), batch_size=len(y)))
        elif key == "torchattacks":
            label = "torchattacks AutoAttack (defaults)"
            stages, budgets = torchattacks_stages(model, eps)
            row = run_cascade(model, threat, x, y, stages, partial(record, label),
                              batch_size=len(y))
            record(label, {**row, "budgets": budgets})
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    write()
    print(table(result), flush=True)


def table(result: dict) -> str:
    lines = ["| implementation | stage | robust acc. after stage | stage s | total s |", "|---|---|---|---|---|"]
    for label, row in result["rows"].items():
        for stage in row["stages"]:
            lines.append(f"| {label} | {stage['stage']} | {100 * stage['accuracy']:.1f} % | {stage['time_s']:.0f} | |")
        if "robust_accuracy" in row:
            lines.append(f"| **{label}** | **all** (clean {100 * row['clean_accuracy']:.1f} %) | "
                         f"**{100 * row['robust_accuracy']:.1f} %** | | **{row['time_s']:.0f}** |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
