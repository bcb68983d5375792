"""Randomized smoothing on real Fashion-MNIST: certified accuracy and the cost of gradguard.certify.

Gaussian-trains the literature's small Fashion-MNIST CNN (``fmnist-cnn``) with ``Trainer(model, "gaussian")`` at
σ = 0.25, then certifies the first ``--samples`` test images with ``gradguard.certify`` (CERTIFY of Cohen,
Rosenfeld & Kolter 2019: n0 = 100, n = 100 000, alpha = 0.001) and reports certified accuracy at L2 radii
0.25 / 0.5 / 0.75 / 1.0. The same images then go through a minimal hand-written Monte-Carlo loop of the same
n0, n and noise batch (torch.randn, argmax, bincount, the Clopper–Pearson bound): gradguard's time per sample is
compared with it (target ≤ 1.1×), the two timed in alternation, image by image.

    python bench/certify.py                                # 500 test images at n = 100 000 (long on a CPU)
    python bench/certify.py --samples 5 --epochs 2         # a quick look
    python bench/certify.py --device cuda --samples 500    # on a GPU
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradguard  # noqa: E402
from common import fmnist_cnn, load_fashion_mnist  # noqa: E402
from gradguard.evaluation.certify import clopper_pearson_lower  # noqa: E402

RADII = (0.25, 0.5, 0.75, 1.0)


def train(sigma: float, epochs: int, train_samples: int | None, device: str, seed: int) -> tuple[nn.Module, float]:
    x_train, y_train, _, _ = load_fashion_mnist()
    if train_samples:
        x_train, y_train = x_train[:train_samples], y_train[:train_samples]
    model = fmnist_cnn()
    trainer = gradguard.Trainer(model, "gaussian", method_kwargs={"sigma": sigma}, epochs=epochs, batch_size=128,
                                optimizer="adam", lr=1e-3, val_attack=None, progress=False, seed=seed, device=device)
    started = time.perf_counter()
    trainer.fit((x_train, y_train))
    return model.eval(), time.perf_counter() - started


def hand_written(model: nn.Module, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float,
                 batch_size: int) -> tuple[int, float]:
    """The minimal loop a user would write: (class or -1, radius) for one image (no checks, no bookkeeping)."""
    def votes(count: int) -> torch.Tensor:
        tally = torch.zeros(10, dtype=torch.int64, device=x.device)
        for start in range(0, count, batch_size):
            size = min(batch_size, count - start)
            noisy = x.unsqueeze(0) + sigma * torch.randn((size, *x.shape), device=x.device)
            tally += torch.bincount(model(noisy).argmax(1), minlength=10)
        return tally

    with torch.no_grad():
        top = int(votes(n0).argmax())
        p_lower = clopper_pearson_lower(int(votes(n)[top]), n, alpha)
    if p_lower < 0.5:
        return -1, 0.0
    return top, sigma * statistics.NormalDist().inv_cdf(p_lower)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-samples", type=int, default=None, help="first N training images (default all)")
    parser.add_argument("--samples", type=int, default=500, help="test images to certify")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch-size", type=int, default=1000, help="noise draws per forward pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/certify.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, train_s = train(args.sigma, args.epochs, args.train_samples, args.device, args.seed)
    model.to(args.device)
    _, _, x_test, y_test = load_fashion_mnist()
    x, y = x_test[: args.samples].to(args.device), y_test[: args.samples]
    ours_s, theirs_s, agree = [], [], 0
    results = []
    for i in range(args.samples):  # alternate image by image: machine noise falls on both alike
        started = time.perf_counter()
        result = gradguard.certify(model, (x[i:i + 1], y[i:i + 1]), args.sigma, args.n0, args.n, args.alpha,
                                   batch_size=args.batch_size, seed=args.seed + i)
        _sync(args.device)
        ours_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        top, _ = hand_written(model, x[i], args.sigma, args.n0, args.n, args.alpha, args.batch_size)
        _sync(args.device)
        theirs_s.append(time.perf_counter() - started)
        agree += int(top == int(result.prediction[0]))
        results.append(result)
    prediction = torch.cat([r.prediction for r in results])
    radius = torch.cat([r.radius for r in results])
    correct = prediction == y
    certified = {f"{r:g}": round(float((correct & (radius >= r)).double().mean()), 4) for r in RADII}
    ours, theirs = statistics.median(ours_s), statistics.median(theirs_s)
    record = {
        "sigma": args.sigma, "epochs": args.epochs, "train_samples": args.train_samples, "train_s": round(train_s, 1),
        "samples": args.samples, "n0": args.n0, "n": args.n, "alpha": args.alpha, "batch_size": args.batch_size,
        "device": args.device, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "smoothed_accuracy": float(correct.double().mean()), "abstain_rate": float((prediction == -1).double().mean()),
        "certified_accuracy": certified, "median_s_per_sample": {"gradguard": round(ours, 4),
                                                                 "hand_written": round(theirs, 4)},
        "ratio": round(ours / theirs, 3) if theirs > 0 else math.nan, "same_prediction": agree,
        "command": " ".join(sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    cells = [f"{100 * value:.1f} %" for value in certified.values()]
    print(f"\n| radius | {' | '.join(certified)} |\n|---|{'---|' * len(RADII)}\n| certified accuracy | "
          f"{' | '.join(cells)} |")
    print(f"time per sample at n = {args.n}: gradguard {ours:.3f} s, hand-written {theirs:.3f} s "
          f"({ours / theirs:.3f}x)")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
