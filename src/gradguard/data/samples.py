"""``SampleSet``: one split of a dataset, read on demand, plus the resize / crop applied as it is read.

A ``SampleSet`` is a map-style ``torch.utils.data.Dataset``: ``s[i]`` is ``(image, label)`` with the image a
float32 (C, H, W) tensor in [0, 1], and ``s.get_batch(index)`` reads many samples with one vectorised array read
(what the streaming evaluation calls). Sets backed by files keep only paths and small index arrays; they open
their memory maps lazily, in each process, so they pickle cheaply into ``DataLoader`` workers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset

from ..errors import ConfigError, DataError

LAYOUTS = ("NHW", "NCHW", "NHWC")


# ------------------------------------------------------------------------------------------------
# resize / center crop
# ------------------------------------------------------------------------------------------------
def parse_size(value: Any, argument: str) -> tuple[int, ...] | None:
    """``None``, ``32``, ``"32"``, ``"32,48"`` or ``(32, 48)`` -> ``None``, ``(32,)`` or ``(32, 48)``."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            numbers = [int(part) for part in value.replace("x", ",").split(",") if part.strip()]
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            numbers = [int(value)]
        elif isinstance(value, Sequence) and all(isinstance(v, (int, np.integer)) for v in value):
            numbers = [int(v) for v in value]
        else:
            raise ValueError
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) <= 0:
        raise ConfigError(f"{argument}: expected H or H,W in pixels (positive integers), got {value!r}")
    return tuple(numbers)


@dataclass(frozen=True)
class ImageTransform:
    """Resize then center-crop, as torchvision's ``Resize`` + ``CenterCrop`` do.

    ``resize=(n,)`` scales the shorter side to n and keeps the aspect ratio; ``resize=(h, w)`` scales to exactly
    h x w; ``center_crop=(n,)`` means n x n. Bilinear with antialiasing, so downscaled photos do not alias.
    """

    resize: tuple[int, ...] | None = None
    center_crop: tuple[int, ...] | None = None

    @classmethod
    def of(cls, resize: Any = None, center_crop: Any = None) -> ImageTransform:
        return cls(parse_size(resize, "resize"), parse_size(center_crop, "center_crop"))

    def __bool__(self) -> bool:
        return self.resize is not None or self.center_crop is not None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize is None:
            return height, width
        if len(self.resize) == 2:
            return self.resize[0], self.resize[1]
        short, long = sorted((height, width))
        new_short, new_long = self.resize[0], int(self.resize[0] * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)

    def __call__(self, images: Tensor, source: str) -> Tensor:
        """Images (B, C, H, W) -> (B, C, H', W'); ``source`` names the file in errors."""
        height, width = images.shape[-2:]
        size = self.resized_size(height, width)
        if size != (height, width):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
            images = images.clamp_(0.0, 1.0)
        if self.center_crop is not None:
            crop_h, crop_w = self.center_crop if len(self.center_crop) == 2 else self.center_crop * 2
            height, width = images.shape[-2:]
            if crop_h > height or crop_w > width:
                raise DataError(f"center_crop: {crop_h}x{crop_w} is larger than the {height}x{width} image from "
                                f"{source}; choose a smaller crop or resize first (resize=H / --resize H)")
            top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
            images = images[..., top:top + crop_h, left:left + crop_w]
        return images


def to_unit_images(batch: np.ndarray, layout: str, source: str) -> Tensor:
    """A batch of uint8 (0..255) or float (0..1) images in ``layout`` -> float32 (B, C, H, W) in [0, 1].

    Values are checked here, per batch, so a file is never scanned in full up front.
    """
    if layout == "NHW":
        batch = batch[:, None]
    elif layout == "NHWC":
        batch = batch.transpose(0, 3, 1, 2)
    if np.issubdtype(batch.dtype, np.integer):
        if batch.dtype != np.uint8 and batch.size and (batch.min() < 0 or batch.max() > 255):
            raise DataError(f"{source}: integer pixels must lie in 0..255, found [{batch.min()}, {batch.max()}] "
                            "in this batch; store uint8 or floats in [0, 1]")
        images = batch.astype(np.float32) / 255.0
    else:
        images = batch.astype(np.float32)
        if not np.isfinite(images).all():
            raise DataError(f"{source}: this batch of images contains NaN or inf; clean the array")
        if images.size and (images.min() < 0.0 or images.max() > 1.0):
            raise DataError(f"{source}: float pixels span [{images.min():g}, {images.max():g}] in this batch; "
                            "scale them to [0, 1] (divide by 255) or store uint8")
    return torch.from_numpy(np.ascontiguousarray(images))


def split_rows(n: int, split: str, test_fraction: float, split_seed: int) -> np.ndarray:
    """The rows of a fixed, seeded train/test split for data that ships without one (indices, no copies).

    ``split="all"`` is every row, in the same seeded order (the test rows first), so that the first N of them
    are a random sample of the data rather than its first class folder.
    """
    if split == "all":
        return np.random.default_rng(split_seed).permutation(n)
    if not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction: must lie in (0, 1), got {test_fraction!r}")
    if n < 2:
        raise DataError(f"data: need at least 2 samples to split into train and test, got {n}")
    order = np.random.default_rng(split_seed).permutation(n)
    n_test = min(max(1, int(round(test_fraction * n))), n - 1)
    return order[:n_test] if split == "test" else order[n_test:]


def split_info(name: str, split: str, n: int, *, how: str, total: int | None = None,
               test_fraction: float | None = None, split_seed: int | None = None) -> dict[str, Any]:
    """What samples a set holds and why, for the console, run.json and the report.

    ``how``: "own" (the split the source ships), "fixed" (digits: gradguard's fixed seeded split), "seeded" (a
    seeded split of a source that has none), "all" (every sample of a source without a split), "test-only" (a
    source that holds only a test split). ``text`` says it in one sentence with the counts.
    """
    info: dict[str, Any] = {"split": split, "how": how, "n": int(n), "of": None if total is None else int(total)}
    if how in ("seeded", "fixed"):
        info.update(test_fraction=float(test_fraction or 0), split_seed=split_seed)
        test_pct = round(100 * float(test_fraction or 0))
        shape = f"{100 - test_pct}/{test_pct}"
        if how == "fixed":
            info["text"] = (f"{n} of {total} samples: the {split} part of the fixed seeded {shape} split of {name} "
                            f"(split_seed {split_seed})")
        else:
            info["text"] = (f"{n} of {total} samples: the {split} part of a seeded {shape} split (split_seed "
                            f"{split_seed}), made because {name} has no train/test split of its own")
    elif how == "all":
        info["text"] = f"all {n} samples of {name}: it has no train/test split of its own"
    elif how == "test-only":
        info["text"] = f"all {n} samples of {name}: it holds only a test split"
    else:
        info["text"] = f"{n} samples: the {split} split that {name} ships"
    return info


# ------------------------------------------------------------------------------------------------
# SampleSet and its kinds
# ------------------------------------------------------------------------------------------------
class SampleSet(TorchDataset):
    """One split of a dataset: ``(float32 CHW image in [0, 1], int label)`` per index, read when asked for."""

    def __init__(self, name: str, classes: list[str], input_shape: tuple[int, ...],
                 transform: ImageTransform | None = None) -> None:
        self.name = name
        self.classes = list(classes)
        self.transform = transform or ImageTransform()
        self._input_shape = tuple(int(d) for d in input_shape)
        self.split_info: dict[str, Any] = {}  # which samples and why (``split_info``), set by the opener
        self.class_source = ""  # where ``classes`` (the label order) came from, set by the opener

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of every image this set returns (after resize / crop)."""
        return self._input_shape

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x, y = self.get_batch([int(index)])
        return x[0], int(y[0])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        """Batched fetch for ``DataLoader`` (torch >= 2.1 calls it): one ``get_batch`` per loader batch."""
        x, y = self.get_batch(indices)
        return list(zip(x, y.tolist(), strict=True))

    def get_batch(self, index: Sequence[int] | np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
        """Samples ``index`` as (x float32 (B, C, H, W), y int64 (B,)), read with one vectorised access."""
        return self._read(self._rows(index))

    def targets(self) -> Tensor:
        """Every sample's label, int64 (N,), without decoding images (for per-class sampling)."""
        raise NotImplementedError

    def _read(self, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _rows(self, index: Sequence[int] | np.ndarray | Tensor) -> np.ndarray:
        if isinstance(index, Tensor):
            index = index.detach().cpu().numpy()
        rows = np.asarray(index)
        if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
            raise IndexError(f"index: expected a 1-D sequence of ints, got {rows.dtype} {rows.shape}")
        rows = rows.astype(np.int64)
        n = len(self)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"index: sample indices must lie in [-{n}, {n}), got [{rows.min()}, {rows.max()}]")
        return np.where(rows < 0, rows + n, rows)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, samples={len(self)}, input_shape={self.input_shape}, "
                f"classes={self.num_classes})")


class TensorSampleSet(SampleSet):
    """A split already in memory as float tensors (the embedded digits, npz archives)."""

    def __init__(self, name: str, classes: list[str], x: Tensor, y: Tensor,
                 transform: ImageTransform | None = None) -> None:
        transform = transform or ImageTransform()
        shape = transform(x[:1], name).shape[1:] if len(x) else x.shape[1:]
        super().__init__(name, classes, tuple(shape), transform)
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def targets(self) -> Tensor:
        return self.y.clone()

    def _read(self, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        index = torch.from_numpy(rows)
        x = self.x[index]
        return (self.transform(x, self.name) if self.transform else x), self.y[index]


class ArraySampleSet(SampleSet):
    """Images and labels from NumPy arrays: in memory, or ``.npy`` files memory-mapped on first use.

    ``images``/``labels`` are arrays or paths of ``.npy`` files; ``rows`` (optional) selects this split's rows
    (a seeded split of one file costs an index array, never a copy); ``layout`` is NHW, NCHW or NHWC.
    """

    def __init__(self, name: str, classes: list[str], images: np.ndarray | Path, labels: np.ndarray | Path, *,
                 layout: str, rows: np.ndarray | None = None, transform: ImageTransform | None = None,
                 source: str | None = None) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        self._image_source, self._label_source = images, labels
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        self.layout, self.split_rows = layout, rows
        self.source = source or (str(images) if isinstance(images, Path) else name)
        image_shape = self.images.shape[1:]
        chw = (1, *image_shape) if layout == "NHW" else image_shape if layout == "NCHW" else (
            image_shape[2], image_shape[0], image_shape[1])
        transform = transform or ImageTransform()
        if transform:  # the output shape, and a crop too large for these images fails now, not mid-run
            chw = tuple(transform(torch.zeros(1, *chw), self.source).shape[1:])
        super().__init__(name, classes, chw, transform)

    @property
    def images(self) -> np.ndarray:
        """The whole image array (an ``np.memmap`` for ``.npy`` files: nothing read until indexed)."""
        return self._open()[0]

    @property
    def labels(self) -> np.ndarray:
        return self._open()[1]

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (_load(self._image_source), _load(self._label_source))
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if isinstance(self._image_source, Path):
            state["_arrays"] = None  # each worker process maps the files itself
        return state

    def __len__(self) -> int:
        return len(self.split_rows) if self.split_rows is not None else len(self.labels)

    def targets(self) -> Tensor:
        labels = self.labels if self.split_rows is None else self.labels[self.split_rows]
        return torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def _read(self, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        if self.split_rows is not None:
            rows = self.split_rows[rows]
        images, labels = self._open()
        x = to_unit_images(read_rows(images, rows), self.layout, self.source)
        if self.transform:
            x = self.transform(x, self.source)
        return x, torch.from_numpy(np.asarray(labels[rows], dtype=np.int64))


def read_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]``; for a C-ordered ``np.memmap``, read with positioned file reads, one per run of
    consecutive rows, instead of page faults.

    Why: a memory map's touched pages count in the process's RSS, and recent kernels map whole large folios
    per fault, so 256 random rows of a 500 MB file mapped 300 MB. Reads copy just the rows into the batch.
    """
    filename, offset = getattr(array, "filename", None), getattr(array, "offset", None)
    if filename is None or offset is None or not array.flags.c_contiguous or len(rows) == 0:
        return np.asarray(array[rows])
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    row_bytes = out[:1].nbytes
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    run_starts = np.flatnonzero(np.diff(ordered, prepend=-2) != 1)  # a new run wherever rows are not consecutive
    run_ends = np.append(run_starts[1:], len(rows))
    in_order = bool(np.all(order[1:] > order[:-1]))
    buffer = out if in_order else np.empty_like(out)  # a sequential batch is read straight into place
    flat = buffer.reshape(-1).view(np.uint8).data
    with open(filename, "rb", buffering=0) as handle:
        for start, stop in zip(run_starts.tolist(), run_ends.tolist(), strict=True):
            handle.seek(offset + int(ordered[start]) * row_bytes)
            _read_exactly(handle, flat[start * row_bytes:stop * row_bytes], filename)
    if not in_order:
        out[order] = buffer
    return out


def _read_exactly(handle: Any, target: memoryview, filename: str | Path) -> None:
    done = 0
    while done < len(target):
        count = handle.readinto(target[done:])
        if not count:
            raise DataError(f"data: {str(filename)!r} ended early (truncated while being read); re-create the file")
        done += count


def _load(source: np.ndarray | Path) -> np.ndarray:
    return np.load(source, mmap_mode="r", allow_pickle=False) if isinstance(source, Path) else source
