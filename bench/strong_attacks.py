"""Strong attacks on a Fashion-MNIST CNN: strength at equal budget and the cost of APGD's bookkeeping.

    python bench/strong_attacks.py --samples 300 --epochs 2
    python bench/strong_attacks.py --timing-only --samples 200 --steps 50   # part 2 only, untrained CNN

1. Robust accuracy at eps = 0.1 (L∞) of PGD vs APGD-CE vs APGD-DLR vs APGD-T vs Square on a fast-FGSM-trained
   CNN (lower = stronger attack), each with the budget in the table.
2. Seconds per run of APGD vs PGD with the same number of gradient steps and ``early_stop=False`` (the same
   gradient count), interleaved, median of ``--repeats`` rounds: the overhead of APGD's step-size schedule.
3. Median L2 size of the minimal perturbations of DeepFool and CW on the same samples (eps unbounded).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import accuracy, fmnist_cnn, interleaved_medians, load_fashion_mnist, train_quick  # noqa: E402
from gradguard import L2, Linf  # noqa: E402
from gradguard.attacks import APGD, APGDT, CW, PGD, DeepFool, Square  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/out/strong_attacks.json")
    parser.add_argument("--timing-only", action="store_true", help="part 2 only, on an untrained CNN and random inputs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.timing_only:
        torch.manual_seed(0)
        model = fmnist_cnn().eval()
        x, y = torch.rand(args.samples, 1, 28, 28), torch.randint(0, 10, (args.samples,))
        timing = apgd_vs_pgd_timing(model, x, y, Linf(eps=0.1), args.steps, args.repeats)
        print(json.dumps({"command": " ".join(sys.argv), "timing_median_s": timing,
                          "apgd_over_pgd": timing["apgd"] / timing["pgd"]}, indent=2))
        return

    x_train, y_train, x_test, y_test = load_fashion_mnist()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = train_quick(fmnist_cnn(), x_train, y_train, epochs=args.epochs, eps=0.1)
    train_s = time.perf_counter() - start
    x, y = x_test[:args.samples], y_test[:args.samples]
    threat = Linf(eps=0.1)
    steps = args.steps
    attacks = {
        f"pgd-{steps}": PGD(model, threat, steps=steps, seed=0),
        f"apgd-ce-{steps}": APGD(model, threat, steps=steps, seed=0),
        f"apgd-dlr-{steps}": APGD(model, threat, loss="dlr", steps=steps, seed=0),
        f"apgd-t-{steps}x3": APGDT(model, threat, steps=steps, n_target_classes=3, seed=0),
        "square-1000": Square(model, threat, queries=1000, seed=0),
    }
    strength = {}
    for name, attack in attacks.items():
        t0 = time.perf_counter()
        result = attack.run(x, y)
        strength[name] = {"robust_accuracy": result.accuracy, "n_grad": result.n_grad, "n_forward": result.n_forward,
                          "seconds": round(time.perf_counter() - t0, 2)}
        print(name, strength[name], flush=True)

    timing = apgd_vs_pgd_timing(model, x, y, threat, steps, args.repeats)
    print("timing", timing, "apgd/pgd", timing["apgd"] / timing["pgd"], flush=True)

    n_min = min(100, args.samples)
    big = L2(eps=100.0, check_eps=False)  # no budget on purpose: the raw minimal perturbations
    minimal = {}
    for name, attack in {"deepfool": DeepFool(model, big), "cw": CW(model, big, steps=100, lr=0.05)}.items():
        t0 = time.perf_counter()
        result = attack.run(x[:n_min], y[:n_min])
        distance = big.distance(result.x_adv, x[:n_min])[result.success]
        minimal[name] = {"success_rate": float(result.success.float().mean()),
                         "median_l2": float(distance.median()) if distance.numel() else None,
                         "n_grad": result.n_grad, "seconds": round(time.perf_counter() - t0, 2)}
        print(name, minimal[name], flush=True)

    report = {"command": " ".join(sys.argv), "clean_accuracy": accuracy(model, x, y), "train_seconds": round(train_s, 1),
              "samples": args.samples, "threat": threat.to_dict(), "strength": strength,
              "timing_median_s": timing, "apgd_over_pgd": timing["apgd"] / timing["pgd"], "minimal_l2": minimal}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def apgd_vs_pgd_timing(model, x, y, threat, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds of PGD and APGD with the same steps and no early stop (the same gradient count), interleaved."""
    pgd_full = PGD(model, threat, steps=steps, seed=0, early_stop=False)
    apgd_full = APGD(model, threat, steps=steps, seed=0, early_stop=False)
    return interleaved_medians({"pgd": lambda: pgd_full(x, y), "apgd": lambda: apgd_full(x, y)}, repeats)


if __name__ == "__main__":
    main()
