"""``gradguard demo``: the end-to-end tour (train, attack, evaluate, diagnose, report) into one suite run."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..layout import REPORT_HTML_FILE
from .common import add_command, data_options, headline_text, positive_int, suite_arg, threat_options


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(
        commands, "demo", parents=[common], help="the end-to-end tour: train, attack, evaluate, diagnose, report",
        description="Train a standard and a PGD-trained model, attack both with FGSM, BIM and PGD, run the "
        "evaluation suite and the masking checklist, compare gradient flow in a deep sigmoid vs ReLU MLP, and "
        "write OUT/report.html.",
        examples=["gradguard demo                      # digits, about two minutes on 2 CPU cores",
                  "gradguard demo --quick --out /tmp/d  # seconds: a smoke test",
                  "gradguard demo --dataset fashion-mnist --out runs/demo-fmnist"])
    parser.add_argument("--out", default="runs/demo", help="run directory to create (default runs/demo; an earlier "
                        "demo there is replaced)")
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds): for tests and smoke checks")
    parser.add_argument("--epochs", type=positive_int, help="override the training epochs of both models")
    parser.add_argument("--force", action="store_true", help="replace OUT even if it is not a demo run")
    parser.add_argument("--suite", help="evaluation suite: quick | fast | lite | standard | classic | attack names (default "
                        "standard; quick with --quick)")
    data_options(parser, dataset_default="digits", samples_default=None, samples_help="unused by demo")
    threat_options(parser, "perturbation budget (default 0.1 for linf)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> tuple[dict, str]:
    from .. import workflow

    device = workflow.resolve_device(args.device)
    settings = workflow.demo_settings(quick=args.quick, dataset=args.dataset, epochs=args.epochs,
                                      suite=suite_arg(args.suite) if args.suite is not None else None)
    dataset = workflow.load_data(args.dataset, args.data_root, resize=args.resize, center_crop=args.center_crop,
                                 classes=args.classes)
    threat = workflow.make_threat_from(args.norm, args.eps)
    out = Path(args.out)
    started = time.perf_counter()
    summary = workflow.demo_into(out, dataset, threat, settings, quick=args.quick, seed=args.seed, device=device,
                                 force=args.force)
    workflow.say_notes()
    report_path = out / REPORT_HTML_FILE
    seconds = time.perf_counter() - started
    text = headline_text(summary) + f"\n\ndemo finished in {seconds:.0f} s\nreport: {report_path}"
    return {"report": str(report_path), "seconds": round(seconds, 1), "summary": summary}, text
