"""``gradguard evaluate RUN_DIR``: clean, per-attack and worst-case robust accuracy with an attack suite."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..layout import ROBUSTNESS_FILE
from .common import (
    add_command,
    data_options,
    device_options,
    format_table,
    parse_eps_list,
    positive_int,
    suite_arg,
    threat_options,
)
from .model_source import model_source_options, open_run


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(
        commands, "evaluate", parents=[common], help="robust accuracy with an attack suite",
        description="Clean, per-attack and worst-case robust accuracy with an attack suite "
        "(gradguard.evaluation.evaluate); optionally an accuracy-vs-eps curve. Writes robustness.json (and "
        "curve.json) into RUN_DIR.",
        examples=["gradguard evaluate runs/pgd",
                  "gradguard evaluate runs/pgd --suite quick --curve 0,0.05,0.1,0.2 --samples 500",
                  "gradguard evaluate --model mymodels:Net --weights net.pth --mean 0.49,0.48,0.45 --std 0.25 "
                  "--dataset cifar10 --data-root ~/data/cifar-10-batches-bin --suite fast --eps 0.03 --out runs/mine",
                  "gradguard evaluate --model mymodels:Net --weights net.pth ... --out runs/mine --resume"
                  "   # after Ctrl-C",
                  "gradguard evaluate runs/pgd --suite quick --amp bf16 --channels-last --device cuda"])
    model_source_options(parser)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted evaluation from its journal "
                        "(in RUN_DIR, or for --out DIR in .DIR.partial); same model, data, suite and threat")
    parser.add_argument("--suite", default="standard", help="quick | fast | lite | standard | adaptive | rand | "
                        "classic | comma-separated attack names (default standard; rand for randomised models; "
                        "adaptive: a cheap core, the rest only where evidence of masking or a near miss calls for it)")
    parser.add_argument("--curve", help="comma-separated eps values for an accuracy-vs-eps curve, e.g. 0,0.05,0.1 "
                        "or 0,2/255,8/255 (each checked like --eps)")
    parser.add_argument("--curve-suite", default="quick", help="suite for the curve (default quick)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="samples per batch (default 256)")
    data_options(parser, dataset_default=None, samples_default=1000, split=True,
                 samples_help="use the first N samples (default 1000)")
    threat_options(parser, "perturbation budget (default: the run's training eps, else 0.1 for linf)")
    device_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> tuple[dict, str]:
    from .. import workflow
    from ..report.rundir import threat_label

    suite = suite_arg(args.suite)
    curve = parse_eps_list(args.curve) if args.curve else None
    try:
        with open_run(args, "evaluate") as run:
            result = workflow.evaluate_into(run.dir, run.model, run.dataset, run.threat, suite=suite,
                                            samples=args.samples, batch_size=args.batch_size, curve=curve,
                                            curve_suite=suite_arg(args.curve_suite), seed=args.seed,
                                            device=run.device, resume=args.resume,
                                            amp=args.amp, channels_last=args.channels_last,
                                            compile=args.compile)
    except KeyboardInterrupt as interrupted:
        run_dir = Path(args.run_dir) if args.run_dir else None
        if isinstance(interrupted, workflow.KeptPartialRun) or run_dir is None or not workflow.holds_journal(run_dir):
            raise
        raise workflow.KeptPartialRun(f"the finished batches are journaled in {str(run_dir)!r}; add --resume to "
                                      "the same command to continue") from None
    robustness = result["robustness"]
    rows = [["clean", robustness.get("clean_accuracy")]] + [
        [name, value] for name, value in (robustness.get("per_attack") or {}).items()]
    rows += [[f"{s.get('label')}: skipped, {s.get('reason')}", None] for s in robustness.get("skipped") or []]
    rows.append(["worst case", robustness.get("robust_accuracy")])
    text = format_table(["attack", "accuracy"], rows)
    if robustness.get("escalations"):
        text += "\n\n" + escalation_table(robustness)
    if result["curve"]:
        text += "\n\n" + format_table(["eps", "robust accuracy"], list(zip(
            result["curve"]["eps"], result["curve"]["robust_accuracy"], strict=True)))
    text += "".join(f"\n\nwarning: {w}" for w in robustness.get("warnings") or [])
    parts = robustness.get("elapsed_parts_s") or []
    if parts:
        text += (f"\n\nelapsed: {robustness.get('elapsed_s'):.1f} s in {len(parts)} parts (resumed; "
                 + " + ".join(f"{p:.1f}" for p in parts) + " s, each earlier part up to its last journaled batch)")
    header = f"{threat_label(run.threat.to_dict())}, {workflow.samples_label(run.dataset, robustness.get('n_samples'))}"
    return result, f"{header}\n{text}\n\nwrote {run.shown}/{ROBUSTNESS_FILE}"


def escalation_table(robustness: dict) -> str:
    """The "adaptive" suite's stages (seconds, passes), its evidence and every escalation, ran or not, and why."""
    times, budget = robustness.get("attack_time_s") or {}, robustness.get("attack_budget") or {}
    stages = [[label, times.get(label), (budget.get(label) or {}).get("gradients", 0),
               (budget.get(label) or {}).get("forwards", 0)] for label in list(times)]
    text = format_table(["stage", "seconds", "gradients", "forwards"], stages)
    evidence = [[name, f"{v['samples']}/{v['checked']}", "yes" if v["model_level"] else "no"]
                for name, v in (robustness.get("evidence") or {}).items()]
    text += "\n\n" + format_table(["evidence", "samples", "whole model"], evidence)
    escalations = [[e["stage"], "ran" if e["ran"] else "not run", e["samples"], e["broke"]]
                   for e in robustness["escalations"]]
    text += "\n\n" + format_table(["escalation", "status", "samples", "broke"], escalations)
    return text + "".join(f"\n  {e['stage']}: {e['reason']}" for e in robustness["escalations"])
