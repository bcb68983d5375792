"""Streamed dataset sources: CIFAR binary batches, npy memory maps, image folders with resize / crop, and the
``SampleSet`` contract (get_batch == stacked items, memory-mapped, picklable into DataLoader workers)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gradguard.data import SampleSet, list_datasets, load_dataset, open_split
from gradguard.errors import ConfigError, DataError

CIFAR10_TRAIN_COUNTS = (2, 3, 1, 2, 2)  # records per data_batch_i.bin: uneven, to test rows across files


def write_cifar_batch(path: Path, labels: np.ndarray, pixels: np.ndarray) -> None:
    """Records as the binary archives hold them: label byte(s), then 3072 pixel bytes (CHW)."""
    labels = labels.reshape(len(pixels), -1).astype(np.uint8)
    path.write_bytes(np.concatenate([labels, pixels.reshape(len(pixels), -1)], axis=1).tobytes())


def make_cifar10(folder: Path, seed: int = 0, n_test: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n_train = sum(CIFAR10_TRAIN_COUNTS)
    arrays: dict[str, np.ndarray] = {"x_train": rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
              "y_train": rng.integers(0, 10, n_train), "x_test": rng.integers(0, 256, (n_test, 3, 32, 32), np.uint8),
              "y_test": rng.integers(0, 10, n_test)}
    start = 0
    for number, count in enumerate(CIFAR10_TRAIN_COUNTS, start=1):
        write_cifar_batch(folder / f"data_batch_{number}.bin", arrays["y_train"][start:start + count],
                          arrays["x_train"][start:start + count])
        start += count
    write_cifar_batch(folder / "test_batch.bin", arrays["y_test"], arrays["x_test"])
    (folder / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n\n")
    return arrays


def as_unit(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


# ------------------------------------------------------------------------------------------------ CIFAR
def test_cifar10_binary_batches_round_trip_across_files(tmp_path):
    arrays = make_cifar10(tmp_path / "cifar-10-batches-bin")
    train = open_split("cifar10", "train", tmp_path / "cifar-10-batches-bin")
    assert len(train) == 10 and train.input_shape == (3, 32, 32) and train.classes[3] == "class3"
    order = [9, 0, 5, 2, 9, 6]  # rows from four different batch files, out of order, one twice
    x, y = train.get_batch(order)
    assert torch.equal(x, as_unit(arrays["x_train"][order])) and y.tolist() == arrays["y_train"][order].tolist()
    assert x.dtype == torch.float32 and y.dtype == torch.int64


def test_cifar10_found_inside_a_parent_root_and_loaded_whole(tmp_path):
    arrays = make_cifar10(tmp_path / "cifar-10-batches-bin", seed=1)
    dataset = load_dataset("CIFAR-10", root=tmp_path)
    assert dataset.x_train.shape == (10, 3, 32, 32) and dataset.x_test.shape == (4, 3, 32, 32)
    assert torch.equal(dataset.x_test, as_unit(arrays["x_test"])) and dataset.num_classes == 10


def test_cifar100_reads_the_fine_label_and_its_names(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 3, 32, 32), np.uint8)
    coarse, fine = rng.integers(0, 20, 5), rng.integers(0, 100, 5)
    for name in ("train.bin", "test.bin"):
        write_cifar_batch(tmp_path / name, np.stack([coarse, fine], axis=1), pixels)
    (tmp_path / "fine_label_names.txt").write_text("\n".join(f"fine{i}" for i in range(100)))
    test = open_split("cifar100", "test", tmp_path)
    x, y = test.get_batch(range(5))
    assert y.tolist() == fine.tolist() and torch.equal(x, as_unit(pixels))
    assert test.num_classes == 100 and test.classes[7] == "fine7"


def test_cifar_truncated_batch_names_file_size_and_record_size(tmp_path):
    make_cifar10(tmp_path)
    path = tmp_path / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"test_batch.bin' is 12192 bytes, not a whole number of 3073-byte records"):
        open_split("cifar10", "test", tmp_path)


def test_cifar_pickled_python_folder_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (folder / name).write_bytes(b"\x80\x04pickled")
    with pytest.raises(DataError, match="pickled Python version.*cifar-10-binary.tar.gz"):
        open_split("cifar10", "test", folder)


def test_cifar_missing_folder_says_to_pass_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADGUARD_DATA", raising=False)
    with pytest.raises(DataError, match="--data-root"):
        open_split("cifar10", "test", tmp_path)


def test_cifar_label_out_of_range_is_a_data_error_when_read(tmp_path):
    make_cifar10(tmp_path)
    raw = bytearray((tmp_path / "test_batch.bin").read_bytes())
    raw[3073] = 200  # second record's label byte
    (tmp_path / "test_batch.bin").write_bytes(bytes(raw))
    test = open_split("cifar10", "test", tmp_path)
    test.get_batch([0])
    with pytest.raises(DataError, match="test_batch.bin.*label 200"):
        test.get_batch([1])


def test_cifar_split_is_memory_mapped_not_loaded(tmp_path):
    make_cifar10(tmp_path)
    train = open_split("cifar10", "train", tmp_path)
    assert all(isinstance(records, np.memmap) for records in train.record_maps)
    assert len(pickle.dumps(train)) < 4096  # a worker gets paths, not 30 kB of records


# ------------------------------------------------------------------------------------------------ npy
def make_npy(folder: Path, x: np.ndarray, y: np.ndarray, **extra: np.ndarray) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in {"x": x, "y": y, **extra}.items():
        np.save(folder / f"{key}.npy", array)
    return f"npy:{folder}"


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NHW"])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_npy_round_trips_every_layout_and_dtype(tmp_path, layout, dtype):
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, (6, 1 if layout == "NHW" else 3, 5, 4)).astype(np.uint8)
    stored = {"NCHW": nchw, "NHWC": nchw.transpose(0, 2, 3, 1), "NHW": nchw[:, 0]}[layout]
    stored = stored if dtype == "uint8" else stored.astype(np.float32) / 255.0
    y = np.arange(6) % 3
    name = make_npy(tmp_path / "d", stored, y, x_test=stored[:2], y_test=y[:2])
    train = open_split(name, "train")
    x_read, y_read = train.get_batch(np.arange(6))
    assert train.input_shape == nchw.shape[1:] and y_read.tolist() == y.tolist()
    assert torch.equal(x_read, as_unit(nchw))
    assert len(open_split(name, "test")) == 2 and train.classes == ["0", "1", "2"]


def test_npy_without_test_arrays_splits_rows_reproducibly_without_copying(tmp_path):
    x = np.arange(20 * 16, dtype=np.uint8).reshape(20, 4, 4)
    name = make_npy(tmp_path / "d", x, np.arange(20) % 2)
    train, test = open_split(name, "train"), open_split(name, "test")
    assert (len(train), len(test)) == (15, 5)
    assert isinstance(train.images, np.memmap) and isinstance(test.images, np.memmap)
    assert sorted(train.split_rows.tolist() + test.split_rows.tolist()) == list(range(20))
    assert np.array_equal(open_split(name, "test").split_rows, test.split_rows)
    assert torch.equal(test.get_batch([0])[0][0, 0], as_unit(x[test.split_rows[0]]))
    other = open_split(name, "test", split_seed=1)
    assert not np.array_equal(other.split_rows, test.split_rows)


def test_npy_classes_txt_names_the_classes(tmp_path):
    name = make_npy(tmp_path / "d", np.zeros((4, 3, 3), np.uint8), np.array([0, 1, 2, 1]))
    (tmp_path / "d" / "classes.txt").write_text("cat\ndog\neel\n")
    assert open_split(name).classes == ["cat", "dog", "eel"]
    (tmp_path / "d" / "classes.txt").write_text("cat\n")
    with pytest.raises(DataError, match="names 1 classes but labels go up to 2"):
        open_split(name)


def test_npy_values_are_checked_per_batch_naming_the_file(tmp_path):
    x = np.full((4, 2, 2), 0.5, np.float32)
    x[3, 0, 0] = 3.0
    x[2, 1, 1] = np.nan
    name = make_npy(tmp_path / "d", x, np.zeros(4, int), x_test=x, y_test=np.zeros(4, int))
    test = open_split(name, "test")  # opening does not scan the values
    assert test.get_batch([0, 1])[0].shape == (2, 1, 2, 2)
    with pytest.raises(DataError, match=r"x_test.npy.*span \[0.5, 3\]"):
        test.get_batch([3])
    with pytest.raises(DataError, match="x_test.npy.*NaN"):
        test.get_batch([2])


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((3, 4)), "y": np.zeros(3, int)}, "expected images"),
    ({"x": np.zeros((3, 4, 4), bool), "y": np.zeros(3, int)}, "dtype bool"),
    ({"x": np.zeros((3, 4, 4)), "y": np.zeros(2, int)}, "2 labels for 3 images"),
    ({"x": np.zeros((3, 4, 4)), "y": np.zeros(3)}, "integer class indices"),
    ({"x": np.zeros((3, 4, 4)), "y": -np.ones(3, int)}, "negative labels"),
    ({"x": np.zeros((3, 4, 4)), "y": np.zeros(3, int), "x_test": np.zeros((3, 4, 4))}, "only one of"),
    ({"x": np.zeros((3, 4, 4)), "y": np.zeros(3, int), "x_test": np.zeros((3, 5, 5)), "y_test": np.zeros(3, int)},
     "differ from"),
    ({"y": np.zeros(3, int)}, "x.npy' is missing"),
])
def test_bad_npy_folders_fail_at_open(tmp_path, arrays, message):
    (tmp_path / "d").mkdir()
    for key, array in arrays.items():
        np.save(tmp_path / "d" / f"{key}.npy", array)
    with pytest.raises(DataError, match=message):
        open_split(f"npy:{tmp_path / 'd'}")


def test_npy_truncated_file_is_a_data_error(tmp_path):
    name = make_npy(tmp_path / "d", np.zeros((50, 8, 8), np.uint8), np.zeros(50, int))
    path = tmp_path / "d" / "x.npy"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="x.npy.*truncated"):
        open_split(name)


# ------------------------------------------------------------------------------------------------ image folders
def write_photos(root: Path, sizes: list[tuple[int, int]], mode: str = "RGB") -> None:
    """JPEG/PNG 'photos' of mixed sizes (height, width), alternating between two classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate(sizes):
        folder = root / ("cats" if index % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / f"{index}.{'png' if index % 3 else 'jpg'}")


MIXED_SIZES = [(10, 14), (12, 9), (16, 16), (9, 20), (11, 13), (14, 10)]


def test_folder_of_mixed_sizes_asks_for_resize(tmp_path):
    write_photos(tmp_path / "photos", MIXED_SIZES)
    with pytest.raises(DataError, match="differ in size.*--resize"):
        open_split(f"folder:{tmp_path / 'photos'}")
    with pytest.raises(DataError, match="differ in size.*--resize"):
        load_dataset(f"folder:{tmp_path / 'photos'}")


@pytest.mark.parametrize("resize, center_crop, shape", [
    ((8, 6), None, (3, 8, 6)),   # two numbers: exactly H x W
    (8, 8, (3, 8, 8)),            # shorter side to 8, then a square crop
    ("9", "8,5", (3, 8, 5)),      # the CLI's strings
    (None, 7, (3, 7, 7)),         # crop alone fits every image here
])
def test_folder_resize_and_center_crop_give_one_shape(tmp_path, resize, center_crop, shape):
    write_photos(tmp_path / "photos", MIXED_SIZES)
    for split in ("train", "test"):
        samples = open_split(f"folder:{tmp_path / 'photos'}", split, resize=resize, center_crop=center_crop)
        x, y = samples.get_batch(range(len(samples)))
        assert samples.input_shape == shape and x.shape == (len(samples), *shape)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and set(y.tolist()) <= {0, 1}
    dataset = load_dataset(f"folder:{tmp_path / 'photos'}", resize=resize, center_crop=center_crop)
    assert dataset.input_shape == shape and len(dataset.y_train) + len(dataset.y_test) == len(MIXED_SIZES)


def test_resize_one_number_scales_the_shorter_side_keeping_aspect(tmp_path):
    write_photos(tmp_path / "photos" / "train", [(8, 12), (8, 12)])
    write_photos(tmp_path / "photos" / "test", [(12, 8), (12, 8)])
    assert open_split(f"folder:{tmp_path / 'photos'}", "train", resize=4).input_shape == (3, 4, 6)
    assert open_split(f"folder:{tmp_path / 'photos'}", "test", resize=4).get_batch([0])[0].shape == (1, 3, 6, 4)


def test_folder_decodes_files_only_when_read(tmp_path):
    write_photos(tmp_path / "photos", MIXED_SIZES)
    samples = open_split(f"folder:{tmp_path / 'photos'}", "train", resize=8, center_crop=8)
    broken = samples.files[-1]
    broken.write_bytes(b"not an image any more")
    samples.get_batch([0])  # other files still read
    with pytest.raises(DataError, match=f"cannot decode image .*{broken.name}"):
        samples.get_batch([len(samples) - 1])


def test_crop_larger_than_the_images_is_a_data_error(tmp_path):
    write_photos(tmp_path / "photos", [(8, 8)] * 4)
    with pytest.raises(DataError, match="center_crop: 9x9 is larger than the 8x8 image"):
        open_split(f"folder:{tmp_path / 'photos'}", center_crop=9)


@pytest.mark.parametrize("value", ["0", "a,b", "1,2,3", -4, 2.5])
def test_bad_resize_values_are_config_errors(value):
    with pytest.raises(ConfigError, match="resize: expected H or H,W"):
        open_split("digits", resize=value)


# ------------------------------------------------------------------------------------------------ SampleSet contract
@pytest.fixture(params=["digits", "cifar10", "npy", "folder"])
def sample_set(request, tmp_path) -> SampleSet:
    if request.param == "digits":
        return open_split("digits", "test")
    if request.param == "cifar10":
        make_cifar10(tmp_path, n_test=7)
        return open_split("cifar10", "test", tmp_path)
    if request.param == "npy":
        x = np.random.default_rng(0).random((9, 6, 6, 3), dtype=np.float32)
        return open_split(make_npy(tmp_path / "d", x, np.arange(9) % 4), "train")
    write_photos(tmp_path / "photos", MIXED_SIZES * 2)
    return open_split(f"folder:{tmp_path / 'photos'}", "train", resize=6, center_crop=6)


def test_get_batch_equals_stacked_items(sample_set):
    index = [len(sample_set) - 1, 0, 2, 0]
    x, y = sample_set.get_batch(torch.tensor(index))
    items = [sample_set[i] for i in index]
    assert torch.equal(x, torch.stack([image for image, _ in items]))
    assert y.tolist() == [label for _, label in items] and all(isinstance(label, int) for _, label in items)
    assert x.shape == (4, *sample_set.input_shape) and y.dtype == torch.int64
    assert torch.equal(sample_set.get_batch([-1])[0], x[:1])
    assert sample_set.get_batch([])[0].shape == (0, *sample_set.input_shape)
    with pytest.raises(IndexError):
        sample_set.get_batch([len(sample_set)])


def test_dataloader_with_two_workers_yields_every_sample_once(sample_set):
    loader = DataLoader(sample_set, batch_size=3, num_workers=2)
    x = torch.cat([batch_x for batch_x, _ in loader])
    y = torch.cat([batch_y for _, batch_y in loader])
    expected_x, expected_y = sample_set.get_batch(range(len(sample_set)))
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y)


def test_list_datasets_names_every_source():
    assert {"mnist", "cifar10", "cifar100", "npy:DIR", "folder:PATH"} <= set(list_datasets())


def test_unknown_split_is_a_data_error():
    with pytest.raises(DataError, match="split: expected 'all', 'test' or 'train'"):
        open_split("digits", "validation")


def test_memmap_rows_are_read_exactly_in_any_order(tmp_path):
    from gradguard.data.samples import read_rows

    array = np.arange(40 * 6, dtype=">i4").reshape(40, 2, 3)  # big-endian, to check bytes land as stored
    np.save(tmp_path / "a.npy", array)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    for rows in ([3, 4, 5, 6], [39, 0, 7, 7, 8, 1], [], list(range(40))[::-1]):
        assert np.array_equal(read_rows(mapped, np.array(rows, dtype=np.int64)), array[rows])


def test_npy_file_cut_after_open_is_a_data_error_when_read(tmp_path):
    name = make_npy(tmp_path / "d", np.zeros((64, 8, 8), np.uint8), np.zeros(64, int), x_test=np.zeros((64, 8, 8),
                    np.uint8), y_test=np.zeros(64, int))
    test = open_split(name, "test")
    path = tmp_path / "d" / "x_test.npy"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DataError, match="x_test.npy' ended early"):
        test.get_batch([60])


def test_targets_are_the_labels_get_batch_returns(sample_set):
    assert torch.equal(sample_set.targets(), sample_set.get_batch(range(len(sample_set)))[1])


def test_sources_with_their_own_split_refuse_split_options(tmp_path):
    make_cifar10(tmp_path)
    with pytest.raises(ConfigError, match="test_fraction.*own train/test split"):
        open_split("cifar10", "test", tmp_path, test_fraction=0.5)
    with pytest.raises(ConfigError, match="'shuffle'.*unknown dataset option"):
        load_dataset("digits", shuffle=True)


def _resident_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_a_pass_over_an_npy_split_does_not_grow_resident_memory_by_the_file(tmp_path):
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(2000, 3, 32, 32))
    x[:] = 0.5  # 24.6 MB on disk (and in the page cache)
    x.flush()
    del x
    np.save(tmp_path / "y.npy", np.zeros(2000, np.int64))
    samples = open_split(f"npy:{tmp_path}", "train", test_fraction=0.5)
    samples.get_batch(range(100))  # warm up the allocator
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _resident_mb("VmRSS")
    for start in range(0, len(samples), 100):
        samples.get_batch(range(start, min(start + 100, len(samples))))
    assert _resident_mb("VmHWM") - before < 8.0  # the half read is 12.3 MB; a batch is 1.2 MB


def test_cifar_parent_holding_only_the_python_version_is_refused(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"\x80\x04pickled")
    with pytest.raises(DataError, match="cifar-100-python' is the pickled Python version.*cifar-100-binary"):
        open_split("cifar100", "train", tmp_path)
