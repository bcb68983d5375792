"""torchrun support for the commands: one process group around a heavy command, rank 0 alone prints.

``torchrun --nproc_per_node=N gradguard evaluate RUN`` starts N copies of the command. The heavy commands
(``train``, ``evaluate``, ``attack``, ``diagnose``) then join one process group (gloo on CPU; nccl on CUDA with each
process on ``cuda:LOCAL_RANK``, gloo beside it for CPU tensors) and share the work; the light ones (``report``,
``list``, ``demo``) run on rank 0 alone. The work itself is sharded in ``gradguard.workflow`` and the layers below
it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from datetime import timedelta
from typing import Any, Iterator

HEAVY_COMMANDS = ("train", "evaluate", "attack", "diagnose")
# how long a collective waits for the slowest rank: diagnose's checklist runs on rank 0 while the others wait
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun); read from the environment alone, so that
    parsing the options does not import torch."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def runs_here(args: argparse.Namespace, rank: int) -> bool:
    """Whether this process runs the command: every rank for a heavy command, else rank 0 alone."""
    return rank == 0 or args.command in HEAVY_COMMANDS


@contextlib.contextmanager
def process_group(args: argparse.Namespace) -> Iterator[None]:
    """Under torchrun and for a heavy command: the process group for the command's lifetime, torn down on every
    way out (success, error, Ctrl-C, SIGTERM: torchrun stopping the others when one rank fails), with Ctrl-C and
    SIGTERM held back until it is done. Elsewhere: nothing."""
    from ..runtime import distributed

    if args.command not in HEAVY_COMMANDS or not distributed.launched_by_torchrun():
        yield
        return
    from ..workflow import resolve_device

    # train wraps the model in DistributedDataParallel; --compile runs torch.compile (see distributed.setup)
    dynamo = args.command == "train" or bool(getattr(args, "compile", False))
    distributed.setup(resolve_device(args.device), timeout=COLLECTIVE_TIMEOUT, dynamo=dynamo)
    try:
        yield
    finally:
        with _signals_held():
            distributed.teardown()


def interrupt_on_sigterm() -> Any:
    """Make SIGTERM (``kill``, a scheduler, torchrun stopping the other ranks) raise KeyboardInterrupt like Ctrl-C,
    so that every command cleans up the same way (no staging folder left behind); returns the handler it replaced
    for ``restore_sigterm`` (None outside the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


def restore_sigterm(previous: Any) -> None:
    """Put back the SIGTERM handler that ``interrupt_on_sigterm`` replaced."""
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while the block runs (the process group's teardown, which must not stop half
    way), then raise KeyboardInterrupt if one came."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    held = [number for number in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(number) is not None]
    previous = {number: signal.signal(number, lambda signum, frame: came.append(signum)) for number in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if came:
        raise KeyboardInterrupt


def shown_error(error: BaseException, rank: int) -> bool:
    """Rank 0 shows every error; another rank only its own: not one it got from rank 0, nor Ctrl-C (which
    torchrun hands to every rank) or torchrun stopping it because another rank failed."""
    if rank == 0:
        return True
    return not (getattr(error, "raised_on_rank0", False) or isinstance(error, KeyboardInterrupt))
