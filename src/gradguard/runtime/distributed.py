"""The one set of process-group primitives: the same code runs in one process or under ``torchrun``.

Under ``torchrun --nproc_per_node=N`` the environment carries RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR;
``setup`` then initialises the process group (gloo on CPU; on GPU nccl for CUDA tensors and gloo for CPU ones)
unless the caller already did. The command line uses ``launched_by_torchrun``, ``local_device`` and ``teardown``
around every heavy command, and ``rank0_first`` / ``broadcast_object`` so that rank 0 alone touches the file
system and the others follow it.

Moved here from ``train/distributed.py`` (which re-exports these names): training, evaluation, the workflow and
the command line all need them, so they live below every layer that uses them. Imports nothing from gradguard.
"""
from __future__ import annotations

import atexit
import gc
import os
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1 in the environment)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, a CUDA device becomes this process's own GPU ``cuda:LOCAL_RANK`` (made current); any
    other device, and any device outside torchrun, is returned as is."""
    if device.type != "cuda" or not launched_by_torchrun():
        return device
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(local)
    return local


def setup(device: torch.device | None = None, timeout: timedelta | None = None, *,
          dynamo: bool = True) -> tuple[int, int]:
    """(rank, world_size), initialising the default process group from torchrun's environment if needed
    (``timeout``: how long a collective waits for a slow rank; torch's default when None). A group made here is
    destroyed at interpreter exit (``teardown``, registered with atexit) unless the caller did so first; a group
    the caller made is the caller's to destroy. ``dynamo``: the
    process may use DistributedDataParallel or torch.compile, so torch._dynamo, which both import, is imported
    before the group exists (see ``_import_before_group``); False spares a command that uses neither its import
    time."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if not launched_by_torchrun():
            return 0, 1
        if dynamo:
            _import_before_group()
        cuda = device is not None and device.type == "cuda"
        # on GPUs nccl for CUDA tensors and gloo for the CPU tensors that counts and results travel in
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout,
                                device_id=device if cuda else None)
        # the group is ours: a user's script (Trainer under torchrun) never destroys it, and a group still up
        # when the interpreter finalizes aborts the process at random (see ``_import_before_group``)
        atexit.register(teardown)
    return dist.get_rank(), dist.get_world_size()


def _import_before_group() -> None:
    """Import torch._dynamo (DistributedDataParallel and torch.compile import it on first use) while no process
    group exists yet.

    Some torch modules it imports take ``dist.group.WORLD`` as a default argument, evaluated at import time
    (``ShardedGradScaler(process_group=dist.group.WORLD)``): imported while the group is up, they keep it alive
    after ``destroy_process_group``, so its gloo worker threads are never joined. One of them still releasing the
    tensors of the last collective at interpreter exit then needs the GIL during finalization and aborts the
    process ("terminate called without an active exception", SIGABRT), at random, more often on a loaded
    machine. Imported first, the default is None and teardown joins those threads."""
    import torch._dynamo  # noqa: F401


def teardown() -> None:
    """Destroy the default process group if one is up (at the end of a command under torchrun, on every exit
    path). Wrappers held only by reference cycles (a DistributedDataParallel model and its reducer) are collected
    first, so that destroying the group drops its last reference: torch then waits for the gloo worker threads to
    finish their work and joins them (the GIL released), and none is left running when the interpreter exits."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def group_initialized() -> bool:
    """Whether a default process group is up (of any size: a one-rank group counts)."""
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in one process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 outside torchrun)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, the one process that writes files and prints (always true in one process)."""
    return rank() == 0


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all processes (a no-op in one process)."""
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's value of ``flag`` on every process."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)])
    dist.broadcast(value, src=0)
    return bool(value.item())


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every process."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(items: list) -> list:
    """Every process's ``items`` (picklable), concatenated in rank order, on every process."""
    if not is_distributed():
        return list(items)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every process when ``flag`` is True on any (one all-reduce of one number). ``device``: where that
    number travels (the model's, for a group a training framework made with nccl alone)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def max_float(value: float) -> float:
    """The largest ``value`` over all processes (wall times: the slowest rank sets the pace)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def same_on_every_rank(values: torch.Tensor) -> bool:
    """Whether every process holds the same ``values`` (two all-reduces, MIN and MAX; always true in one
    process)."""
    if not is_distributed():
        return True
    low, high = values.clone(), values.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return torch.equal(low, high)


def rank0_first(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 alone and hand its result to every process; if it raises, every process raises
    the same error (so a refused ``--out`` stops all ranks with one message, none of them waiting forever)."""
    if not is_distributed():
        return work()
    outcome: tuple[bool, Any] = (True, None)
    if is_main_process():
        try:
            outcome = (True, work())
        except Exception as error:  # handed to the other ranks, then raised here too
            outcome = (False, error)
    ok, value = broadcast_object(outcome)
    if not ok:
        if not is_main_process():
            value.raised_on_rank0 = True  # the CLI prints it once, on rank 0
        raise value
    return value
