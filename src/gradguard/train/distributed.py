"""torch.distributed helpers: the same training code runs in one process or under ``torchrun``.

Under ``torchrun --nproc_per_node=N`` the environment carries RANK / WORLD_SIZE / MASTER_ADDR; ``setup`` then
initialises the process group (gloo on CPU, nccl on GPU) unless the caller already did.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world_size), initialising the default process group from torchrun's environment if needed."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
