"""``gradguard certify RUN_DIR --sigma 0.25``: certified L2 robustness of the smoothed model (randomized smoothing)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..layout import CERTIFY_FILE, CERTIFY_PLOT_FILE, CONFIG_FILE
from .common import add_command, data_options, positive_int
from .model_source import model_source_options, open_run


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(
        commands, "certify", parents=[common], help="certified L2 radii by randomized smoothing",
        description="Certify the Gaussian-smoothed version of a model (gradguard.certify; Cohen, Rosenfeld & Kolter "
        "2019): per test sample the smoothed prediction (or an abstention) and a certified L2 radius that holds with "
        "probability >= 1 - alpha. The guarantee is for the smoothed classifier, not the base model. Writes "
        "certify.json and certify.png into RUN_DIR; `gradguard report` shows them.",
        examples=["gradguard certify runs/noise --sigma 0.25 --samples 100",
                  "gradguard certify runs/noise --n 10000 --alpha 0.01 --batch-size 2000   # sigma of a "
                  "--method gaussian run",
                  "gradguard certify --model mymodels:Net --weights net.pth --dataset cifar10 "
                  "--data-root ~/data/cifar-10-batches-bin --sigma 0.5 --out runs/mine"])
    model_source_options(parser)
    group = parser.add_argument_group("randomized smoothing")
    group.add_argument("--sigma", type=_positive_float, help="Gaussian noise level (default: the sigma the run "
                       "was trained with by --method gaussian; else required)")
    group.add_argument("--n0", type=positive_int, default=100, help="noise draws that select the class (default 100)")
    group.add_argument("--n", type=positive_int, default=100_000, help="noise draws that estimate its probability "
                       "(default 100000)")
    group.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate "
                       "(default 0.001)")
    group.add_argument("--batch-size", type=positive_int, default=1000, help="noise draws per forward pass "
                       "(default 1000)")
    data_options(parser, dataset_default=None, samples_default=100, split=True,
                 samples_help="use the first N samples (default 100)")
    data = next(g for g in parser._action_groups if g.title == "data")
    data.add_argument("--max-samples", dest="samples", type=positive_int, default=argparse.SUPPRESS,
                      help="the same as --samples")
    parser.set_defaults(handler=run, norm=None, eps=None)


def run(args: argparse.Namespace) -> tuple[dict, str]:
    with open_run(args, "certify") as run:
        sigma = args.sigma if args.sigma is not None else trained_sigma(run.dir)
        result = certify_into(run.dir, run.model, run.dataset, sigma=sigma, n0=args.n0, n=args.n, alpha=args.alpha,
                              batch_size=args.batch_size, samples=args.samples, seed=args.seed, device=run.device)
    return result.to_dict(), f"{result.summary()}\n\nwrote {run.shown}/{CERTIFY_FILE} and {run.shown}/{CERTIFY_PLOT_FILE}"


def certify_into(run_dir: Path, model: Any, dataset: Any, *, sigma: float, n0: int, n: int, alpha: float,
                 batch_size: int, samples: int | None, seed: int, device: Any) -> Any:
    """gradguard.certify on the first ``samples`` test samples; certify.json and certify.png written atomically."""
    from ..evaluation.certify import certify, check_settings
    from ..io import atomic_write_json
    from ..workflow import device_record, test_samples

    check_settings(sigma, n0, n, alpha)  # before any work: a bad argument costs nothing
    result = certify(model, test_samples(dataset), sigma, n0, n, alpha, batch_size=batch_size, seed=seed,
                     max_samples=samples, progress=sys.stderr.isatty())
    result.plot(run_dir / CERTIFY_PLOT_FILE, label=run_dir.name or "model")
    atomic_write_json(run_dir / CERTIFY_FILE, {**result.to_dict(), **device_record(device)})
    return result


def trained_sigma(run_dir: Path) -> float:
    """The sigma of a run trained with the "gaussian" method (its config.json), else a ConfigError."""
    from ..errors import ConfigError
    from ..report.rundir import read_json

    method = (read_json(run_dir / CONFIG_FILE) or {}).get("method") or {}
    if isinstance(method, dict) and method.get("name") == "gaussian" and isinstance(method.get("sigma"), (int, float)):
        return float(method["sigma"])
    raise ConfigError("sigma: this run was not trained with --method gaussian; pass the noise level, e.g. --sigma 0.25")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value
