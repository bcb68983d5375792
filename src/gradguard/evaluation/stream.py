"""Evaluation data as a stream of fixed-size blocks, whatever form the user hands it over in.

``evaluate`` runs its whole cascade on one block of ``batch_size`` samples before it reads the next, so peak memory
is set by the block size, not by the dataset. The block boundaries depend only on ``batch_size`` (never on a
DataLoader's own batch size), so tensors, a map-style ``Dataset`` and any ``DataLoader`` over the same samples give
the same blocks — and, with per-block seeds, the same results.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from ..checks import as_labels, check_inputs, positive_int
from ..errors import InputError
from ..threat import ThreatModel

if TYPE_CHECKING:
    from .distributed import Shard


@dataclass
class Block:
    """``batch_size`` consecutive samples (the last block may hold fewer); ``index`` is its global position."""

    index: int
    x: Tensor
    y: Tensor

    def fingerprint(self) -> str:
        """sha256 of the block's inputs (as float32) and labels: a cheap identity check of a data stream."""
        digest = hashlib.sha256()
        digest.update(self.x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        digest.update(self.y.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()


class BlockSource:
    """Cuts ``data`` into blocks of ``batch_size`` samples, capped at ``max_samples``.

    ``data`` is an ``(x, y)`` pair of tensors, a map-style ``torch.utils.data.Dataset`` (read with its vectorised
    ``get_batch(range(start, stop)) -> (x, y)`` when it has one, else item by item and stacked) or any iterable of
    ``(x, y)`` batches such as a ``DataLoader``. ``n`` is the number of samples when it is known without reading
    the data (tensors and map-style datasets), else None.
    """

    def __init__(self, data: Any, threat: ThreatModel, batch_size: int, max_samples: int | None = None) -> None:
        self.threat, self.batch_size = threat, positive_int(batch_size, "batch_size")
        self.max_samples = None if max_samples is None else positive_int(max_samples, "max_samples")
        self.data, self.kind = data, _kind(data)
        self.n: int | None = None
        if self.kind == "tensors":
            x, y = data
            as_labels(y, x.shape[0] if x.dim() else -1, "data")
            self.n = _capped(x.shape[0], self.max_samples)
        elif self.kind == "dataset":
            self.n = _capped(len(data), self.max_samples)
        if self.n == 0:
            raise InputError("data: holds no samples; pass at least one (x, y) pair")

    @property
    def random_access(self) -> bool:
        """True when a block can be read without reading the ones before it."""
        return self.kind != "iterable"

    def blocks(self) -> Iterator[tuple[int, Callable[[], Block]]]:
        """``(index, read)`` for every block in order; ``read()`` does the I/O (for an iterable it was already done).

        A caller that does not call ``read`` for a block of a tensor or map-style source never reads it.
        """
        if self.kind == "iterable":
            for index, (x, y) in enumerate(_rechunk(_capped_batches(self.data, self.max_samples), self.batch_size)):
                yield index, _reader(self._block, index, x, y)
            return
        assert self.n is not None
        for index, start in enumerate(range(0, self.n, self.batch_size)):
            yield index, _reader(self._read_range, index, start, min(start + self.batch_size, self.n))

    def _read_range(self, index: int, start: int, stop: int) -> Block:
        if self.kind == "tensors":
            x, y = self.data
            return self._block(index, x[start:stop], y[start:stop])
        if callable(getattr(self.data, "get_batch", None)):
            x, y = self.data.get_batch(range(start, stop))
            return self._block(index, x, y)
        items = [self.data[i] for i in range(start, stop)]
        if not all(isinstance(item, (tuple, list)) and len(item) >= 2 for item in items):
            raise InputError("data: each item of the Dataset must be an (x, y) pair")
        x = torch.stack([torch.as_tensor(item[0]) for item in items])
        y = torch.as_tensor([int(item[1]) for item in items], dtype=torch.int64)
        return self._block(index, x, y)

    def _block(self, index: int, x: Any, y: Any) -> Block:
        x = check_inputs(x, self.threat, "data")
        y = as_labels(y, x.shape[0], "data")
        return Block(index, x, y.to(x.device))


def collect(source: BlockSource) -> tuple[Tensor, Tensor]:
    """Every block of ``source`` concatenated (for small subsets: the whole stream is held in memory)."""
    xs, ys = [], []
    for _, read in source.blocks():
        block = read()
        xs.append(block.x)
        ys.append(block.y)
    if not xs:
        raise InputError("data: the loader yielded no batches; pass a non-empty dataset")
    return torch.cat(xs), torch.cat(ys)


def collect_data(data: Any, threat: ThreatModel, max_samples: int | None = None) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors from any data form ``evaluate`` takes, checked and capped (held in memory: small sets)."""
    return collect(BlockSource(data, threat, 1024, max_samples))


def progress_blocks(source: BlockSource, progress: bool, shard: Shard) -> Iterator[tuple[int, Callable[[], Block]]]:
    """``source.blocks()``, with a progress bar on rank 0 when ``progress`` is asked for."""
    if not progress or shard.rank != 0:
        return source.blocks()
    from ..runtime.progress import progress_bar

    total = None if source.n is None else math.ceil(source.n / source.batch_size)
    return iter(progress_bar(source.blocks(), total=total, desc="blocks"))


def release_freed_memory() -> None:
    """Hand the memory freed by the last block back to the system (glibc only; elsewhere a no-op).

    Each block allocates and frees tensors of the same large sizes. glibc raises its mmap threshold after such
    frees, so later blocks are carved from the heap, which fragments and keeps growing: 50 000 images of 3x64x64
    grew the peak resident set by 652 MB without it and by 202 MB with it (bench/streaming.py), although no block
    outlives its turn.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def _kind(data: Any) -> str:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return "tensors"
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        return "dataset"
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Tensor, dict)):
        return "iterable"
    raise InputError("data: expected an (x, y) pair of tensors, a map-style Dataset or a DataLoader yielding "
                     f"(x, y) batches, got {type(data).__name__}")


def _capped(n: int, max_samples: int | None) -> int:
    return n if max_samples is None else min(n, max_samples)


def _reader(function: Callable[..., Block], *args: Any) -> Callable[[], Block]:
    return lambda: function(*args)


def _capped_batches(data: Iterable, max_samples: int | None) -> Iterator[tuple[Any, Any]]:
    """The loader's ``(x, y)`` batches, the last one cut so that at most ``max_samples`` samples come out."""
    taken = 0
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise InputError(f"data: each batch from the loader must be an (x, y) pair; got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise InputError(f"data: each batch must hold tensors, got ({type(x).__name__}, {type(y).__name__})")
        if max_samples is not None and taken + len(y) >= max_samples:
            yield x[: max_samples - taken], y[: max_samples - taken]
            return
        taken += len(y)
        yield x, y


def _rechunk(batches: Iterable[tuple[Tensor, Tensor]], size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of any sizes -> consecutive chunks of exactly ``size`` samples (the last may be smaller)."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    held = 0
    for x, y in batches:
        if x.dim() == 0 or x.shape[0] != y.shape[0]:
            raise InputError(f"data: a batch holds {tuple(x.shape)} inputs but {tuple(y.shape)} labels; "
                             "give one label per input")
        xs.append(x)
        ys.append(y)
        held += y.shape[0]
        while held >= size:
            x_all, y_all = (torch.cat(xs), torch.cat(ys)) if len(xs) > 1 else (xs[0], ys[0])
            yield x_all[:size], y_all[:size]
            xs, ys, held = [x_all[size:]], [y_all[size:]], held - size
    if held:
        yield torch.cat(xs), torch.cat(ys)
