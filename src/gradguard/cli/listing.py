"""``gradguard list [WHAT]``: the commands, attacks, training methods, zoo models, datasets and suites available.

(The module is not named ``list.py``: as an attribute of the package it would shadow the built-in ``list``.)
"""
from __future__ import annotations

import argparse
from typing import Any

from .common import COMMANDS, add_command

CATALOGUES = ["commands", "attacks", "methods", "models", "datasets", "suites", "diagnostics", "findings"]
# What `gradguard diagnose` (and --curvature) computes, by the name docs/diagnose.md uses.
DIAGNOSTICS = ["masking-checklist", "gradient-monitor", "hessian-eigenvalues", "hessian-trace", "hessian-density",
               "input-curvature", "sharpness"]


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(commands, "list", parents=[common],
                         help="list commands, attacks, methods, models, datasets, suites, diagnostics and findings",
                         description="List what this installation offers: its commands, attack names for `attack` "
                         "and `--suite`, training methods, zoo models, dataset sources, named suites, diagnostics and the "
                         "gradient monitor's finding kinds.",
                         examples=["gradguard list", "gradguard list attacks", "gradguard list models --json"])
    parser.add_argument("what", nargs="?", choices=CATALOGUES, help="one catalogue (default: all)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> tuple[dict, str]:
    from ..data import list_datasets
    from ..diagnostics.gradflow import KINDS
    from ..evaluation import SUITES
    from ..models import list_models
    from ..train import METHODS
    from ..workflow import available_attacks
    commands = list(COMMANDS)
    catalogue = {"commands": commands, "attacks": available_attacks(), "methods": sorted(METHODS), "models": list_models(),
                 "datasets": list_datasets(), "suites": sorted(SUITES), "diagnostics": DIAGNOSTICS,
                 "findings": list(KINDS)}
    chosen = {args.what: catalogue[args.what]} if args.what else catalogue
    return chosen, "\n".join(f"{kind}: {', '.join(names)}" for kind, names in chosen.items())
