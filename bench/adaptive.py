"""Adaptive attacks against planted defences: does gradguard see through them?

One Fashion-MNIST CNN (bench/evaluation.py's PGD-trained model, L∞ eps = 0.1) is wrapped in three defences that
fooled published evaluations, and each is evaluated on the same first ``--n-eval`` test images:

  * **quantise** — ``round(x·255)/255`` in front of the model: the predictions are the model's (the inputs are
    8-bit already), the gradient is zero everywhere: a *pure gradient obstruction*. Adaptive attack:
    ``BPDA(quantise)`` (straight-through) and the same suite.
  * **saturate** — the logits multiplied by 1e4: the same argmax, a cross-entropy gradient that underflows to
    zero: a pure obstruction. Adaptive attack: the margin-based attacks of the suite (APGD-T's targeted DLR and
    Square's margin are scale-invariant) — the suite as it is, with APGD-CE swapped for APGD-DLR.
  * **noise** — Gaussian noise (σ = ``--noise``) added to the input at every call: a randomised model, *not* a
    pure obstruction (it changes the classifier). Adaptive attack: the ``"rand"`` suite (EOT 20, 11 votes).

Rows per defence: the undefended model under the suite, the defended model under the suite (what a naive
evaluation reports), the defended model under the adaptive attack. Targets (issue 13): the adaptive number is
within 2 points of the undefended one for the pure obstructions, and never above the naive suite's.
Robust accuracy is always the cascade's own re-scored number; for the noise defence it is judged by majority vote.

    python bench/adaptive.py                 # results/adaptive.json and a markdown table
    python bench/adaptive.py --suite fast --n-eval 100
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_fashion_mnist  # noqa: E402
from gradguard import Linf, evaluate  # noqa: E402
from gradguard.attacks import BPDA  # noqa: E402
from gradguard.evaluation import get_suite  # noqa: E402
from gradguard.models import load  # noqa: E402

HERE = Path(__file__).resolve().parent
EPS = 0.1


def quantise(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 255) / 255


class Quantised(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(quantise(x))


class Saturated(nn.Module):
    def __init__(self, model: nn.Module, scale: float = 1e4) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.scale


class Noisy(nn.Module):
    def __init__(self, model: nn.Module, sigma: float) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + self.sigma * torch.randn_like(x))


def run(model: nn.Module, x, y, suite, label: str) -> dict:
    began = time.perf_counter()
    report = evaluate(model, (x, y), Linf(EPS), suite, batch_size=len(y), seed=0)
    row: dict[str, Any] = {"robust_accuracy": report.robust_accuracy, "clean_accuracy": report.clean_accuracy,
           "per_attack": report.per_attack, "time_s": round(time.perf_counter() - began, 1),
           "warnings": report.warnings}
    print(f"  {label:<44} clean {100 * row['clean_accuracy']:6.2f} %  robust {100 * row['robust_accuracy']:6.2f} %"
          f"  ({row['time_s']:.0f} s)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--suite", default="lite", help="the suite of the naive and adaptive rows (default lite)")
    parser.add_argument("--noise", type=float, default=0.1, help="σ of the noise defence")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", type=Path, default=HERE / "out" / "evaluation" / "pgd" / "model.safetensors")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "adaptive.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _, _, x_test, y_test = load_fashion_mnist()
    x, y = x_test[:args.n_eval], y_test[:args.n_eval]
    base = load(args.model).eval()
    suite = get_suite(args.suite)
    margin_suite = [dict(s, name="apgd-dlr") if s["name"] == "apgd-ce" else s for s in suite]
    result: dict = {"command": "python " + " ".join(sys.argv), "eps": EPS, "n_eval": len(y), "suite": args.suite,
                    "noise_sigma": args.noise, "threads": args.threads, "rows": {}}

    def record(key: str, row: dict) -> None:
        result["rows"][key] = row
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))

    print(f"undefended model, suite {args.suite}", flush=True)
    record("undefended", run(base, x, y, suite, "undefended"))
    print("quantise (pure obstruction)", flush=True)
    record("quantise/naive", run(Quantised(base), x, y, suite, "naive: the suite"))
    record("quantise/adaptive", run(nn.Sequential(BPDA(quantise), base), x, y, suite, "adaptive: BPDA(quantise) + suite"))
    print("saturate (pure obstruction)", flush=True)
    record("saturate/naive", run(Saturated(base), x, y, suite, "naive: the suite"))
    record("saturate/adaptive", run(Saturated(base), x, y, margin_suite, "adaptive: margin losses (APGD-DLR first)"))
    print(f"noise σ = {args.noise} (randomised, not a pure obstruction)", flush=True)
    record("noise/naive", run(Noisy(base, args.noise), x, y, suite, "naive: the suite"))
    record("noise/adaptive", run(Noisy(base, args.noise), x, y, "rand", "adaptive: the 'rand' suite (EOT 20, 11 votes)"))
    print(table(result))


def table(result: dict) -> str:
    rows = result["rows"]
    lines = ["| defence | undefended | naive suite | adaptive | adaptive − undefended | adaptive ≤ naive |",
             "|---|---|---|---|---|---|"]
    for defence in ("quantise", "saturate", "noise"):
        naive, adaptive = rows.get(f"{defence}/naive"), rows.get(f"{defence}/adaptive")
        if not naive or not adaptive:
            continue
        undefended = rows["undefended"]["robust_accuracy"]
        lines.append(f"| {defence} | {100 * undefended:.1f} % | {100 * naive['robust_accuracy']:.1f} % | "
                     f"{100 * adaptive['robust_accuracy']:.1f} % | "
                     f"{100 * (adaptive['robust_accuracy'] - undefended):+.1f} | "
                     f"{'yes' if adaptive['robust_accuracy'] <= naive['robust_accuracy'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
