"""CIFAR-10 / CIFAR-100 from the official *binary* archives, memory-mapped record by record.

Krizhevsky (2009). A record is ``label_bytes`` label bytes (CIFAR-10: the class; CIFAR-100: coarse, fine) and
3072 pixel bytes, 3 x 32 x 32 in CHW order. Files: CIFAR-10 ``data_batch_1..5.bin``, ``test_batch.bin``,
``batches.meta.txt``; CIFAR-100 ``train.bin``, ``test.bin``, ``fine_label_names.txt``. The pickled "python
version" is refused: unpickling a download runs whatever code it holds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .samples import ImageTransform, SampleSet, read_rows, to_unit_images

PIXELS = 3 * 32 * 32
LABEL_CHUNK = 2048  # records per read when only the labels are wanted
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass(frozen=True)
class CifarFormat:
    name: str
    files: dict[str, tuple[str, ...]]
    label_bytes: int
    label_offset: int  # which label byte is the class: CIFAR-100's fine label
    num_classes: int
    names_file: str
    folder: str  # the archive's folder name, also looked for inside root
    archive: str
    pickled_folder: str  # the Python version's folder name, refused with a pointer to the binary one


CIFAR10 = CifarFormat("cifar10", {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                                  "test": ("test_batch.bin",)},
                      1, 0, 10, "batches.meta.txt", "cifar-10-batches-bin", "cifar-10-binary.tar.gz",
                      "cifar-10-batches-py")
CIFAR100 = CifarFormat("cifar100", {"train": ("train.bin",), "test": ("test.bin",)},
                       2, 1, 100, "fine_label_names.txt", "cifar-100-binary", "cifar-100-binary.tar.gz",
                       "cifar-100-python")
FORMATS = {"cifar10": CIFAR10, "cifar100": CIFAR100}
PICKLED_MARKERS = ("data_batch_1", "test_batch", "batches.meta", "meta", "train", "test")


class CifarSampleSet(SampleSet):
    """One CIFAR split over its batch files; each file is memory-mapped (lazily, per process) as records."""

    def __init__(self, form: CifarFormat, classes: list[str], files: list[Path],
                 transform: ImageTransform | None = None) -> None:
        self.form, self.files = form, files
        record = form.label_bytes + PIXELS
        counts = [_record_count(file, record) for file in files]
        self._offsets = np.cumsum([0, *counts])
        self._maps: list[np.memmap] | None = None
        transform = transform or ImageTransform()
        shape = tuple(transform(torch.zeros(1, 3, 32, 32), str(files[0])).shape[1:]) if transform else (3, 32, 32)
        super().__init__(form.name, classes, shape, transform)

    @property
    def record_maps(self) -> list[np.memmap]:
        """One (records, label_bytes + 3072) uint8 memory map per batch file."""
        if self._maps is None:
            record = self.form.label_bytes + PIXELS
            self._maps = [np.memmap(file, dtype=np.uint8, mode="r", shape=(int(count), record))
                          for file, count in zip(self.files, np.diff(self._offsets), strict=True)]
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}  # workers map the files themselves

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def targets(self) -> Tensor:
        """Labels only: read in chunks of records, so the pass never holds a whole batch file."""
        labels = []
        for records in self.record_maps:
            for start in range(0, len(records), LABEL_CHUNK):
                chunk = read_rows(records, np.arange(start, min(start + LABEL_CHUNK, len(records))))
                labels.append(chunk[:, self.form.label_offset])
        return torch.from_numpy(np.concatenate(labels).astype(np.int64))

    def _read(self, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        maps = self.record_maps
        records = np.empty((len(rows), self.form.label_bytes + PIXELS), dtype=np.uint8)
        file_of_row = np.searchsorted(self._offsets, rows, side="right") - 1
        for file_index in np.unique(file_of_row):
            chosen = file_of_row == file_index
            records[chosen] = read_rows(maps[file_index], rows[chosen] - self._offsets[file_index])
        labels = records[:, self.form.label_offset].astype(np.int64)
        if labels.size and labels.max() >= self.form.num_classes:
            bad = self.files[int(file_of_row[int(np.argmax(labels))])]
            raise DataError(f"{self.form.name}: {str(bad)!r} holds label {labels.max()} (>= "
                            f"{self.form.num_classes}); the file is corrupt or another format — re-download "
                            f"{self.form.archive}")
        pixels = records[:, self.form.label_bytes:].reshape(-1, 3, 32, 32)
        x = to_unit_images(pixels, "NCHW", self.form.name)
        if self.transform:
            x = self.transform(x, self.form.name)
        return x, torch.from_numpy(labels)


def open_cifar(name: str, split: str, root: str | os.PathLike | None,
               transform: ImageTransform | None = None) -> CifarSampleSet:
    """Open ``split`` of CIFAR-10/100 from the binary archive's folder ``root`` (or ``$GRADGUARD_DATA``)."""
    form = FORMATS[name]
    folder = find_cifar_folder(form, root)
    files = [folder / file for file in form.files[split]]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise DataError(f"{form.name}: {missing} missing from {str(folder)!r}; the folder must hold "
                        f"{', '.join(form.files['train'] + form.files['test'])} — extract {form.archive} there")
    return CifarSampleSet(form, class_names(form, folder), files, transform)


def find_cifar_folder(form: CifarFormat, root: str | os.PathLike | None) -> Path:
    candidates: list[Path] = []
    if root is not None:
        candidates += [Path(root).expanduser(), Path(root).expanduser() / form.folder]
    env = os.environ.get("GRADGUARD_DATA")
    if env:
        candidates += [Path(env).expanduser() / form.folder, Path(env).expanduser()]
    for folder in candidates:
        if (folder / form.files["test"][0]).is_file() or (folder / form.files["train"][0]).is_file():
            return folder
    for folder in candidates:
        _refuse_pickled(form, folder)
        _refuse_pickled(form, folder / form.pickled_folder)
    where = ", ".join(str(c) for c in candidates) or "nowhere (no root given and GRADGUARD_DATA unset)"
    raise DataError(f"{form.name}: binary batch files not found in {where}; pass --data-root (root=) the folder "
                    f"{form.folder}/ extracted from {form.archive} (holding {form.files['test'][0]})")


def _refuse_pickled(form: CifarFormat, folder: Path) -> None:
    if folder.is_dir() and (folder.name.endswith("-py") or folder.name.endswith("-python")
                            or any((folder / marker).is_file() for marker in PICKLED_MARKERS)):
        raise DataError(f"{form.name}: {str(folder)!r} is the pickled Python version, which gradguard never "
                        f"loads (unpickling can run code); download the binary version {form.archive} and pass "
                        f"its folder {form.folder}/")


def _record_count(file: Path, record: int) -> int:
    size = file.stat().st_size
    if size == 0 or size % record:
        raise DataError(f"cifar: {str(file)!r} is {size} bytes, not a whole number of {record}-byte records "
                        f"(label + 3072 pixels); the file is truncated or corrupt — re-download and extract it")
    return size // record


def class_names(form: CifarFormat, folder: Path) -> list[str]:
    """Class names from the archive's names file; the published names (CIFAR-10) or indices when absent."""
    path = folder / form.names_file
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        names = [name for name in names if name]
        if len(names) == form.num_classes:
            return names
    return list(CIFAR10_CLASSES) if form is CIFAR10 else [str(i) for i in range(form.num_classes)]
