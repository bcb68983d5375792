"""``gradguard diagnose RUN_DIR``: the gradient-masking checklist, gradient findings and (optionally) curvature."""
from __future__ import annotations

import argparse
from typing import Any

from .common import add_command, data_options, device_options, format_table, threat_options
from .model_source import model_source_options, open_run


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(
        commands, "diagnose", parents=[common], help="gradient-masking checklist and gradient health",
        description="Run the gradient-masking checklist (masking.json), read gradient findings from "
        "gradflow.jsonl (recorded by `train --monitor`) and optionally the curvature; writes diagnosis.json "
        "into RUN_DIR.",
        examples=["gradguard diagnose runs/pgd", "gradguard diagnose runs/sig --curvature --json",
                  "gradguard diagnose --model mymodels:Net --weights net.pth --dataset npy:data/ --out runs/mine-diag"])
    model_source_options(parser)
    parser.add_argument("--curvature", action="store_true", help="also estimate the top Hessian eigenvalue")
    data_options(parser, dataset_default=None, samples_default=200, samples_help="test samples (default 200)")
    threat_options(parser, "perturbation budget (default: the run's training eps, else 0.1 for linf)")
    device_options(parser, amp=False)  # the checklist judges gradients: it always runs in float32
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> tuple[dict, str]:
    from .. import workflow

    with open_run(args, "diagnose") as run:
        result = workflow.diagnose_into(run.dir, run.model, run.dataset, run.threat, samples=args.samples,
                                        curvature=args.curvature, seed=args.seed, device=run.device,
                                        channels_last=args.channels_last)
    checks = result["masking"].get("checks", [])
    rows = [[c.get("name"), c.get("status"), (c.get("advice") or "")[:70]] for c in checks]
    text = format_table(["masking check", "status", "advice"], rows) + f"\nverdict: {result['masking'].get('verdict')}"
    findings = result["diagnosis"].get("gradient_findings")
    if findings is not None:
        text += "\n\n" + (format_table(["gradient finding", "layer"], [[f.get("kind"), f.get("layer")] for f in findings])
                          if findings else "gradient flow: no issue found")
    if "curvature" in result["diagnosis"]:
        text += f"\ntop Hessian eigenvalue: {result['diagnosis']['curvature']['top_hessian_eigenvalue']:.4g}"
    return result, f"{text}\n\nwrote {run.shown}/masking.json, {run.shown}/diagnosis.json"
