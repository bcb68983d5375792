"""Named datasets in pixel space [0, 1] shaped (N, C, H, W): in memory (``load_dataset``) or streamed (``open_split``).

Names accepted by both:

* ``"digits"`` — the embedded default (scikit-learn's bundled 8x8 digits), fixed 75/25 split.
* ``"mnist"`` / ``"fashion-mnist"`` — the four IDX files (gzip or raw) of LeCun et al. (1998) / Xiao et al.
  (2017), looked up in ``root``, then ``$GRADGUARD_DATA/<name>/``, ``$GRADGUARD_DATA``, then
  ``/usr/share/datasets/<name>`` (Debian's ``dataset-fashion-mnist`` package installs the latter).
* ``"cifar10"`` / ``"cifar100"`` — the official *binary* archives' folder (``cifar-10-batches-bin``,
  ``cifar-100-binary``) given by ``root``, memory-mapped; the pickled Python version is refused.
* ``"npz:PATH"`` — a NumPy ``.npz`` with ``x``, ``y`` and optionally ``x_test``, ``y_test``, ``classes``
  (read with ``allow_pickle=False``, into memory); or ``x_test``, ``y_test`` alone.
* ``"npy:DIR"`` — ``x.npy``, ``y.npy`` and optionally ``x_test.npy``, ``y_test.npy``, ``classes.txt``,
  memory-mapped; uint8 0..255 or float 0..1, NCHW, NHWC or (N, H, W); or ``x_test.npy``, ``y_test.npy`` alone.
* ``"folder:PATH"`` — one subfolder per class (or ``train/`` and ``test/``, or ``test/`` alone, holding them),
  decoded on access; ``resize`` / ``center_crop`` bring photos of mixed sizes to one shape; the class order is
  ``classes=``, else ``classes.txt`` in the folder, else alphabetical.

Sources without a test split of their own give ``split="all"`` (every sample, in a seeded order) or a seeded
split for "train" / "test" (``test_fraction=0.25``, ``split_seed=0``); a set's ``split_info`` says which, with
its counts. Missing, corrupt or truncated files raise ``DataError`` with a message that says how to fix it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .arrays import DEFAULT_TEST_FRACTION, open_digits, open_npy, open_npz
from .cifar import CIFAR10_CLASSES, open_cifar
from .folders import IMAGE_SUFFIXES, folder_layout, open_folder, read_image
from .idx import FASHION_MNIST_CLASSES, fashion_mnist_search_path, idx_search_path, open_idx, read_idx
from .idx import IDX_FILES as FASHION_MNIST_FILES
from .labels import chance_threshold, chance_warning, mapping_text, parse_classes
from .samples import ArraySampleSet, ImageTransform, SampleSet, TensorSampleSet, split_info

__all__ = [
    "Dataset", "SampleSet", "ArraySampleSet", "TensorSampleSet", "ImageTransform", "load_dataset", "open_split",
    "list_datasets", "read_idx", "read_image", "fashion_mnist_search_path", "idx_search_path",
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_FILES", "CIFAR10_CLASSES", "IMAGE_SUFFIXES", "DEFAULT_TEST_FRACTION",
    "SYSTEM_DATA_DIR", "DATA_ENV", "SPLITS", "SPLIT_CHOICES", "has_own_split", "parse_classes", "mapping_text",
    "chance_threshold", "chance_warning",
]

SYSTEM_DATA_DIR = Path("/usr/share/datasets")  # read at call time by idx_search_path: patch it here
DATA_ENV = "GRADGUARD_DATA"
SPLITS = ("train", "test")
SPLIT_CHOICES = ("all", "test", "train")  # "all": every sample of a source without a train/test split of its own
BUILT_IN = ("digits", "fashion-mnist", "fmnist", "mnist", "cifar10", "cifar-10", "cifar100", "cifar-100")
SPLIT_OPTIONS = ("test_fraction", "split_seed")  # for sources without a test split of their own
READ_CHUNK_BYTES = 32 * 1024 * 1024  # per get_batch when load_dataset fills its tensors: small temporaries


@dataclass
class Dataset:
    """Train and test tensors in pixel space [0, 1], images shaped (N, C, H, W), labels int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: list[str]
    split_info: dict = field(default_factory=dict)  # {"train": ..., "test": ...}: which samples and why
    class_source: str = ""  # where the class order came from

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def list_datasets() -> list[str]:
    """Names (and name patterns) accepted by ``load_dataset`` and ``open_split``."""
    return ["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "npz:PATH", "npy:DIR", "folder:PATH"]


def open_split(name: str, split: str = "test", root: str | os.PathLike | None = None, *, resize: Any = None,
               center_crop: Any = None, classes: str | Sequence[str] | None = None, **kwargs: Any) -> SampleSet:
    """One split ("train", "test" or "all") of a dataset as a ``SampleSet``, read batch by batch, never whole.

    ``root`` is the folder of the IDX files or CIFAR batches (the CLI's ``--data-root``); ``resize`` (``H`` or
    ``(H, W)``) and ``center_crop`` are applied as samples are read; ``kwargs`` (``test_fraction``,
    ``split_seed``) shape the seeded split of sources that ship without one. ``"all"`` is every sample of a source
    without a split of its own (or of a test-only one), refused for a source with both. ``classes`` (a list, or
    "a,b,c") sets the label order of a folder (it must name every class subfolder) or names an npy/npz source's
    labels. The result's ``split_info`` says which samples it holds and why, ``class_source`` where the class
    order came from.
    """
    if split not in SPLIT_CHOICES:
        raise DataError(f"split: expected 'all', 'test' or 'train', got {split!r}")
    transform = ImageTransform.of(resize, center_crop)
    if not isinstance(name, str) or not name:
        raise DataError(f"name: expected a dataset name such as 'digits', got {name!r}; choose one of {list_datasets()}")
    unknown = sorted(set(kwargs) - set(SPLIT_OPTIONS))
    if unknown:
        raise ConfigError(f"{unknown}: unknown dataset option(s); the options are resize, center_crop, classes and, "
                          f"for data without a test split, {', '.join(SPLIT_OPTIONS)}")
    names = parse_classes(classes)
    key = name.lower().replace("_", "-")
    if key in BUILT_IN:
        if kwargs and key != "digits":
            raise ConfigError(f"{sorted(kwargs)}: {name} ships its own train/test split and takes no such option; "
                              "remove it")
        if names is not None:
            raise ConfigError(f"classes: {name} names its own classes; --classes (classes=) is for folder:, npy: "
                              "and npz: sources")
        if split == "all" and key != "digits":
            raise ConfigError(f"split: {name} ships its own train/test split; choose --split test or train "
                              "(split='test' / 'train')")
    if key == "digits":
        return open_digits(split, transform, **kwargs)
    if key in ("fashion-mnist", "fmnist", "mnist"):
        samples = open_idx("mnist" if key == "mnist" else "fashion-mnist", split, root, transform)
        return _own_split(samples, name, split)
    if key.replace("-", "") in ("cifar10", "cifar100"):
        return _own_split(open_cifar(key.replace("-", ""), split, root, transform), name, split)
    for prefix, opener in (("npz:", open_npz), ("npy:", open_npy), ("folder:", open_folder)):
        if name.startswith(prefix):
            return opener(Path(name[len(prefix):]).expanduser(), split, transform, classes=names, **kwargs)
    raise DataError(f"name: unknown dataset {name!r}; choose one of {list_datasets()}")


def _own_split(samples: SampleSet, name: str, split: str) -> SampleSet:
    samples.split_info = split_info(name, split, len(samples), how="own")
    samples.class_source = "the dataset's own"
    return samples


def has_own_split(name: str) -> bool:
    """Whether a source comes with a test split (its own files or folders, a test-only layout, or digits' fixed
    split); False for a flat folder, ``npy:`` / ``npz:`` without test arrays — and for a path that does not exist
    (opening it then says what is missing)."""
    key = name.lower().replace("_", "-") if isinstance(name, str) else ""
    if key in BUILT_IN:
        return True
    for prefix in ("npz:", "npy:", "folder:"):
        if isinstance(name, str) and name.startswith(prefix):
            path = Path(name[len(prefix):]).expanduser()
            if prefix == "npy:":
                return (path / "x_test.npy").is_file()
            if prefix == "folder:":
                return path.is_dir() and folder_layout(path) != "flat"
            try:
                with np.load(path, allow_pickle=False) as archive:
                    return "x_test" in archive.files
            except Exception:  # missing or corrupt: open_split names the problem
                return False
    return True


def load_dataset(name: str = "digits", root: str | os.PathLike | None = None, *, resize: Any = None,
                 center_crop: Any = None, classes: str | Sequence[str] | None = None, **kwargs: Any) -> Dataset:
    """Both splits of a dataset as in-memory tensors (for training); the same samples ``open_split`` streams.

    Arguments as for ``open_split``.
    """
    train, test = (open_split(name, split, root, resize=resize, center_crop=center_crop, classes=classes, **kwargs)
                   for split in SPLITS)
    if train.input_shape != test.input_shape:
        raise DataError(f"{name}: test images {test.input_shape} differ from train images {train.input_shape}; "
                        "pass resize= / center_crop= (--resize / --center-crop) to bring them to one size")
    return Dataset(train.name, *read_all(train), *read_all(test), train.classes,
                   {"train": train.split_info, "test": test.split_info}, train.class_source)


def read_all(samples: SampleSet, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Every sample of a ``SampleSet`` as (x, y) tensors, read ``chunk`` samples (default: 32 MB) at a time."""
    chunk = chunk or max(1, READ_CHUNK_BYTES // (4 * int(np.prod(samples.input_shape))))
    x = torch.empty((len(samples), *samples.input_shape), dtype=torch.float32)
    y = torch.empty(len(samples), dtype=torch.int64)
    for start in range(0, len(samples), chunk):
        stop = min(start + chunk, len(samples))
        x[start:stop], y[start:stop] = samples.get_batch(np.arange(start, stop))
    return x, y
