"""``gradguard diagnose RUN_DIR``: the gradient-masking checklist, gradient findings and (optionally) curvature."""
from __future__ import annotations

import argparse
from typing import Any

from ..layout import DIAGNOSIS_FILE, HESSIAN_DENSITY_PLOT, INPUT_CURVATURE_PLOT, MASKING_FILE, PLOTS_DIR
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
    parser.add_argument("--curvature", action="store_true",
                        help="also measure curvature: Hessian top-5 eigenvalues, trace, density and per-layer "
                        "table on 64 test images, input curvature of every sample (plots in RUN_DIR/plots)")
    data_options(parser, dataset_default=None, samples_default=200, split=True,
                 samples_help="use the first N samples (default 200)")
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
    curvature = result["diagnosis"].get("curvature")
    wrote = f"{run.shown}/{MASKING_FILE}, {run.shown}/{DIAGNOSIS_FILE}"
    if curvature is not None and args.curvature:
        text += "\n\n" + _curvature_text(curvature)
        wrote += f", {run.shown}/{PLOTS_DIR}/{HESSIAN_DENSITY_PLOT}, {run.shown}/{PLOTS_DIR}/{INPUT_CURVATURE_PLOT}"
    elif curvature is not None:  # diagnosis.json keeps an earlier run's curvature; this run did not touch it
        text += ("\n\ncurvature: not measured now; diagnosis.json keeps the curvature of an earlier "
                 "`diagnose --curvature` (add --curvature to measure it again)")
    return result, f"{text}\n\nwrote {wrote}"


def _curvature_text(curvature: dict) -> str:
    top, trace, inputs = curvature["top_eigenvalues"], curvature["trace"], curvature["input_curvature"]
    lines = [f"top Hessian eigenvalue: {curvature['top_hessian_eigenvalue']:.4g}",
             "top eigenvalues: " + ", ".join(f"{v:.4g}" for v in top["values"]),
             f"Hessian trace: {trace['value']:.4g} ± {trace['standard_error']:.2g} ({trace['products']} products)",
             f"input curvature: mean {inputs['mean']:.4g}, median {inputs['quantiles']['q50']:.4g}, "
             f"q95 {inputs['quantiles']['q95']:.4g} ({inputs['n_samples']} samples)"]
    rows = [[row["layer"], row["parameters"], f"{row['top_eigenvalue']:.4g}", f"{row['trace']:.4g}"]
            for row in curvature["per_layer"]]
    return "\n".join(lines) + "\n\n" + format_table(["layer", "parameters", "top eigenvalue", "trace"], rows)
