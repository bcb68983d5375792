"""The ``gradguard`` command line: demo | train | attack | evaluate | certify | diagnose | report | list.

Built on argparse (standard library, no dependency; see docs/cli.md). One module per command registers its
options and turns the parsed arguments into a call to ``gradguard.workflow``, which does the work; the command
then prints a short table (or JSON with ``--json``). Every command takes ``--seed``, ``--device``, ``--config FILE``
and ``--json``.

Errors: a ``GradguardError`` or a bad argument exits non-zero with one line on stderr and no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from .. import __version__
from ..errors import ConfigError, GradguardError
from . import attack, certify, demo, diagnose, evaluate, listing, report, train
from .common import EXIT_ERROR, EXIT_INTERRUPTED, OneLineParser, common_options

COMMAND_MODULES = (demo, train, attack, evaluate, certify, diagnose, report, listing)

__all__ = ["build_parser", "main", "parse_args"]


def build_parser() -> OneLineParser:
    """The top-level parser with one subparser per command."""
    parser = OneLineParser(prog="gradguard", description="Attack, harden and diagnose PyTorch models through their "
                           "gradients. Every command works on a run directory; see docs/cli.md.")
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_options()
    for module in COMMAND_MODULES:
        module.register(commands, common)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse twice when --config is given: the file's options become defaults, explicit flags still win.

    Top-level keys of the file apply to the commands that take them and are ignored by the others (a key no
    command takes is an error); keys in the command's own table must be options of that command."""
    from ..config import read_config_file, split_options

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.config:
        return args
    shared, own = split_options(args.command, read_config_file(args.config))
    subparsers = _subparsers(parser)
    known = {name: {action.dest for action in sub._actions} for name, sub in subparsers.items()}
    anywhere = set().union(*known.values())
    subparser = subparsers[args.command]
    unknown = sorted(set(own) - known[args.command]) + sorted(set(shared) - anywhere)
    if unknown:
        raise ConfigError(f"config: unknown option(s) {unknown} for `gradguard {args.command}`; see "
                          f"`gradguard {args.command} --help`")
    options = {key: value for key, value in shared.items() if key in known[args.command]}
    options.update(own)
    options.pop("config", None)
    subparser.set_defaults(**{key: _config_value(subparser, key, value) for key, value in options.items()})
    return parser.parse_args(argv)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise ConfigError("config: the parser has no commands")  # pragma: no cover - build_parser always adds them


def _config_value(subparser: argparse.ArgumentParser, key: str, value: Any) -> Any:
    """Run a config value through the option's own type check, so a file gets the same validation as a flag."""
    action = next(a for a in subparser._actions if a.dest == key)
    if isinstance(action, argparse._AppendAction):  # repeatable KEY=VALUE options: a list (or one string)
        return [str(v) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    convert = action.type
    if callable(convert) and value is not None and not isinstance(value, bool):
        try:
            value = convert(str(value))
        except (argparse.ArgumentTypeError, ValueError) as error:
            raise ConfigError(f"config: {key}: {error}") from None
    if action.choices is not None and value is not None and value not in action.choices:
        raise ConfigError(f"config: {key}: expected one of {list(action.choices)}, got {value!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradguard`` command (returns the exit status).

    Under torchrun every rank runs a heavy command in one process group (see ``cli.launch``); rank 0 alone
    prints the result, and an error once."""
    from ..workflow import KeptPartialRun, one_line
    from .launch import interrupt_on_sigterm, launch_rank, process_group, restore_sigterm, runs_here

    rank = launch_rank()
    args = None
    sigterm = interrupt_on_sigterm()  # SIGTERM stops a command as Ctrl-C does
    try:
        args = parse_args(argv)
        import torch

        torch.manual_seed(args.seed)
        if not runs_here(args, rank):
            return 0
        with process_group(args):
            result, text = args.handler(args)
    except GradguardError as error:
        return _fail(f"error: {one_line(error)}", error, rank, EXIT_ERROR, in_options=args is None)
    except KeptPartialRun as interrupted:
        return _fail(f"interrupted; {interrupted}", interrupted, rank, EXIT_INTERRUPTED)
    except KeyboardInterrupt as interrupted:
        return _fail("interrupted; nothing half-written was kept", interrupted, rank, EXIT_INTERRUPTED)
    except OSError as error:  # disk full, permission denied while writing, ...
        return _fail(f"error: {one_line(error)}", error, rank, EXIT_ERROR)
    finally:
        restore_sigterm(sigterm)
    if rank != 0:
        return 0
    if args.json:
        print(json.dumps(result, indent=2, default=_json_default))
    else:
        print(text)
    return 0


def _fail(message: str, error: BaseException, rank: int, status: int, *, in_options: bool = False) -> int:
    """One line on stderr (from rank 0, or from the rank where the error arose), and the exit status. An error
    ``in_options`` is the same on every rank: rank 0 alone says it."""
    from .launch import shown_error

    if rank == 0 or (not in_options and shown_error(error, rank)):
        where = f" (rank {rank})" if rank else ""
        print(f"gradguard{where}: {message}", file=sys.stderr)
    return status


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)
