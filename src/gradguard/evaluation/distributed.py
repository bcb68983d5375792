"""Sharding an evaluation over torch.distributed ranks so the numbers equal a single process's.

Every rank is given the same data stream. It is cut into the same global blocks a single process would use,
and block ``b`` goes to rank ``b % world_size`` (a map-style dataset is read only where a rank owns the block; an
iterable is read by every rank, which skips the blocks it does not own). Each block is attacked with seeds derived
from its global index, so the spread over ranks changes nothing. At the end the small per-sample results of every
block are gathered on every rank, which then holds the identical, complete report.

Only what is particular to evaluation lives here (which rank owns a block, per-block seeds, the same-stream check);
the collectives themselves are the process-group primitives of ``gradguard.runtime.distributed``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..runtime import distributed as process_group


@dataclass(frozen=True)
class Shard:
    """This process's rank among ``world_size`` processes (``world_size == 1``: no communication).

    ``gather`` and ``barrier`` communicate only when the shard is ``active``: ``evaluate(distributed=False)`` under
    torchrun keeps to its own process although a process group is up."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world_size == self.rank

    def gather(self, items: list) -> list:
        """Every rank's ``items`` (picklable), concatenated in rank order, on every rank."""
        return process_group.gather_objects(items) if self.active else list(items)

    def barrier(self) -> None:
        if self.active:
            process_group.barrier()


def resolve_shard(distributed: bool | None) -> Shard:
    """``None`` (auto): shard when a process group with more than one rank is initialised; ``False``: never."""
    if distributed is False or not process_group.group_initialized():
        if distributed is True:
            raise InputError("distributed: True needs an initialised torch.distributed process group; "
                             "launch with torchrun and call torch.distributed.init_process_group first")
        return Shard()
    return Shard(process_group.rank(), process_group.world_size())


def check_same_stream(shard: Shard, n: int | None, first_block: str) -> None:
    """Cheap check that every rank reads the same data: the sample count (if known) and the first block's hash."""
    if not shard.active:
        return
    fingerprint = torch.tensor([float(-1 if n is None else n), float(int(first_block[:12], 16))], dtype=torch.float64)
    if not process_group.same_on_every_rank(fingerprint):
        raise InputError("data: differs between ranks; give every rank the full evaluation set (no "
                         "DistributedSampler) — evaluate() shards the samples across ranks itself")


def batch_seed(seed: int | None, stage: int, batch_index: int) -> int | None:
    """The seed of one attack stage on one global batch: independent of how batches are spread over ranks."""
    if seed is None:
        return None
    return (int(seed) * 1_000_003 + stage * 10_007 + batch_index) % (2 ** 62)
