"""Named datasets, all as ``Dataset`` tensors in pixel space [0, 1] shaped (N, C, H, W).

``load_dataset(name, root=None)`` accepts:

* ``"digits"`` — the embedded default (scikit-learn's bundled 8x8 digits), fixed 75/25 split.
* ``"fashion-mnist"`` — the four IDX gzip files of Xiao et al. (2017), looked up in ``root``, then
  ``$GRADGUARD_DATA`` (and its ``fashion-mnist/`` subfolder), then ``/usr/share/datasets/fashion-mnist``
  (Debian's ``dataset-fashion-mnist`` package).
* ``"npz:PATH"`` — a NumPy ``.npz`` file with arrays ``x``, ``y`` and optionally ``x_test``, ``y_test``
  and ``classes``; it is read with ``allow_pickle=False``.
* ``"folder:PATH"`` — an image folder with one subfolder per class (or ``train/`` and ``test/`` folders
  that each hold the class subfolders); PNG via matplotlib, other formats via Pillow when installed.

Missing, corrupt or truncated files raise ``DataError`` with a message that says how to fix it.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}
SYSTEM_DATA_DIR = Path("/usr/share/datasets")
DATA_ENV = "GRADGUARD_DATA"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_TEST_FRACTION = 0.25


@dataclass
class Dataset:
    """Train and test tensors in pixel space [0, 1], images shaped (N, C, H, W), labels int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: list[str]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def list_datasets() -> list[str]:
    """Names (and name patterns) accepted by ``load_dataset``."""
    return ["digits", "fashion-mnist", "npz:PATH", "folder:PATH"]


def load_dataset(name: str = "digits", root: str | os.PathLike | None = None, **kwargs) -> Dataset:
    """Load a dataset by name: "digits", "fashion-mnist", "npz:PATH" or "folder:PATH" (see the module doc).

    ``root`` is the folder holding Fashion-MNIST's IDX files; ``kwargs`` go to the loader
    (``test_fraction``/``split_seed`` for digits, npz files without a test split and flat folders).
    """
    if not isinstance(name, str) or not name:
        raise DataError(f"name: expected a dataset name such as 'digits', got {name!r}; choose one of {list_datasets()}")
    if name == "digits":
        return _digits(**kwargs)
    if name.lower().replace("_", "-") in ("fashion-mnist", "fmnist"):
        return _fashion_mnist(root, **kwargs)
    if name.startswith("npz:"):
        return _npz(Path(name[4:]).expanduser(), **kwargs)
    if name.startswith("folder:"):
        return _folder(Path(name[7:]).expanduser(), **kwargs)
    raise DataError(f"name: unknown dataset {name!r}; choose one of {list_datasets()}")


# ------------------------------------------------------------------------------------------------
# digits: embedded default
# ------------------------------------------------------------------------------------------------
def _digits(test_fraction: float = DEFAULT_TEST_FRACTION, split_seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), [0, 1]
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(split_seed).permutation(len(y)))  # fixed split
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], [str(i) for i in range(10)])


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files
# ------------------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
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


def fashion_mnist_search_path(root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for the Fashion-MNIST IDX files, in order."""
    folders: list[Path] = []
    if root is not None:
        folders.append(Path(root).expanduser())
    env = os.environ.get(DATA_ENV)
    if env:
        folders += [Path(env).expanduser() / "fashion-mnist", Path(env).expanduser()]
    folders.append(SYSTEM_DATA_DIR / "fashion-mnist")
    return folders


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist(root: str | os.PathLike | None = None) -> Dataset:
    searched = fashion_mnist_search_path(root)
    folder = next((f for f in searched if _find_idx(f, FASHION_MNIST_FILES["x_train"])), None)
    if folder is None:
        raise DataError(
            "fashion-mnist: IDX files not found in " + ", ".join(str(f) for f in searched)
            + "; install them with `apt-get install -y dataset-fashion-mnist` or set GRADGUARD_DATA to the folder "
            "holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            "t10k-labels-idx1-ubyte.gz")
    arrays = {}
    for key, stem in FASHION_MNIST_FILES.items():
        path = _find_idx(folder, stem)
        if path is None:
            raise DataError(f"fashion-mnist: {stem}.gz is missing from {str(folder)!r}; the folder needs all four "
                            "IDX files (reinstall dataset-fashion-mnist or re-download)")
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"fashion-mnist: {split} images {images.shape} and labels {labels.shape} do not match; "
                            f"the files in {str(folder)!r} are corrupt — re-download them")
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"fashion-mnist: {split} labels exceed 9 in {str(folder)!r}; the files are corrupt")
    return Dataset("fashion-mnist", _to_images(arrays["x_train"]), _to_labels(arrays["y_train"]),
                   _to_images(arrays["x_test"]), _to_labels(arrays["y_test"]), list(FASHION_MNIST_CLASSES))


# ------------------------------------------------------------------------------------------------
# npz files
# ------------------------------------------------------------------------------------------------
def _npz(path: Path, test_fraction: float = DEFAULT_TEST_FRACTION, split_seed: int = 0) -> Dataset:
    if not path.is_file():
        raise DataError(f"npz: no file at {str(path)!r}; pass npz:PATH to a .npz with arrays x and y")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as error:  # zipfile.BadZipFile, ValueError (pickled arrays), OSError, EOFError ...
        raise DataError(f"npz: cannot read {str(path)!r} ({type(error).__name__}: {error}); the file is corrupt "
                        "or not a NumPy .npz archive (object arrays are refused: save plain numeric arrays)") from None
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise DataError(f"npz: {str(path)!r} lacks array(s) {missing}; found {sorted(arrays)} — save with "
                        "np.savez(path, x=images, y=labels[, x_test=..., y_test=...])")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"npz: {str(path)!r} has only one of x_test / y_test; save both or neither")
    x, y = _npz_images(arrays["x"], "x"), _npz_labels(arrays["y"], "y", len(arrays["x"]))
    if "x_test" in arrays:
        x_test = _npz_images(arrays["x_test"], "x_test")
        y_test = _npz_labels(arrays["y_test"], "y_test", len(arrays["x_test"]))
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"npz: x_test images {tuple(x_test.shape[1:])} differ from x images {tuple(x.shape[1:])}")
    else:
        (x, y), (x_test, y_test) = _split(x, y, test_fraction, split_seed)
    num_classes = int(max(y.max(), y_test.max() if y_test.numel() else 0)) + 1
    classes = [str(c) for c in arrays["classes"].tolist()] if "classes" in arrays else [str(i) for i in range(num_classes)]
    if len(classes) < num_classes:
        raise DataError(f"npz: 'classes' names {len(classes)} classes but labels go up to {num_classes - 1}")
    return Dataset(f"npz:{path}", x, y, x_test, y_test, classes)


def _npz_images(array: np.ndarray, key: str) -> Tensor:
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = np.moveaxis(array, -1, 1)  # NHWC -> NCHW
    elif array.ndim != 4:
        raise DataError(f"npz: array {key!r} has shape {array.shape}; expected images (N, H, W), (N, C, H, W) "
                        "or (N, H, W, C)")
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(f"npz: integer array {key!r} must hold 0..255 pixel values")
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"npz: array {key!r} has dtype {array.dtype}; expected uint8 (0..255) or float (0..1)")
    if not np.isfinite(array).all():
        raise DataError(f"npz: array {key!r} contains NaN or inf")
    if array.size and (array.min() < 0 or array.max() > 1):
        raise DataError(f"npz: float array {key!r} spans [{array.min():g}, {array.max():g}]; scale pixels to "
                        "[0, 1] (divide by 255) or store uint8")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _npz_labels(array: np.ndarray, key: str, n_images: int) -> Tensor:
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"npz: array {key!r} must be 1-D integer class indices, got {array.dtype} {array.shape}")
    if len(array) != n_images:
        raise DataError(f"npz: {key!r} has {len(array)} labels for {n_images} images")
    if array.size and array.min() < 0:
        raise DataError(f"npz: array {key!r} has negative labels; use class indices 0..K-1")
    return torch.from_numpy(array.astype(np.int64))


# ------------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------------
def _folder(path: Path, test_fraction: float = DEFAULT_TEST_FRACTION, split_seed: int = 0) -> Dataset:
    if not path.is_dir():
        raise DataError(f"folder: no directory at {str(path)!r}; pass folder:PATH to a folder with one "
                        "subfolder of images per class")
    if (path / "train").is_dir() and (path / "test").is_dir():
        classes = _class_names(path / "train")
        x, y = _read_class_folders(path / "train", classes)
        x_test, y_test = _read_class_folders(path / "test", classes)
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"folder: test images {tuple(x_test.shape[1:])} differ in size from train images "
                            f"{tuple(x.shape[1:])}")
    else:
        classes = _class_names(path)
        x, y = _read_class_folders(path, classes)
        (x, y), (x_test, y_test) = _split(x, y, test_fraction, split_seed)
    return Dataset(f"folder:{path}", x, y, x_test, y_test, classes)


def _class_names(path: Path) -> list[str]:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"folder: {str(path)!r} has {len(classes)} class subfolder(s); put each class's images "
                        "in its own subfolder (at least two classes)")
    return classes


def _read_class_folders(path: Path, classes: list[str]) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = path / name
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise DataError(f"folder: class folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES[:3])}...)")
        for file in files:
            images.append(read_image(file))
            labels.append(label)
    first = images[0]
    channels = max(image.shape[0] for image in images)
    for file_index, image in enumerate(images):
        if image.shape[1:] != first.shape[1:]:
            raise DataError(f"folder: images in {str(path)!r} differ in size ({tuple(first.shape[1:])} vs "
                            f"{tuple(image.shape[1:])}); resize them to one size")
        if image.shape[0] != channels:  # mix of grayscale and colour: promote grayscale to RGB
            images[file_index] = image.expand(channels, *image.shape[1:])
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


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


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _to_images(array: np.ndarray) -> Tensor:
    return torch.from_numpy(array.astype(np.float32) / 255.0).unsqueeze(1)


def _to_labels(array: np.ndarray) -> Tensor:
    return torch.from_numpy(array.astype(np.int64))


def _split(x: Tensor, y: Tensor, test_fraction: float, split_seed: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A fixed (seeded) train/test split for data that ships without one."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction: must lie in (0, 1), got {test_fraction!r}")
    if len(y) < 2:
        raise DataError(f"data: need at least 2 samples to split into train and test, got {len(y)}")
    order = torch.from_numpy(np.random.default_rng(split_seed).permutation(len(y)))
    n_test = min(max(1, int(round(test_fraction * len(y)))), len(y) - 1)
    test, train = order[:n_test], order[n_test:]
    return (x[train], y[train]), (x[test], y[test])
