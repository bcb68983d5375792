"""What the training loop iterates: the accepted data forms ((x, y) tensors or a DataLoader), each process's share
of every global batch (exact under DDP, also for ragged last batches), the ``DistributedSampler`` loader, and the
first samples that validation and the CO guard use."""
from __future__ import annotations

import math
from typing import Any, Iterator, Sized

import torch
from torch import Tensor

from ..checks import as_labels, check_inputs
from ..errors import InputError
from ..runtime import distributed
from ..threat import Linf, ThreatModel


def as_data(data: Any, argument: str, threat: ThreatModel | None) -> Any:
    """A DataLoader as it is, or a checked (x, y) tuple of tensors."""
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise InputError(f"{argument}: expected an (x, y) tuple of tensors, a DataLoader or a gradguard Dataset, "
                         f"got {type(data).__name__}")
    x, y = data
    # Without a threat model any finite range is fine; with one, data must lie in its bounds (attacks check).
    x = check_inputs(x, threat if threat is not None else Linf(0.0, bounds=(-1e30, 1e30)), f"{argument}[0]")
    y = as_labels(y, x.shape[0], f"{argument}[1]")
    if x.shape[0] == 0:
        raise InputError(f"{argument}: is empty; pass at least one sample")
    return x, y


def n_samples(data: Any) -> int | None:
    """How many training samples (None for a DataLoader over a dataset without a length)."""
    if isinstance(data, torch.utils.data.DataLoader):
        if not isinstance(data.dataset, Sized):  # an iterable dataset has no length
            return None
        try:
            return len(data.dataset)
        except TypeError:  # a __len__ that refuses, e.g. a chain of iterable datasets
            return None
    return int(data[1].shape[0])


def steps_per_epoch(train_data: Any, *, batch_size: int, seed: int, rank: int, world_size: int) -> int:
    if isinstance(train_data, torch.utils.data.DataLoader):
        if distributed.is_distributed():
            return len(distributed_loader(train_data, 0, batch_size=batch_size, seed=seed, rank=rank,
                                          world_size=world_size))
        return len(train_data)
    return math.ceil(train_data[1].shape[0] / batch_size)


def train_batches(train_data: Any, epoch: int, *, batch_size: int, seed: int, rank: int, world_size: int,
                  device: torch.device) -> Iterator[tuple[Tensor, Tensor, float, Tensor | None]]:
    """(x, y, share, indices) per step; ``share`` rescales this process's mean loss so that DDP's gradient
    average equals the gradient of the mean loss over the whole global batch (exact also for ragged last
    batches); ``indices`` are the samples' positions in the training tensors (None for a DataLoader)."""
    if isinstance(train_data, torch.utils.data.DataLoader):
        loader = distributed_loader(train_data, epoch, batch_size=batch_size, seed=seed, rank=rank,
                                    world_size=world_size) if distributed.is_distributed() else train_data
        for x, y in loader:
            yield x.to(device), y.to(device), 1.0, None
        return
    x_all, y_all = train_data
    order = torch.randperm(y_all.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        if world_size > 1:
            if len(batch) < world_size:  # pad like DistributedSampler so every process gets a sample
                batch = torch.cat([batch, order[: world_size - len(batch)]])
            global_size = len(batch)
            batch = batch[rank::world_size]
            share = len(batch) * world_size / global_size
        else:
            share = 1.0
        yield x_all[batch].to(device), y_all[batch].to(device), share, batch


def distributed_loader(loader: Any, epoch: int, *, batch_size: int, seed: int, rank: int, world_size: int) -> Any:
    """This process's DataLoader over ``loader``'s dataset: a shuffled ``DistributedSampler``, the global batch
    split evenly over the processes."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler: DistributedSampler[int] = DistributedSampler(loader.dataset, num_replicas=world_size,
                                                          rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    per_process = max(1, (loader.batch_size or batch_size) // world_size)
    return DataLoader(loader.dataset, batch_size=per_process, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn)


def first_samples(data: Any, limit: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The first ``limit`` samples of (x, y) tensors or a DataLoader, on ``device``."""
    if isinstance(data, torch.utils.data.DataLoader):
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        count = 0
        for x, y in data:
            xs.append(x)
            ys.append(y)
            count += y.shape[0]
            if count >= limit:
                break
        return torch.cat(xs)[:limit].to(device), torch.cat(ys)[:limit].to(device)
    return data[0][:limit].to(device), data[1][:limit].to(device)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any): the default training device."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
