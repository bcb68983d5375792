"""``gradguard list [WHAT]``: the attacks, training methods, zoo models, datasets and suites available.

(The module is not named ``list.py``: as an attribute of the package it would shadow the built-in ``list``.)
"""
from __future__ import annotations

import argparse
from typing import Any

from .common import add_command

CATALOGUES = ["attacks", "methods", "models", "datasets", "suites"]


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(commands, "list", parents=[common], help="list attacks, methods, models and datasets",
                         description="List what this installation offers: attack names for `attack` and "
                         "`--suite`, training methods, zoo models, dataset sources and named suites.",
                         examples=["gradguard list", "gradguard list attacks", "gradguard list models --json"])
    parser.add_argument("what", nargs="?", choices=CATALOGUES, help="one catalogue (default: all)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> tuple[dict, str]:
    from ..data import list_datasets
    from ..evaluation import SUITES
    from ..models import list_models
    from ..train import METHODS
    from ..workflow import available_attacks

    catalogue = {"attacks": available_attacks(), "methods": sorted(METHODS), "models": list_models(),
                 "datasets": list_datasets(), "suites": sorted(SUITES)}
    chosen = {args.what: catalogue[args.what]} if args.what else catalogue
    return chosen, "\n".join(f"{kind}: {', '.join(names)}" for kind, names in chosen.items())
