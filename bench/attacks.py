"""Attack overhead and peer comparison on real Fashion-MNIST.

1. gradguard PGD-20 / FGSM (early stop off) vs a hand-written minimal loop (forward, CE, autograd.grad w.r.t. the
   input, step, project): time (interleaved, medians) and peak memory (fresh subprocess per variant, peak RSS growth).
   Target: <= 1.05x the minimal loop's time and <= 1.1x its peak memory.
2. gradguard PGD-20 with early stop vs torchattacks' PGD (when installed: `pip install --no-deps torchattacks`) on a
   fast-FGSM adversarially trained model. Target: >= 1.5x faster at the same robust accuracy (+-1 point).

Run: `python bench/attacks.py` (after `make install`; add --quick for a smoke run). Writes bench/out/attacks.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import accuracy, fmnist_cnn, interleaved_medians, load_fashion_mnist, train_quick  # noqa: E402
from gradguard import Linf  # noqa: E402
from gradguard.attacks import FGSM, PGD  # noqa: E402

EPS, STEPS = 0.1, 20
ALPHA = 2.5 * EPS / STEPS


def minimal_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """The shortest correct L∞ PGD a user would write by hand."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


def minimal_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), x)
    return (x.detach() + eps * grad.sign()).clamp(0, 1)


def variants(model: nn.Module, with_torchattacks: bool) -> dict:
    threat = Linf(eps=EPS)
    table = {
        "minimal-pgd20": lambda x, y: minimal_pgd(model, x, y, EPS, ALPHA, STEPS),
        "gradguard-pgd20": lambda x, y: PGD(model, threat, steps=STEPS, step_size=ALPHA, early_stop=False)(x, y),
        "gradguard-pgd20-earlystop": lambda x, y: PGD(model, threat, steps=STEPS, step_size=ALPHA)(x, y),
        "minimal-fgsm": lambda x, y: minimal_fgsm(model, x, y, EPS),
        "gradguard-fgsm": lambda x, y: FGSM(model, threat, early_stop=False)(x, y),
    }
    if with_torchattacks:
        import torchattacks

        table["torchattacks-pgd20"] = lambda x, y: torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS,
                                                                    random_start=True)(x, y)
        table["torchattacks-fgsm"] = lambda x, y: torchattacks.FGSM(model, eps=EPS)(x, y)
    return table


def in_batches(fn, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_probe(weights: str, variant: str, batch_size: int) -> None:
    """Child process: peak RSS growth (bytes) of one attack call on one batch, printed as JSON."""
    torch.set_num_threads(2)
    model = fmnist_cnn()
    model.load_state_dict(load_file(weights))
    model.eval()
    torch.manual_seed(0)
    x = torch.rand(batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (batch_size,))
    fn = variants(model, with_torchattacks=variant.startswith("torchattacks"))[variant]
    fn(x[:2], y[:2])  # import-time and first-call allocations are not the attack's
    before = _rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # reset the kernel's peak-RSS mark (VmHWM) to now
    fn(x, y)
    print(json.dumps({"variant": variant, "peak_growth_bytes": max(0, _peak_rss_bytes() - before)}))


def peak_memory(model: nn.Module, names: list[str], batch_size: int, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "model.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
        results: dict[str, list[int]] = {name: [] for name in names}
        for _ in range(repeats):
            for name in names:
                out = subprocess.run([sys.executable, __file__, "--memory-probe", name, "--weights", weights,
                                      "--batch-size", str(batch_size)], capture_output=True, text=True, check=True)
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_bytes"])
    return {name: sorted(values)[len(values) // 2] / 2**20 for name, values in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(args.weights, args.memory_probe, args.batch_size)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.samples, args.repeats = 500, 3
    try:
        import torchattacks  # noqa: F401

        have_torchattacks = True
    except ImportError:
        have_torchattacks = False
        print("torchattacks not installed: `pip install --no-deps torchattacks` to compare against it")

    x_train, y_train, x_test, y_test = load_fashion_mnist()
    x, y = x_test[:args.samples], y_test[:args.samples]
    started = time.perf_counter()
    standard = train_quick(fmnist_cnn(), x_train, y_train, epochs=1 if args.quick else 2)
    robust = train_quick(fmnist_cnn(), x_train, y_train, epochs=1 if args.quick else 3, eps=EPS)
    print(f"trained models in {time.perf_counter() - started:.0f}s: standard clean {accuracy(standard, x, y):.3f}, "
          f"FGSM-RS clean {accuracy(robust, x, y):.3f}")

    report: dict = {"eps": EPS, "steps": STEPS, "alpha": ALPHA, "samples": args.samples, "batch_size": args.batch_size,
                    "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__}
    # 1. Overhead vs the minimal loop, early stop off, on the standard model.
    table = variants(standard, have_torchattacks)
    overhead_names = ["minimal-pgd20", "gradguard-pgd20", "minimal-fgsm", "gradguard-fgsm"]
    overhead_names += [n for n in ("torchattacks-pgd20", "torchattacks-fgsm") if n in table]
    torch.manual_seed(0)
    times = interleaved_medians({n: partial(in_batches, table[n], x, y, args.batch_size) for n in overhead_names},
                                args.repeats)
    memory = peak_memory(standard, ["minimal-pgd20", "gradguard-pgd20", "minimal-fgsm", "gradguard-fgsm"],
                         args.batch_size, 3)
    report["overhead"] = {"seconds": times, "peak_growth_mib": memory,
                          "pgd20_time_ratio": times["gradguard-pgd20"] / times["minimal-pgd20"],
                          "fgsm_time_ratio": times["gradguard-fgsm"] / times["minimal-fgsm"],
                          "pgd20_memory_ratio": memory["gradguard-pgd20"] / memory["minimal-pgd20"],
                          "fgsm_memory_ratio": memory["gradguard-fgsm"] / memory["minimal-fgsm"]}

    # 2. Early stop vs torchattacks on the adversarially trained model, same budget.
    table = variants(robust, have_torchattacks)
    names = ["gradguard-pgd20-earlystop", "gradguard-pgd20", "minimal-pgd20"]
    names += ["torchattacks-pgd20"] if have_torchattacks else []
    torch.manual_seed(1)
    times = interleaved_medians({n: partial(in_batches, table[n], x, y, args.batch_size) for n in names},
                                args.repeats)
    robust_accuracy = {}
    for name in names:
        torch.manual_seed(2)
        robust_accuracy[name] = accuracy(robust, in_batches(table[name], x, y, args.batch_size), y)
    baseline = "torchattacks-pgd20" if have_torchattacks else "minimal-pgd20"
    # The ceiling early stop can reach: the fixed-budget loop's per-sample gradients over the ones early stop
    # computed (the samples that stay robust need every step, whatever the implementation).
    torch.manual_seed(2)
    attack = PGD(robust, Linf(EPS), steps=STEPS, step_size=ALPHA)
    gradients = sum(attack.run(x[i:i + args.batch_size], y[i:i + args.batch_size]).n_grad
                    for i in range(0, len(y), args.batch_size))
    speedup = times[baseline] / times["gradguard-pgd20-earlystop"]
    ceiling = STEPS * len(y) / gradients
    report["early_stop"] = {"seconds": times, "robust_accuracy": robust_accuracy, "clean_accuracy": accuracy(robust, x, y),
                            "baseline": baseline, "speedup_vs_baseline": speedup,
                            "gradients_early_stop": gradients, "gradients_fixed_budget": STEPS * len(y),
                            "speedup_ceiling_from_gradients": ceiling, "share_of_ceiling": speedup / ceiling}
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / "attacks.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
