"""Streaming data benchmark: one pass over a memory-mapped ``npy:`` split, its peak memory and its speed.

Issue 11's streaming workload: 50 000 images of 3x64x64 float32 (2.4 GB) in ``x_test.npy``, read in batches
of 256 three ways — ``SampleSet.get_batch`` in file order, the same in random order, and a ``DataLoader`` with
2 worker processes — against loading the split into memory (what ``load_dataset`` and the in-memory
evaluation do). For each: images/s and the growth of the peak resident set (VmHWM, reset between phases
through /proc/self/clear_refs; workers' peak from RUSAGE_CHILDREN).

    PYTHONPATH=src python bench/streaming_data.py                 # 50 000 x 3x64x64 float32, ~1-2 min
    PYTHONPATH=src python bench/streaming_data.py --n 5000 --no-in-memory
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from gradguard.data import load_dataset, open_split

MB = 1024 * 1024


def write_npy_folder(folder: Path, n: int, size: int, dtype: str, seed: int = 0) -> None:
    """x_test.npy (n, 3, size, size) written in chunks (never whole in memory), y_test.npy, and a tiny x/y."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = np.lib.format.open_memmap(folder / "x_test.npy", mode="w+", dtype=dtype, shape=(n, 3, size, size))
    for start in range(0, n, 1000):
        chunk = rng.integers(0, 256, (min(1000, n - start), 3, size, size), dtype=np.uint8)
        images[start:start + len(chunk)] = chunk if dtype == "uint8" else chunk.astype(np.float32) / 255.0
    images.flush()
    del images
    np.save(folder / "y_test.npy", rng.integers(0, 10, n))
    np.save(folder / "x.npy", np.zeros((2, 3, size, size), dtype=dtype))
    np.save(folder / "y.npy", np.arange(2))


def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass


def measure(label: str, run: Callable[[], int]) -> dict:
    reset_peak()
    before = status_mb("VmRSS")
    start = time.perf_counter()
    images = run()
    seconds = time.perf_counter() - start
    row = {"phase": label, "images": images, "seconds": round(seconds, 2), "images_per_s": round(images / seconds),
           "peak_growth_mb": round(status_mb("VmHWM") - before)}
    print(f"{label:<34} {images:>7} images {seconds:7.2f} s {row['images_per_s']:>8} img/s   "
          f"peak RSS growth {row['peak_growth_mb']:>6} MB", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "uint8"], default="float32")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-in-memory", action="store_true", help="skip loading the split into memory")
    parser.add_argument("--dir", type=Path, help="where to write the arrays (default: a temporary folder)")
    args = parser.parse_args()

    folder = args.dir or Path(tempfile.mkdtemp(prefix="gradguard-stream-"))
    try:
        start = time.perf_counter()
        write_npy_folder(folder, args.n, args.size, args.dtype)
        gigabytes = (folder / "x_test.npy").stat().st_size / 1024**3
        print(f"wrote {args.n} x 3x{args.size}x{args.size} {args.dtype} ({gigabytes:.2f} GB) in "
              f"{time.perf_counter() - start:.1f} s; torch {torch.__version__}, batch {args.batch_size}")
        name = f"npy:{folder}"
        samples = open_split(name, "test")
        batches = [np.arange(s, min(s + args.batch_size, len(samples))) for s in range(0, len(samples), args.batch_size)]
        shuffled = np.random.default_rng(0).permutation(len(samples))
        random_batches = [shuffled[s:s + args.batch_size] for s in range(0, len(samples), args.batch_size)]

        def pass_over(index_batches: list[np.ndarray]) -> int:
            return sum(len(samples.get_batch(index)[1]) for index in index_batches)

        def pass_loader() -> int:
            loader = DataLoader(samples, batch_size=args.batch_size, num_workers=args.workers)
            return sum(len(y) for _, y in loader)

        def load_whole() -> int:
            return len(load_dataset(name).y_test)

        rows = [measure("get_batch, file order", lambda: pass_over(batches)),
                measure("get_batch, random order", lambda: pass_over(random_batches)),
                measure(f"DataLoader, {args.workers} workers", pass_loader)]
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"{'':<34} DataLoader workers' peak RSS each: {children:.0f} MB (whole process, torch included)")
        if not args.no_in_memory:
            rows.append(measure("load into memory (load_dataset)", load_whole))
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
