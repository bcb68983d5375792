"""The ``gradguard`` command line: demo | train | attack | evaluate | certify | diagnose | report | list.

Built on argparse (standard library, no dependency; see docs/cli.md). One module per command registers its
options and turns the parsed arguments into a call to ``gradguard.workflow``, which does the work; the command
then prints a short table (or JSON with ``--json``). Every command takes ``--seed``, ``--device``, ``--threads N``,
``--config FILE`` and ``--json``.

Errors: a ``GradguardError`` or a bad argument exits non-zero with one line on stderr and no traceback. A reader
that closes the pipe early (``gradguard list --json | head -1``) ends the command quietly: exit 0 when only the
printing of a finished result was cut short, ``EXIT_CLOSED_PIPE`` (141) when the work itself was stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from typing import Any, Iterator, Sequence

from .._version import __version__
from ..errors import ConfigError, GradguardError, ResumeMismatchError
from . import attack, certify, demo, diagnose, evaluate, listing, report, train
from .common import EXIT_CLOSED_PIPE, EXIT_ERROR, EXIT_INTERRUPTED, OneLineParser, common_options
from .resume import resume_refusal

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
    threads = None  # torch's thread count before --threads, restored on return (tests call main in-process)
    sigterm = interrupt_on_sigterm()  # SIGTERM stops a command as Ctrl-C does
    try:
        args = parse_args(argv)
        import torch

        torch.manual_seed(args.seed)
        if args.threads is not None:  # intra-op threads only: the inter-op count can be set once per process and
            threads = torch.get_num_threads()  # never restored, and tests call main in-process
            torch.set_num_threads(args.threads)
        if not runs_here(args, rank):
            return 0
        with process_group(args), _warning_lines(rank):
            result, text = args.handler(args)
    except ResumeMismatchError as error:  # worded for the command line: flags, not resume=False
        assert args is not None
        return _fail(f"error: {resume_refusal(error, args)}", error, rank, EXIT_ERROR)
    except BrokenPipeError:  # progress written to a pipe whose reader has gone (`gradguard train 2>&1 | head -1`)
        return _closed_pipe(0 if args is None else EXIT_CLOSED_PIPE)
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
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
    if rank != 0:
        return 0
    try:
        print(json.dumps(result, indent=2, default=_json_default) if args.json else text)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader took what it wanted (`gradguard list --json | head -1`): the work is done
        return _closed_pipe(0)
    return 0


def _closed_pipe(status: int) -> int:
    """A closed pipe is a quiet exit: point stdout and stderr at the null device, so that neither what is left in
    their buffers nor the interpreter's final flush raises again (and prints a traceback), and return ``status``."""
    for stream in (sys.stdout, sys.stderr):
        try:
            descriptor = stream.fileno()
        except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor (tests)
            continue
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, descriptor)
        finally:
            os.close(null)
    return status


def _fail(message: str, error: BaseException, rank: int, status: int, *, in_options: bool = False) -> int:
    """One line on stderr (from rank 0, or from the rank where the error arose), and the exit status. An error
    ``in_options`` is the same on every rank: rank 0 alone says it."""
    from .launch import shown_error

    if rank == 0 or (not in_options and shown_error(error, rank)):
        where = f" (rank {rank})" if rank else ""
        try:
            print(f"gradguard{where}: {message}", file=sys.stderr)
        except BrokenPipeError:  # nobody reads stderr any more: the status still says it
            _closed_pipe(status)
    return status


@contextlib.contextmanager
def _warning_lines(rank: int) -> Iterator[None]:
    """A gradguard warning (an eps far above customary budgets) is one "gradguard: warning: ..." line on stderr,
    from rank 0, once per message; other warnings show as Python shows them."""
    from ..threat import LargeEpsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("default", LargeEpsWarning)
        shown = warnings.showwarning

        def show(message: Any, category: type[Warning], *where: Any, **more: Any) -> None:
            if not issubclass(category, LargeEpsWarning):
                shown(message, category, *where, **more)
            elif rank == 0:
                print(f"gradguard: warning: {message}", file=sys.stderr)

        warnings.showwarning = show
        yield


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)
