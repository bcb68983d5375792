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
    """Under torchrun and for a heavy command: the process group for the command's lifetime, with SIGTERM
    (torchrun stopping the others when one rank fails) raised as KeyboardInterrupt so that nothing
    half-written is left behind. Elsewhere: nothing."""
    from ..train import distributed

    if args.command not in HEAVY_COMMANDS or not distributed.launched_by_torchrun():
        yield
        return
    from ..workflow import resolve_device

    distributed.setup(resolve_device(args.device), timeout=COLLECTIVE_TIMEOUT)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        distributed.teardown()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def shown_error(error: BaseException, rank: int) -> bool:
    """Rank 0 shows every error; another rank only its own: not one it got from rank 0, nor Ctrl-C (which
    torchrun hands to every rank) or torchrun stopping it because another rank failed."""
    if rank == 0:
        return True
    return not (getattr(error, "raised_on_rank0", False) or isinstance(error, KeyboardInterrupt))
