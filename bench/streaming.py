"""Streaming evaluation: peak resident memory of ``evaluate`` over a dataset larger than it should ever hold.

50 000 images of 3x64x64 as float32 in a memory-mapped ``.npy`` (2.4 GB on disk), read through a torch
``DataLoader`` in batches of 256 and evaluated with ``batch_size=256``. Each measurement runs in a fresh process
and reports its peak resident-memory growth (VmHWM, reset just before the work, minus the resident memory then):

* ``npy``     — the same through gradguard's own ``npy:DIR`` source: ``open_split("npy:DIR")`` in a ``DataLoader``;
* ``stream``  — today's ``evaluate``: one block at a time, from a minimal hand-written memmap reader;
* ``collect`` — what the old path did first: concatenate the whole loader into one tensor (the cascade then
  held further copies of it; this is a lower bound of the old peak).

The model is tiny (8x8 average pooling, then an MLP 192-32-10) and the suite is a single FGSM, so the run
is about data movement, not attack cost; labels are the model's own predictions, so every sample is attacked.

    PYTHONPATH=src python bench/streaming.py [--n 50000] [--dir /tmp/gradguard-streaming]

Measured 2026-12-02 15:21 UTC on the 2-core machine (load average ~3), 50 000 images, 2.29 GiB float32:
``npy`` (gradguard's own npy:DIR source in a DataLoader) 210 MB peak growth (63 s); ``stream`` 196 MB (53 s);
``collect`` 4691 MB (14 s). Target < 1 GB: met. Without the ``malloc_trim`` after each block (monkeypatched
off, same run) the ``npy`` path grew by 652 MB (glibc heap fragmentation, see
``gradguard.evaluation.stream.release_freed_memory``). An earlier version of
this script read ``ru_maxrss``, which a subprocess inherits from its parent across ``execve`` and so reported the
data writer's 2.4 GB peak for every mode; it now resets and reads VmHWM.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

SHAPE = (3, 64, 64)
BATCH = 256


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


class NpyBatches(Dataset):
    """A memory-mapped ``.npy`` read a batch of indices at a time; the mapping is dropped after each read so the
    file's pages do not stay in this process's resident set."""

    def __init__(self, images: Path, labels: Path) -> None:
        self.images = images
        self.labels = torch.from_numpy(np.load(labels))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop = indices[0], indices[-1] + 1  # the sequential batch sampler gives consecutive indices
        mapped = np.load(self.images, mmap_mode="r")
        x = torch.from_numpy(np.array(mapped[start:stop]))
        del mapped
        return x, self.labels[start:stop]


def loader(directory: Path) -> DataLoader:
    dataset = NpyBatches(directory / "x_test.npy", directory / "y_test.npy")
    return DataLoader(dataset, sampler=BatchSampler(SequentialSampler(dataset), BATCH, drop_last=False),
                      batch_size=None)


def make_data(directory: Path, n: int) -> None:
    """Random images in [0, 1] written chunk by chunk, labelled with the tiny model's predictions."""
    images = directory / "x_test.npy"
    if images.is_file() and np.load(images, mmap_mode="r").shape[0] == n:
        return
    directory.mkdir(parents=True, exist_ok=True)
    # the npy:DIR source wants a training split too; two images are enough, the benchmark reads the test split
    np.save(directory / "x.npy", np.zeros((2, *SHAPE), np.float32))
    np.save(directory / "y.npy", np.arange(2, dtype=np.int64))
    array = np.lib.format.open_memmap(images, mode="w+", dtype=np.float32, shape=(n, *SHAPE))
    model, generator, labels = tiny_model(), np.random.default_rng(0), []
    for start in range(0, n, 2048):
        chunk = generator.random((min(2048, n - start), *SHAPE), dtype=np.float32)
        array[start:start + len(chunk)] = chunk
        with torch.no_grad():
            labels.append(model(torch.from_numpy(chunk)).argmax(1).numpy())
    array.flush()
    del array
    np.save(directory / "y_test.npy", np.concatenate(labels).astype(np.int64))


def reset_peak() -> None:
    """Reset this process's peak resident set (VmHWM) to its current size (Linux >= 4.0).

    ``ru_maxrss`` cannot be used: Linux carries it over ``execve``, so a measuring subprocess would inherit the
    peak of the parent that wrote the data set (2.4 GB here) — which is what an earlier version of this script
    reported."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_mb() -> float:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(mode: str, directory: Path) -> dict:
    from gradguard import Linf
    from gradguard.evaluation import evaluate

    torch.set_num_threads(2)
    model = tiny_model()
    if mode == "npy":
        from gradguard.data import open_split

        data = DataLoader(open_split(f"npy:{directory}", "test"), batch_size=BATCH)
    else:
        data = loader(directory)
    reset_peak()
    before, started = resident_mb(), time.perf_counter()
    if mode in ("stream", "npy"):
        report = evaluate(model, data, Linf(eps=4 / 255), ["fgsm"], batch_size=BATCH, seed=0)
        result = {"n_samples": report.n_samples, "clean_accuracy": report.clean_accuracy,
                  "robust_accuracy": report.robust_accuracy}
    else:
        x = torch.cat([batch[0] for batch in data])
        result = {"n_samples": int(x.shape[0])}
    peak = peak_mb()
    return {"mode": mode, **result, "seconds": round(time.perf_counter() - started, 1),
            "rss_before_mb": round(before), "peak_growth_mb": round(peak - before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/gradguard-streaming"))
    parser.add_argument("--measure", choices=["npy", "stream", "collect"])
    parser.add_argument("--skip-collect", action="store_true", help="measure only the streaming path")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dir)))
        return
    make_data(args.dir, args.n)
    print(f"{args.n} images {SHAPE} float32 ({args.n * np.prod(SHAPE) * 4 / 2**30:.2f} GiB) in {args.dir}")
    for mode in ["npy", "stream"] + ([] if args.skip_collect else ["collect"]):
        done = subprocess.run([sys.executable, __file__, "--measure", mode, "--dir", str(args.dir)],
                              capture_output=True, text=True, check=True)
        print(done.stdout.strip())


if __name__ == "__main__":
    main()
