"""MNIST and Fashion-MNIST: LeCun's IDX files (gzip or raw), found on a search path.

The images are small (60k x 28 x 28 bytes), so a split is read into memory as uint8 and turned into floats
batch by batch.
"""
from __future__ import annotations

import gzip
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from .samples import ArraySampleSet, ImageTransform

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
CLASSES = {"fashion-mnist": FASHION_MNIST_CLASSES, "mnist": [str(i) for i in range(10)]}
HOW_TO_GET = {
    "fashion-mnist": "install them with `apt-get install -y dataset-fashion-mnist` or set GRADGUARD_DATA to",
    "mnist": "download them from the MNIST page (or its mirrors) and pass --data-root / root= or set "
             "GRADGUARD_DATA to",
}

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzip-compressed or raw; DataError if corrupt or truncated."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except OSError as error:  # includes gzip.BadGzipFile
        raise DataError(f"path: cannot read {str(path)!r} ({error}); re-download the file") from None
    except (EOFError, zlib.error) as error:
        raise DataError(f"path: {str(path)!r} is a truncated or corrupt gzip file ({error}); re-download it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"path: {str(path)!r} is not an IDX file (bad magic number); expected MNIST-style IDX data")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"path: {str(path)!r} is truncated (header cut short); re-download it")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise DataError(f"path: {str(path)!r} holds {len(raw) - header_size} data bytes but its header announces "
                        f"shape {shape} ({expected} bytes); the file is truncated or corrupt — re-download it")
    return np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)


def idx_search_path(dataset: str, root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for a dataset's IDX files, in order: root, $GRADGUARD_DATA/<dataset>, $GRADGUARD_DATA,
    then /usr/share/datasets/<dataset>."""
    package = sys.modules[__package__]  # read on the package, so tests and users can redirect them there
    folders: list[Path] = []
    if root is not None:
        folders.append(Path(root).expanduser())
    env = os.environ.get(package.DATA_ENV)
    if env:
        folders += [Path(env).expanduser() / dataset, Path(env).expanduser()]
    folders.append(Path(package.SYSTEM_DATA_DIR) / dataset)
    return folders


def fashion_mnist_search_path(root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for the Fashion-MNIST IDX files, in order."""
    return idx_search_path("fashion-mnist", root)


def find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def open_idx(dataset: str, split: str, root: str | os.PathLike | None = None,
             transform: ImageTransform | None = None) -> ArraySampleSet:
    """Open one split of ``dataset`` ("mnist" or "fashion-mnist"): its two IDX files, read into memory."""
    images_stem, labels_stem = IDX_FILES[f"x_{split}"], IDX_FILES[f"y_{split}"]
    searched = idx_search_path(dataset, root)
    folder = next((f for f in searched if find_idx(f, images_stem)), None)
    if folder is None:
        raise DataError(
            f"{dataset}: IDX files not found in " + ", ".join(str(f) for f in searched)
            + f"; {HOW_TO_GET[dataset]} the folder holding " + ", ".join(f"{s}.gz" for s in IDX_FILES.values()))
    labels_path = find_idx(folder, labels_stem)
    if labels_path is None:
        raise DataError(f"{dataset}: {labels_stem}.gz is missing from {str(folder)!r}; the folder needs all four "
                        "IDX files (reinstall or re-download)")
    images_path = find_idx(folder, images_stem)
    assert images_path is not None  # found above
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{dataset}: {split} images {images.shape} and labels {labels.shape} do not match; "
                        f"the files in {str(folder)!r} are corrupt — re-download them")
    if labels.size and int(labels.max()) >= 10:
        raise DataError(f"{dataset}: {split} labels exceed 9 in {str(folder)!r}; the files are corrupt")
    return ArraySampleSet(dataset, CLASSES[dataset], images, labels, layout="NHW", transform=transform,
                          source=str(images_path))
