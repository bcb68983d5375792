"""Per-sample random draws keyed by (seed, epoch, sample index), so that training with random starts gives the
same result whether a batch is processed by one process or split over several (torchrun / DDP).

Inside ``per_sample_generators(seed, epoch, indices)`` every random start (``ThreatModel.random_start`` without an
explicit generator) and every ``noise_like`` draw takes row i from a generator seeded by (seed, epoch, indices[i]):
a sample gets the same noise wherever it lands. Outside the context, or for a tensor whose rows do not match the
indices (an attack working on a subset), draws come from torch's global RNG as usual.
"""
from __future__ import annotations

import contextlib
import hashlib
from contextvars import ContextVar
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

_GENERATORS: ContextVar[list[torch.Generator] | None] = ContextVar("gradguard_per_sample_generators", default=None)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


@contextlib.contextmanager
def per_sample_generators(seed: int, epoch: int, indices: Sequence[int] | Tensor) -> Iterator[None]:
    """Route the random draws of this block to one generator per sample (see the module docstring)."""
    keys = indices.tolist() if isinstance(indices, Tensor) else list(indices)
    token = _GENERATORS.set([torch.Generator().manual_seed(sample_seed(seed, epoch, int(k))) for k in keys])
    try:
        yield
    finally:
        _GENERATORS.reset(token)


def draw_per_sample(x: Tensor, draw: Callable[[Tensor, torch.Generator | None], Tensor],
                    generator: torch.Generator | None = None) -> Tensor:
    """``draw(x, generator)``, or — inside ``per_sample_generators`` with one generator per row of ``x`` and no
    explicit ``generator`` — row by row from the samples' own generators (drawn on the CPU, moved to ``x``'s device)."""
    generators = _GENERATORS.get()
    if generator is not None or generators is None or len(generators) != x.shape[0]:
        return draw(x, generator)
    rows = [draw(x[i:i + 1].cpu(), g) for i, g in enumerate(generators)]
    return torch.cat(rows).to(x.device)


def noise_like(x: Tensor) -> Tensor:
    """Standard normal noise shaped like ``x`` (``torch.randn_like``), per sample inside ``per_sample_generators``."""
    return draw_per_sample(x, lambda t, g: torch.randn(t.shape, generator=g, dtype=t.dtype, device=t.device))
