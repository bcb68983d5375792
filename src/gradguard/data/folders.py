"""Image folders: one subfolder per class (or ``train/`` and ``test/``, or ``test/`` alone, holding them), decoded
on access.

Files are listed when the folder is opened and decoded only when a sample is read; ``resize`` / ``center_crop``
bring photos of mixed sizes to one shape. Grayscale images in a colour
set are repeated to RGB. The channel count is chosen at open from a few images spread over the folder (colour if
any is), so a mostly-grayscale folder with rare colour images may fail on one; the error names it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .labels import CLASSES_FILE, GIVEN, match_subfolders, read_classes_file
from .samples import ImageTransform, SampleSet, split_info, split_rows

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
CHANNEL_PROBES = 8  # images decoded at open, spread over the folder, to choose 1 or 3 channels
RESIZE_HINT = "pass --resize H[,W] (resize=) and/or --center-crop H[,W] (center_crop=) to bring them to one size"


class FolderSampleSet(SampleSet):
    """Image files with their class labels; each file is decoded when its sample is read."""

    def __init__(self, name: str, classes: list[str], files: list[Path], labels: list[int],
                 transform: ImageTransform | None = None) -> None:
        self.files, self.labels = files, np.asarray(labels, dtype=np.int64)
        transform = transform or ImageTransform()
        if not transform:
            _check_one_size(files)
        probes = [read_image(file) for file in files[:: max(1, len(files) // CHANNEL_PROBES)][:CHANNEL_PROBES]]
        channels = max(probe.shape[0] for probe in probes)
        height, width = (transform(probes[0][None], str(files[0])) if transform else probes[0]).shape[-2:]
        super().__init__(name, classes, (channels, height, width), transform)

    def __len__(self) -> int:
        return len(self.files)

    def targets(self) -> Tensor:
        return torch.from_numpy(self.labels.copy())

    def _read(self, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        x = torch.stack([self._image(int(row)) for row in rows]) if len(rows) else torch.empty(0, *self.input_shape)
        return x, torch.from_numpy(self.labels[rows])

    def _image(self, row: int) -> Tensor:
        file = self.files[row]
        image = read_image(file)
        if self.transform:
            image = self.transform(image[None], str(file))[0]
        channels = self.input_shape[0]
        if image.shape[0] != channels:
            if image.shape[0] != 1:
                raise DataError(f"folder: {str(file)!r} is in colour but the images sampled when the folder was "
                                "opened are grayscale; convert the images to one colour mode (all RGB or all gray)")
            image = image.expand(channels, *image.shape[1:])
        if tuple(image.shape[1:]) != tuple(self.input_shape[1:]):
            raise DataError(f"folder: images differ in size ({tuple(self.input_shape[1:])} for "
                            f"{str(self.files[0])!r} vs {tuple(image.shape[1:])} for {str(file)!r}); {RESIZE_HINT}")
        return image


def open_folder(path: Path, split: str, transform: ImageTransform | None = None, test_fraction: float = 0.25,
                split_seed: int = 0, classes: list[str] | None = None) -> FolderSampleSet:
    """Open ``split`` of an image folder: its own ``train/``/``test/`` folders, a ``test/`` folder alone, or class
    subfolders without a split (``split="all"``: every image, in a seeded order; "train"/"test": a seeded split).

    Labels follow ``classes`` (a list of the subfolder names), else ``classes.txt`` in the folder, else the
    subfolder names in alphabetical order; ``class_source`` on the result says which.
    """
    if not path.is_dir():
        raise DataError(f"folder: no directory at {str(path)!r}; pass folder:PATH to a folder with one "
                        "subfolder of images per class")
    name = f"folder:{path}"
    layout = folder_layout(path)
    if layout == "split":
        if split == "all":
            raise ConfigError(f"split: {name} has its own train/ and test/ folders; choose --split test or train "
                              "(split='test' / 'train')")
        classes, source = folder_classes(path / "train", path, classes)
        files, labels = list_class_files(path / split, classes)
        info = split_info(name, split, len(files), how="own")
    elif layout == "test-only":
        if split == "train":
            raise DataError(f"folder: {str(path)!r} holds only a test/ folder, no training images; add a train/ "
                            "folder beside it (or train on another source)")
        classes, source = folder_classes(path / "test", path, classes)
        files, labels = list_class_files(path / "test", classes)
        info = split_info(name, split, len(files), how="test-only")
    else:
        classes, source = folder_classes(path, path, classes)
        files, labels = list_class_files(path, classes)
        rows = split_rows(len(files), split, test_fraction, split_seed)
        info = split_info(name, split, len(rows), how="all" if split == "all" else "seeded", total=len(files),
                          test_fraction=test_fraction, split_seed=split_seed)
        files, labels = [files[row] for row in rows], [labels[row] for row in rows]
    samples = FolderSampleSet(name, classes, files, labels, transform)
    samples.split_info, samples.class_source = info, source
    return samples


def folder_layout(path: Path) -> str:
    """"split" (train/ and test/), "test-only" (test/ is its only subfolder) or "flat" (class subfolders)."""
    if (path / "train").is_dir() and (path / "test").is_dir():
        return "split"
    subfolders = [p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return "test-only" if subfolders == ["test"] else "flat"


def folder_classes(class_root: Path, folder: Path, given: list[str] | None) -> tuple[list[str], str]:
    """The class order of a folder and where it came from: ``given``, else ``folder/classes.txt``, else alphabetical.

    A list must name every class subfolder of ``class_root`` once, nothing else."""
    found = class_names(class_root)
    if given is not None:
        match_subfolders(given, found, str(class_root), f"--classes (classes=) {','.join(given)}")
        return list(given), GIVEN
    listed = folder / CLASSES_FILE
    if listed.is_file():
        names = read_classes_file(listed)
        match_subfolders(names, found, str(class_root), repr(str(listed)))
        return names, str(listed)
    return found, "the subfolder names in alphabetical order"


def class_names(path: Path) -> list[str]:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"folder: {str(path)!r} has {len(classes)} class subfolder(s); put each class's images "
                        "in its own subfolder (at least two classes)")
    return classes


def list_class_files(path: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = path / name
        found = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not found:
            raise DataError(f"folder: class folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES[:3])}...)")
        files += found
        labels += [label] * len(found)
    return files, labels


def _check_one_size(files: list[Path]) -> None:
    """Compare every file's size from its header (no decoding), so a mixed folder fails at open, not mid-run."""
    from PIL import Image

    first_size = None
    for file in files:
        try:
            with Image.open(file) as image:
                size = image.size
        except Exception as error:  # truncated header, not an image
            raise DataError(f"folder: cannot decode image {str(file)!r} ({type(error).__name__}: {error}); the file "
                            "is corrupt — remove or replace it") from None
        if first_size is None:
            first_size = size
        elif size != first_size:
            raise DataError(f"folder: images differ in size ({first_size[1]}x{first_size[0]} for "
                            f"{str(files[0])!r} vs {size[1]}x{size[0]} for {str(file)!r}); {RESIZE_HINT}")


def read_image(path: Path) -> Tensor:
    """One image file as a float (C, H, W) tensor in [0, 1]; alpha is dropped, C is 1 or 3."""
    try:
        if path.suffix.lower() == ".png":
            import matplotlib.image

            array = np.asarray(matplotlib.image.imread(path))
        else:
            try:
                from PIL import Image
            except ImportError:
                raise DataError(f"folder: {str(path)!r} is not a PNG and Pillow is not installed; convert the images "
                                "to PNG or `pip install pillow`") from None
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    except DataError:
        raise
    except Exception as error:  # truncated or garbled image data
        raise DataError(f"folder: cannot decode image {str(path)!r} ({type(error).__name__}: {error}); the file is "
                        "corrupt — remove or replace it") from None
    if np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32) / (65535.0 if array.dtype == np.uint16 else 255.0)
    array = array.astype(np.float32)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        array = np.moveaxis(array[..., :3] if array.shape[-1] >= 3 else array[..., :1], -1, 0)
        if array.shape[0] == 3 and np.allclose(array[0], array[1]) and np.allclose(array[1], array[2]):
            array = array[:1]  # a grayscale image stored as RGB
    else:
        raise DataError(f"folder: image {str(path)!r} has unsupported shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array.clip(0.0, 1.0)))
