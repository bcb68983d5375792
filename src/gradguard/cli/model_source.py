"""Where ``attack`` / ``evaluate`` / ``diagnose`` get their model: a RUN_DIR, or ``--model SPEC`` into ``--out``.

``--model`` takes anything ``gradguard.models.resolve`` does (a run directory, a ``.safetensors`` file,
``package.module:callable`` with ``--weights``, ``torchvision:NAME``, ``timm:NAME``); the command then builds a
new run directory at ``--out`` that records the resolved model, so later commands take that directory alone.
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError
from .common import key_values, positive_int

MODEL_FLAGS = ("weights", "model_kwargs", "mean", "std", "num_classes", "logits")


@dataclass
class OpenRun:
    """What a command works on: the folder to write into (a staging folder for a new run), the folder to name
    to the user, the model, the test data, the threat and the device."""

    dir: Path
    shown: Path
    model: Any
    dataset: Any
    threat: Any
    device: Any


def model_source_options(parser: argparse.ArgumentParser) -> None:
    """RUN_DIR (optional) and the "model source" group: --model SPEC --weights --model-kwargs --mean --std
    --num-classes --out --force."""
    parser.add_argument("run_dir", metavar="RUN_DIR", nargs="?",
                        help="a run directory with model.safetensors (or use --model SPEC with --out DIR)")
    group = parser.add_argument_group("model source (instead of RUN_DIR)")
    group.add_argument("--model", metavar="SPEC", help="package.module:callable, torchvision:NAME, timm:NAME, a "
                       ".safetensors file or a run directory; the new run goes to --out")
    group.add_argument("--weights", metavar="FILE", help="weights for SPEC: .safetensors, or a .pt/.pth/.bin state "
                       "dict (loaded with weights_only=True)")
    group.add_argument("--model-kwargs", action="append", metavar="KEY=VALUE",
                       help="keyword argument for the factory (repeatable; values parsed as JSON when they can be)")
    group.add_argument("--mean", metavar="M", help="input normalisation inside the model: one value or one per "
                       "channel, e.g. 0.49,0.48,0.45 (eps stays in pixel space)")
    group.add_argument("--std", metavar="S", help="input normalisation: one value or one per channel")
    group.add_argument("--num-classes", type=positive_int, help="passed to the factory as num_classes=N")
    logits_option(group)
    group.add_argument("--out", metavar="DIR", help="the new run directory for --model (must not exist unless --force)")
    group.add_argument("--force", action="store_true", help="replace --out if it exists")


def logits_option(group: Any) -> None:
    """--logits KEY|INDEX: where the logits are in a model output that is not a tensor."""
    group.add_argument("--logits", metavar="KEY|INDEX", help="for a model whose forward() returns a dict, a tuple or "
                       "an object: the key or index that holds the logits, e.g. out or 0 (an output with .logits "
                       "or a 'logits' key is used without it)")


@contextlib.contextmanager
def open_run(args: argparse.Namespace, command: str) -> Iterator[OpenRun]:
    """The run a command works on: RUN_DIR as it is, or a new run at --out built from --model (staged, so that
    it appears only complete; for a command with --resume an interrupted run is kept for it)."""
    from .. import workflow
    from ..models.outputs import parse_logits_key
    from ..runtime import distributed

    device = workflow.resolve_device(args.device)
    if args.model is None:
        _refuse_model_flags_without_model(args)
        if args.run_dir is None:
            raise ConfigError(f"run_dir: give a RUN_DIR, or --model SPEC with --out DIR (see `gradguard {command} "
                              "--help`)")
        run_dir = Path(args.run_dir)
        model = workflow.load_run_model(run_dir, device)
        workflow.check_writable(run_dir)
        dataset = workflow.run_dataset(run_dir, args.dataset, args.data_root, resize=args.resize,
                                       center_crop=args.center_crop, split=getattr(args, "split", None),
                                       classes=args.classes)
        model = workflow.check_first_pass(model, dataset, device).model
        yield OpenRun(run_dir, run_dir, model, dataset, workflow.run_threat(run_dir, args.norm, args.eps), device)
        workflow.say_notes()  # which samples, which classes: said once the work is done (an error stays one line)
        return
    if args.run_dir is not None:
        raise ConfigError(f"model: pass either RUN_DIR ({args.run_dir!r}) or --model SPEC, not both")
    if not args.out:
        raise ConfigError("out: --model makes a new run directory; add --out DIR")
    model = workflow.resolve_model(args.model, weights=args.weights, kwargs=_factory_kwargs(args), mean=args.mean,
                                   std=args.std, device=device, logits=parse_logits_key(args.logits))
    dataset_name = args.dataset or "digits"
    dataset = workflow.open_test_split(dataset_name, args.data_root, resize=args.resize, center_crop=args.center_crop,
                                       split=getattr(args, "split", None), classes=args.classes)
    first = workflow.check_first_pass(model, dataset, device)
    model = first.model
    threat = workflow.make_threat_from(args.norm, args.eps)
    out = Path(args.out)
    resume = bool(getattr(args, "resume", False))
    with workflow.staged_run_dir(out, replace=args.force, resumable=hasattr(args, "resume"), resume=resume) as staging:
        distributed.rank0_first(lambda: workflow.start_model_run(
            staging, model, dataset=dataset, dataset_name=dataset_name, data_root=args.data_root, threat=threat,
            seed=args.seed, command=command, label=out.name, resize=args.resize, center_crop=args.center_crop,
            model_output=first.output))
        yield OpenRun(staging, out, model, dataset, threat, device)
    workflow.say_notes()


def _factory_kwargs(args: argparse.Namespace) -> dict:
    kwargs = key_values(args.model_kwargs, "model-kwargs")
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    return kwargs


def _refuse_model_flags_without_model(args: argparse.Namespace) -> None:
    given = [f"--{flag.replace('_', '-')}" for flag in MODEL_FLAGS if getattr(args, flag, None)]
    if args.out:
        given.append("--out")
    if given:
        raise ConfigError(f"model: {', '.join(given)} only apply with --model SPEC; add --model or drop them")
