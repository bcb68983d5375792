"""``gradguard attack RUN_DIR``: single attacks (FGSM, BIM, PGD, ...) on the run's model and test split."""
from __future__ import annotations

import argparse
from typing import Any

from ..layout import ATTACKS_FILE
from .common import (
    add_command,
    data_options,
    device_options,
    format_table,
    parse_names,
    positive_int,
    threat_options,
)
from .model_source import model_source_options, open_run


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(
        commands, "attack", parents=[common], help="attack a trained model (FGSM, BIM, PGD, ...)",
        description="Run single attacks on the run's test split, batch by batch; add their results to "
        "attacks.json (kept per threat) and write examples.npz (images for the report) into RUN_DIR.",
        examples=["gradguard attack runs/pgd",
                  "gradguard attack runs/pgd --attack pgd --steps 100 --eps 0.2 --samples 500 --json",
                  "gradguard attack runs/pgd --attack pgd --device cuda --amp bf16 --channels-last",
                  "gradguard attack --model torchvision:resnet18 --weights r18.pth --num-classes 10 "
                  "--dataset folder:photos --resize 32 --out runs/r18"])
    model_source_options(parser)
    parser.add_argument("--attack", default="fgsm,bim,pgd", help="comma-separated names, see `gradguard list attacks` "
                        "(default fgsm,bim,pgd)")
    parser.add_argument("--steps", type=positive_int, help="iterations for iterative attacks (default: each attack's)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="samples per batch (default 256)")
    data_options(parser, dataset_default=None, samples_default=None, split=True,
                 samples_help="test samples (default: as many as the run's evaluation used, so that the report "
                 "combines them; else 1000)")
    threat_options(parser, "perturbation budget (default: the run's training eps, else 0.1 for linf)")
    device_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> tuple[dict, str]:
    from .. import workflow
    from ..report.rundir import threat_label

    names = parse_names(args.attack, "attack")
    with open_run(args, "attack") as run:
        samples, chosen = args.samples, ""
        if samples is None:
            recorded = workflow.run_samples(run.dir)
            samples = recorded or workflow.ATTACK_SAMPLES
            chosen = " (as many as the run's earlier results; --samples N to change)" if recorded else ""
        payload = workflow.attack_into(run.dir, run.model, run.dataset, run.threat, names, samples=samples,
                                       batch_size=args.batch_size, steps=args.steps, seed=args.seed, device=run.device,
                                       amp=args.amp, channels_last=args.channels_last,
                                       compile=args.compile)
    rows = [["clean", payload["clean_accuracy"], None, None]] + [
        [name, r["robust_accuracy"], r["mean_distance"], r["elapsed_s"]] for name, r in payload["results"].items()
        if name in names]
    text = (f"{threat_label(payload['threat'])}, {workflow.samples_label(run.dataset, payload['n_samples'])}{chosen}\n"
            + format_table(["attack", "accuracy", "mean dist.", "time (s)"], rows))
    kept = payload.get("other_threats") or []
    if kept:
        text += "\n\nalso kept in attacks.json: " + "; ".join(
            f"{threat_label(g.get('threat'))} ({', '.join(g.get('results') or {})})" for g in kept)
    return payload, f"{text}\n\nwrote {run.shown}/{ATTACKS_FILE}"
