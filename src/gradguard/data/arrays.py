"""Array sources: the embedded digits, ``npz:`` archives (in memory) and ``npy:`` folders (memory-mapped)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .labels import CLASSES_FILE, GIVEN
from .samples import ArraySampleSet, ImageTransform, TensorSampleSet, split_info, split_rows, to_unit_images

DEFAULT_TEST_FRACTION = 0.25


# ------------------------------------------------------------------------------------------------
# digits: embedded default
# ------------------------------------------------------------------------------------------------
def open_digits(split: str, transform: ImageTransform | None = None, test_fraction: float = DEFAULT_TEST_FRACTION,
                split_seed: int = 0) -> TensorSampleSet:
    """scikit-learn's bundled 8x8 digits, with a fixed seeded 75/25 split (``split="all"``: all 1797)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), [0, 1]
    y = torch.tensor(bunch.target, dtype=torch.int64)
    rows = torch.from_numpy(split_rows(len(y), split, test_fraction, split_seed))
    samples = TensorSampleSet("digits", [str(i) for i in range(10)], x[rows], y[rows], transform)
    samples.split_info = split_info("digits", split, len(rows), how="all" if split == "all" else "fixed",
                                    total=len(y), test_fraction=test_fraction, split_seed=split_seed)
    samples.class_source = "the dataset's own"
    return samples


# ------------------------------------------------------------------------------------------------
# npz: one archive, decompressed into memory
# ------------------------------------------------------------------------------------------------
def open_npz(path: Path, split: str, transform: ImageTransform | None = None,
             test_fraction: float = DEFAULT_TEST_FRACTION, split_seed: int = 0,
             classes: list[str] | None = None) -> TensorSampleSet:
    """A ``.npz`` with ``x``, ``y`` (and optionally ``x_test``, ``y_test``, ``classes``), or ``x_test``, ``y_test``
    alone (a test split only), read without pickle. Without test arrays ``split="all"`` is every sample (in a
    seeded order) and "train"/"test" a seeded split. ``classes`` (names, label order) wins over the archive's."""
    name = f"npz:{path}"
    if not path.is_file():
        raise DataError(f"npz: no file at {str(path)!r}; pass npz:PATH to a .npz with arrays x and y")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as error:  # zipfile.BadZipFile, ValueError (pickled arrays), OSError, EOFError ...
        raise DataError(f"npz: cannot read {str(path)!r} ({type(error).__name__}: {error}); the file is corrupt "
                        "or not a NumPy .npz archive (object arrays are refused: save plain numeric arrays)") from None
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"npz: {str(path)!r} has only one of x_test / y_test; save both or neither")
    test_only = "x_test" in arrays and "x" not in arrays and "y" not in arrays
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing and not test_only:
        raise DataError(f"npz: {str(path)!r} lacks array(s) {missing}; found {sorted(arrays)} — save with "
                        "np.savez(path, x=images, y=labels[, x_test=..., y_test=...])")
    if test_only:
        if split == "train":
            raise DataError(f"npz: {str(path)!r} holds only x_test / y_test, no training arrays; save x and y too "
                            "(or train on another source)")
        x = x_test = _npz_images(arrays["x_test"], "x_test")
        y = y_test = _npz_labels(arrays["y_test"], "y_test", len(arrays["x_test"]))
        info = split_info(name, split, len(y_test), how="test-only")
    else:
        x, y = _npz_images(arrays["x"], "x"), _npz_labels(arrays["y"], "y", len(arrays["x"]))
    if "x_test" in arrays and not test_only:
        if split == "all":
            raise ConfigError(f"split: {name} has its own test arrays (x_test, y_test); choose --split test or "
                              "train (split='test' / 'train')")
        x_test = _npz_images(arrays["x_test"], "x_test")
        y_test = _npz_labels(arrays["y_test"], "y_test", len(arrays["x_test"]))
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"npz: x_test images {tuple(x_test.shape[1:])} differ from x images {tuple(x.shape[1:])}")
        info = split_info(name, split, len(y if split == "train" else y_test), how="own")
    elif not test_only:
        total = len(y)
        if split == "all":
            rows = torch.from_numpy(split_rows(total, "all", test_fraction, split_seed))
            x, y, x_test, y_test = x[rows], y[rows], x[rows], y[rows]
        else:
            test_rows = torch.from_numpy(split_rows(total, "test", test_fraction, split_seed))
            train_rows = torch.from_numpy(split_rows(total, "train", test_fraction, split_seed))
            x, y, x_test, y_test = x[train_rows], y[train_rows], x[test_rows], y[test_rows]
        info = split_info(name, split, len(y if split == "train" else y_test), how="all" if split == "all" else
                          "seeded", total=total, test_fraction=test_fraction, split_seed=split_seed)
    num_classes = int(max(y.max() if y.numel() else 0, y_test.max() if y_test.numel() else 0)) + 1
    if classes is not None:
        names, source = list(classes), GIVEN
        if len(names) < num_classes:
            raise ConfigError(f"classes: {len(names)} names given but the labels of {name} go up to {num_classes - 1}; "
                              "name every class, in label order")
    elif "classes" in arrays:
        names, source = [str(c) for c in arrays["classes"].tolist()], "the archive's 'classes' array"
    else:
        names, source = [str(i) for i in range(num_classes)], "label indices (no class names given)"
    if len(names) < num_classes:
        raise DataError(f"npz: 'classes' names {len(names)} classes but labels go up to {num_classes - 1}")
    samples = TensorSampleSet(name, names, x, y, transform) if split == "train" else TensorSampleSet(
        name, names, x_test, y_test, transform)
    samples.split_info, samples.class_source = info, source
    return samples


def _npz_images(array: np.ndarray, key: str) -> Tensor:
    layout = image_layout(array.shape, f"npz: array {key!r}")
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(f"npz: integer array {key!r} must hold 0..255 pixel values")
    elif not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"npz: array {key!r} has dtype {array.dtype}; expected uint8 (0..255) or float (0..1)")
    elif not np.isfinite(array).all():
        raise DataError(f"npz: array {key!r} contains NaN or inf")
    elif array.size and (array.min() < 0 or array.max() > 1):
        raise DataError(f"npz: float array {key!r} spans [{array.min():g}, {array.max():g}]; scale pixels to "
                        "[0, 1] (divide by 255) or store uint8")
    return to_unit_images(array, layout, f"npz: array {key!r}")


def _npz_labels(array: np.ndarray, key: str, n_images: int) -> Tensor:
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"npz: array {key!r} must be 1-D integer class indices, got {array.dtype} {array.shape}")
    if len(array) != n_images:
        raise DataError(f"npz: {key!r} has {len(array)} labels for {n_images} images")
    if array.size and array.min() < 0:
        raise DataError(f"npz: array {key!r} has negative labels; use class indices 0..K-1")
    return torch.from_numpy(array.astype(np.int64))


def image_layout(shape: tuple[int, ...], what: str) -> str:
    """NHW for 3-D arrays; NCHW when dim 1 is 1 or 3; NHWC when only the last dim is 1 or 3."""
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4 and shape[1] in (1, 3):
        return "NCHW"
    if len(shape) == 4 and shape[-1] in (1, 3):
        return "NHWC"
    raise DataError(f"{what} has shape {shape}; expected images (N, H, W), (N, C, H, W) or (N, H, W, C) "
                    "with C = 1 or 3")


# ------------------------------------------------------------------------------------------------
# npy: a folder of memory-mapped arrays
# ------------------------------------------------------------------------------------------------
def open_npy(folder: Path, split: str, transform: ImageTransform | None = None,
             test_fraction: float = DEFAULT_TEST_FRACTION, split_seed: int = 0,
             classes: list[str] | None = None) -> ArraySampleSet:
    """``DIR/x.npy``, ``DIR/y.npy`` (optionally ``x_test.npy``, ``y_test.npy``, ``classes.txt``), or ``x_test.npy``,
    ``y_test.npy`` alone (a test split only), memory-mapped.

    Shapes, dtypes and lengths are checked here; pixel values are checked per batch as they are read.
    Without test arrays ``split="all"`` is every row of ``x.npy`` (in a seeded order) and "train"/"test" a seeded
    index split. ``classes`` (names, label order) wins over ``classes.txt``.
    """
    name = f"npy:{folder}"
    if not folder.is_dir():
        raise DataError(f"npy: no directory at {str(folder)!r}; pass npy:DIR to a folder holding x.npy and y.npy")
    has_test = [(folder / f"{key}.npy").is_file() for key in ("x_test", "y_test")]
    if any(has_test) and not all(has_test):
        raise DataError(f"npy: {str(folder)!r} has only one of x_test.npy / y_test.npy; save both or neither")
    test_only = all(has_test) and not any((folder / f"{key}.npy").is_file() for key in ("x", "y"))
    if test_only and split == "train":
        raise DataError(f"npy: {str(folder)!r} holds only x_test.npy / y_test.npy, no training arrays; save x.npy "
                        "and y.npy too (or train on another source)")
    if all(has_test) and not test_only and split == "all":
        raise ConfigError(f"split: {name} has its own test arrays (x_test.npy, y_test.npy); choose --split test or "
                          "train (split='test' / 'train')")
    pairs = ({} if test_only else {"train": ("x", "y")}) | ({"test": ("x_test", "y_test")} if all(has_test) else {})
    layouts, label_max = {}, -1
    for images_key, labels_key in pairs.values():
        images = _map_npy(folder, images_key)
        labels = _map_npy(folder, labels_key)
        layouts[images_key] = _check_npy_pair(folder, images_key, images, labels_key, labels)
        if labels.size:
            label_max = max(label_max, int(labels.max()))
    if all(has_test) and not test_only:
        train_shape, test_shape = (_chw(_map_npy(folder, k).shape, layouts[k]) for k in ("x", "x_test"))
        if train_shape != test_shape:
            raise DataError(f"npy: x_test.npy images {test_shape} differ from x.npy images {train_shape} "
                            f"(as C, H, W) in {str(folder)!r}")
    names, source = _npy_classes(folder, label_max + 1, classes)
    if all(has_test):
        (images_key, labels_key), rows = pairs["train" if split == "train" else "test"], None
        info = split_info(name, split, len(_map_npy(folder, labels_key)), how="test-only" if test_only else "own")
    else:  # one set of arrays: the split is a seeded index split, nothing is copied
        (images_key, labels_key) = pairs["train"]
        total = len(_map_npy(folder, "y"))
        rows = split_rows(total, split, test_fraction, split_seed)
        info = split_info(name, split, len(rows), how="all" if split == "all" else "seeded", total=total,
                          test_fraction=test_fraction, split_seed=split_seed)
    samples = ArraySampleSet(name, names, folder / f"{images_key}.npy", folder / f"{labels_key}.npy",
                             layout=layouts[images_key], rows=rows, transform=transform,
                             source=str(folder / f"{images_key}.npy"))
    samples.split_info, samples.class_source = info, source
    return samples


def _map_npy(folder: Path, key: str) -> np.ndarray:
    path = folder / f"{key}.npy"
    if not path.is_file():
        raise DataError(f"npy: {str(path)!r} is missing; npy:DIR needs x.npy and y.npy (np.save(DIR/'x.npy', images))")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # ValueError (object arrays / bad header), OSError, EOFError ...
        raise DataError(f"npy: cannot map {str(path)!r} ({type(error).__name__}: {error}); the file is truncated, "
                        "corrupt or holds objects — save plain numeric arrays with np.save") from None


def _check_npy_pair(folder: Path, images_key: str, images: np.ndarray, labels_key: str, labels: np.ndarray) -> str:
    where = f"npy: {str(folder / (images_key + '.npy'))!r}"
    layout = image_layout(images.shape, where)
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise DataError(f"{where} has dtype {images.dtype}; expected uint8 (0..255) or float (0..1)")
    labels_file = str(folder / f"{labels_key}.npy")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"npy: {labels_file!r} must be 1-D integer class indices, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"npy: {labels_file!r} has {len(labels)} labels for {len(images)} images")
    if labels.size and labels.min() < 0:
        raise DataError(f"npy: {labels_file!r} has negative labels; use class indices 0..K-1")
    return layout


def _chw(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "NHW":
        return (1, *shape[1:])
    return tuple(shape[1:]) if layout == "NCHW" else (shape[3], shape[1], shape[2])


def _npy_classes(folder: Path, num_classes: int, given: list[str] | None = None) -> tuple[list[str], str]:
    """Class names in label order and where they came from: ``given``, else ``classes.txt``, else the indices."""
    if given is not None:
        if len(given) < num_classes:
            raise ConfigError(f"classes: {len(given)} names given but the labels in {str(folder)!r} go up to "
                              f"{num_classes - 1}; name every class, in label order")
        return list(given), GIVEN
    path = folder / CLASSES_FILE
    if not path.is_file():
        return [str(i) for i in range(num_classes)], "label indices (no class names given)"
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) < num_classes:
        raise DataError(f"npy: {str(path)!r} names {len(names)} classes but labels go up to {num_classes - 1}; "
                        "write one class name per line")
    return names, str(path)
