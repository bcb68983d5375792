"""Datasets: digits (embedded), Fashion-MNIST IDX files, npz archives, image folders, and their errors."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gradguard import data as data_module
from gradguard.data import FASHION_MNIST_FILES, load_dataset, read_idx
from gradguard.errors import DataError, GradguardError


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """An IDX file as LeCun specifies it: 0, 0, dtype code 0x08 (ubyte), ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def make_fashion_folder(folder: Path, n_train: int = 12, n_test: int = 6, size: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"x_train": rng.integers(0, 256, (n_train, size, size)), "y_train": rng.integers(0, 10, n_train),
              "x_test": rng.integers(0, 256, (n_test, size, size)), "y_test": rng.integers(0, 10, n_test)}
    for key, stem in FASHION_MNIST_FILES.items():
        write_idx(folder / f"{stem}.gz", arrays[key])
    return arrays


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Hide the machine's own Fashion-MNIST install so lookup errors can be tested."""
    monkeypatch.setattr(data_module, "SYSTEM_DATA_DIR", tmp_path / "no-system-datasets")
    monkeypatch.delenv("GRADGUARD_DATA", raising=False)


# ------------------------------------------------------------------------------------------------ digits
def test_digits_is_the_fixed_default_split():
    first, second = load_dataset(), load_dataset("digits")
    assert first.x_train.shape == (1348, 1, 8, 8) and first.x_test.shape == (449, 1, 8, 8)
    assert torch.equal(first.y_test, second.y_test) and torch.equal(first.x_train, second.x_train)
    assert 0.0 <= float(first.x_train.min()) and float(first.x_train.max()) <= 1.0
    assert first.num_classes == 10 and first.input_shape == (1, 8, 8)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(DataError, match="unknown dataset 'mnist-ish'.*fashion-mnist"):
        load_dataset("mnist-ish")


# ------------------------------------------------------------------------------------------------ IDX / Fashion-MNIST
def test_fashion_mnist_reads_idx_files_from_root(tmp_path, no_system_fashion):
    arrays = make_fashion_folder(tmp_path / "fm")
    dataset = load_dataset("fashion-mnist", root=tmp_path / "fm")
    assert dataset.x_train.shape == (12, 1, 5, 5) and dataset.x_test.shape == (6, 1, 5, 5)
    assert torch.allclose(dataset.x_train[:, 0], torch.tensor(arrays["x_train"] / 255.0, dtype=torch.float32))
    assert dataset.y_test.tolist() == arrays["y_test"].tolist() and dataset.y_train.dtype == torch.int64
    assert dataset.classes[0] == "T-shirt/top" and dataset.classes[9] == "Ankle boot"


def test_fashion_mnist_found_through_environment_variable(tmp_path, monkeypatch, no_system_fashion):
    arrays = make_fashion_folder(tmp_path / "data" / "fashion-mnist", seed=3)
    monkeypatch.setenv("GRADGUARD_DATA", str(tmp_path / "data"))
    assert load_dataset("fashion_mnist").y_train.tolist() == arrays["y_train"].tolist()


def test_fashion_mnist_missing_says_how_to_install(no_system_fashion):
    with pytest.raises(DataError) as error:
        load_dataset("fashion-mnist")
    message = str(error.value)
    assert "apt-get install -y dataset-fashion-mnist" in message and "GRADGUARD_DATA" in message


def test_read_idx_accepts_raw_and_gzip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.gz", array)), array)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a", array, compress=False)), array)


def test_truncated_idx_file_is_a_data_error(tmp_path):
    path = write_idx(tmp_path / "images", np.zeros((4, 3, 3), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_cut_gzip_stream_is_a_data_error(tmp_path):
    path = write_idx(tmp_path / "images.gz", np.zeros((40, 9, 9), np.uint8))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(path)


def test_garbage_file_is_not_an_idx_file(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"hello world, not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)


def test_fashion_mnist_with_mismatched_counts_is_corrupt(tmp_path, no_system_fashion):
    make_fashion_folder(tmp_path / "fm")
    write_idx(tmp_path / "fm" / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="do not match"):
        load_dataset("fashion-mnist", root=tmp_path / "fm")


@pytest.mark.skipif(not (Path("/usr/share/datasets/fashion-mnist") / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed on this machine")
def test_real_fashion_mnist_from_debian_package():
    dataset = load_dataset("fashion-mnist", root="/usr/share/datasets/fashion-mnist")
    assert dataset.x_train.shape == (60000, 1, 28, 28) and dataset.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(dataset.y_test).tolist() == [1000] * 10  # the published test split is balanced


# ------------------------------------------------------------------------------------------------ npz
def test_npz_with_test_split_and_nhwc_uint8(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 6, 6, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 3, x_test=x_test, y_test=np.array([0, 1, 2, 2]),
             classes=np.array(["cat", "dog", "eel"]))
    dataset = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert dataset.x_train.shape == (10, 3, 6, 6) and dataset.x_test.shape == (4, 3, 6, 6)
    assert torch.allclose(dataset.x_test[1].permute(1, 2, 0), torch.tensor(x_test[1] / 255.0, dtype=torch.float32))
    assert dataset.classes == ["cat", "dog", "eel"]


def test_npz_without_test_split_is_split_reproducibly(tmp_path):
    x = np.linspace(0, 1, 20 * 16, dtype=np.float32).reshape(20, 4, 4)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 2)
    first, second = load_dataset(f"npz:{tmp_path / 'd.npz'}"), load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert len(first.y_train) == 15 and len(first.y_test) == 5
    assert torch.equal(first.x_test, second.x_test)
    together = torch.cat([first.x_train, first.x_test]).flatten(1)[:, 0].sort().values
    assert torch.allclose(together, torch.tensor(x.reshape(20, -1)[:, 0]))  # every sample used exactly once


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((3, 4, 4))}, "lacks array"),
    ({"x": np.full((3, 4, 4), 2.0), "y": np.zeros(3, int)}, "scale pixels"),
    ({"x": np.zeros((3, 4, 4)), "y": np.zeros(2, int)}, "2 labels for 3 images"),
    ({"x": np.zeros((3, 4, 4)), "y": np.zeros(3)}, "integer class indices"),
])
def test_bad_npz_contents_are_data_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")


def test_corrupt_npz_and_missing_npz_are_data_errors(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 4, 4)), y=np.zeros(3, int))
    (tmp_path / "d.npz").write_bytes((tmp_path / "d.npz").read_bytes()[:50])
    with pytest.raises(DataError, match="corrupt"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")
    with pytest.raises(DataError, match="no file"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")


def test_npz_refuses_pickled_object_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([object()] * 3, dtype=object), y=np.zeros(3, int))
    with pytest.raises(DataError, match="object arrays are refused"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}")


# ------------------------------------------------------------------------------------------------ image folders
def write_png_classes(root: Path, per_class: int = 3, size: int = 4) -> None:
    import matplotlib.image

    rng = np.random.default_rng(0)
    for name in ("ants", "bees"):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            matplotlib.image.imsave(root / name / f"{index}.png", rng.random((size, size)), cmap="gray", vmin=0, vmax=1)


def test_image_folder_one_subfolder_per_class(tmp_path):
    write_png_classes(tmp_path / "imgs", per_class=4)
    dataset = load_dataset(f"folder:{tmp_path / 'imgs'}")
    assert dataset.classes == ["ants", "bees"]
    assert dataset.input_shape == (1, 4, 4)  # gray PNGs saved as RGBA come back as one channel
    assert len(dataset.y_train) + len(dataset.y_test) == 8
    assert 0.0 <= float(dataset.x_train.min()) and float(dataset.x_train.max()) <= 1.0


def test_image_folder_with_train_and_test(tmp_path):
    write_png_classes(tmp_path / "imgs" / "train", per_class=3)
    write_png_classes(tmp_path / "imgs" / "test", per_class=1)
    dataset = load_dataset(f"folder:{tmp_path / 'imgs'}")
    assert len(dataset.y_train) == 6 and dataset.y_test.tolist() == [0, 1]


def test_corrupt_image_is_a_data_error_naming_the_file(tmp_path):
    write_png_classes(tmp_path / "imgs")
    (tmp_path / "imgs" / "bees" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="1.png"):
        load_dataset(f"folder:{tmp_path / 'imgs'}")


def test_image_folder_errors(tmp_path):
    write_png_classes(tmp_path / "imgs")
    import matplotlib.image

    matplotlib.image.imsave(tmp_path / "imgs" / "ants" / "big.png", np.zeros((6, 6)), cmap="gray")
    with pytest.raises(DataError, match="differ in size"):
        load_dataset(f"folder:{tmp_path / 'imgs'}")
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(DataError, match="class subfolder"):
        load_dataset(f"folder:{tmp_path / 'one'}")
    with pytest.raises(GradguardError, match="no directory"):
        load_dataset(f"folder:{tmp_path / 'missing'}")


# ------------------------------------------------------------------------------------------------ MNIST (IDX)
def test_mnist_reads_idx_files_from_root_with_digit_classes(tmp_path, no_system_fashion):
    arrays = make_fashion_folder(tmp_path / "mnist", seed=5)
    dataset = load_dataset("mnist", root=tmp_path / "mnist")
    assert dataset.name == "mnist" and dataset.classes == [str(i) for i in range(10)]
    assert torch.equal(dataset.x_test[:, 0], torch.tensor(arrays["x_test"].astype(np.float32) / 255.0))
    assert dataset.y_train.tolist() == arrays["y_train"].tolist()


def test_mnist_prefers_the_mnist_subfolder_of_gradguard_data(tmp_path, monkeypatch, no_system_fashion):
    make_fashion_folder(tmp_path / "data", seed=1)  # e.g. Fashion-MNIST files at the top level
    arrays = make_fashion_folder(tmp_path / "data" / "mnist", seed=2)
    monkeypatch.setenv("GRADGUARD_DATA", str(tmp_path / "data"))
    assert load_dataset("mnist").y_test.tolist() == arrays["y_test"].tolist()


def test_mnist_missing_names_the_folders_searched(tmp_path, no_system_fashion):
    with pytest.raises(DataError, match=r"mnist: IDX files not found in .*no-system-datasets/mnist"):
        load_dataset("mnist")


def test_open_split_reads_one_idx_split_without_the_other(tmp_path, no_system_fashion):
    arrays = make_fashion_folder(tmp_path / "fm")
    (tmp_path / "fm" / "train-images-idx3-ubyte.gz").write_bytes(b"broken")  # never read for the test split
    test = data_module.open_split("fashion-mnist", "test", tmp_path / "fm")
    x, y = test.get_batch([5, 0])
    assert x.shape == (2, 1, 5, 5) and y.tolist() == [arrays["y_test"][5], arrays["y_test"][0]]
