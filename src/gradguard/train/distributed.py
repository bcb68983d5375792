"""Where the process-group helpers used to live (a re-export shim): they are in ``gradguard.runtime.distributed``,
the one set every layer uses. Patch names there, not here: this module only re-exports them.
"""
from __future__ import annotations

from ..runtime.distributed import (
    all_reduce_sum,
    barrier,
    broadcast_flag,
    broadcast_object,
    gather_objects,
    is_distributed,
    is_main_process,
    launched_by_torchrun,
    local_device,
    max_float,
    rank,
    rank0_first,
    setup,
    teardown,
    world_size,
)

__all__ = ["all_reduce_sum", "barrier", "broadcast_flag", "broadcast_object", "gather_objects", "is_distributed",
           "is_main_process", "launched_by_torchrun", "local_device", "max_float", "rank", "rank0_first", "setup",
           "teardown", "world_size"]
