"""Training checkpoints: model + optimiser + RNG state, pickle-free and crash-safe.

A checkpoint for epoch k is two files in ``<run_dir>/checkpoint/``:
``epoch-000k.safetensors`` (every tensor: weights, optimiser buffers, RNG states) and ``epoch-000k.json``
(everything else, plus the SHA-256 of the tensors file). Both are written atomically, the JSON last; a checkpoint
counts only when its JSON parses and the hash matches, so a save interrupted by a crash (kill -9, power cut) is
never read as valid — ``latest_checkpoint`` skips it and falls back to the previous one.
"""
from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError
from ..io import atomic_write_bytes, atomic_write_json, sha256_file
from ..layout import CHECKPOINT_RECORDS, CHECKPOINT_STEM
from ..models import read_safetensors

FORMAT = "gradguard-checkpoint"
KEEP = 2


def checkpoint_paths(directory: Path, epoch: int) -> tuple[Path, Path]:
    stem = CHECKPOINT_STEM.format(epoch=epoch)
    return directory / f"{stem}.safetensors", directory / f"{stem}.json"


def save_checkpoint(directory: str | Path, epoch: int, tensors: dict[str, Tensor], state: dict[str, Any],
                    keep: int = KEEP) -> Path:
    """Write checkpoint ``epoch`` (tensors first, then the JSON that vouches for them); keep the newest ``keep``."""
    from safetensors.torch import save as to_bytes

    directory = Path(directory)
    tensor_path, json_path = checkpoint_paths(directory, epoch)
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in tensors.items()}
    atomic_write_bytes(tensor_path, to_bytes(tensors, metadata={"format": FORMAT}))
    atomic_write_json(json_path, {"format": FORMAT, "epoch": epoch, "tensors": tensor_path.name,
                                  "sha256": sha256_file(tensor_path), "state": state})
    for old in sorted(directory.glob(CHECKPOINT_RECORDS))[:-keep]:
        old.with_suffix(".safetensors").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return json_path


def read_checkpoint(json_path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, state) of one checkpoint; ``CheckpointError`` if it is missing, truncated or inconsistent."""
    json_path = Path(json_path)
    try:
        record = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint: {str(json_path)!r} does not exist") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint: {str(json_path)!r} is not valid JSON ({error}); "
                              "it was probably cut short by a crash") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or "sha256" not in record:
        raise CheckpointError(f"checkpoint: {str(json_path)!r} is not a gradguard checkpoint")
    tensor_path = json_path.parent / record["tensors"]
    if not tensor_path.is_file():
        raise CheckpointError(f"checkpoint: tensors file {str(tensor_path)!r} is missing")
    if sha256_file(tensor_path) != record["sha256"]:
        raise CheckpointError(f"checkpoint: {str(tensor_path)!r} does not match its recorded SHA-256; "
                              "it is truncated or corrupt")
    tensors, _ = read_safetensors(tensor_path)
    return tensors, record["state"]


def latest_checkpoint(directory: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The newest valid checkpoint in ``directory`` (skipping, with a warning, any that are corrupt), or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for json_path in sorted(directory.glob(CHECKPOINT_RECORDS), reverse=True):
        try:
            return read_checkpoint(json_path)
        except CheckpointError as error:
            warnings.warn(f"skipping invalid checkpoint: {error}", stacklevel=2)
    return None


# ------------------------------------------------------------------------------------------------
# Flattening optimiser and RNG state into (tensors, JSON)
# ------------------------------------------------------------------------------------------------
def flatten_optimizer(state_dict: dict, prefix: str = "optimizer.") -> tuple[dict[str, Tensor], dict]:
    tensors: dict[str, Tensor] = {}
    per_param: dict[str, dict] = {}
    for index, values in state_dict["state"].items():
        entry: dict[str, Any] = {}
        for name, value in values.items():
            if isinstance(value, Tensor):
                key = f"{prefix}{index}.{name}"
                tensors[key] = value
                entry[name] = {"tensor": key}
            else:
                entry[name] = value
        per_param[str(index)] = entry
    return tensors, {"state": per_param, "param_groups": state_dict["param_groups"]}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    state = {}
    for index, entry in meta["state"].items():
        state[int(index)] = {name: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
                             for name, value in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng() -> tuple[dict[str, Tensor], dict]:
    """torch (CPU and CUDA), numpy and python ``random`` states as (tensors, JSON)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, python_state, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(position), int(has_gauss), float(cached)],
            "python": [version, list(python_state), gauss_next]}
    return tensors, meta


def restore_rng(tensors: dict[str, Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(key for key in tensors if key.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[key] for key in cuda])
    kind, position, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    version, python_state, gauss_next = meta["python"]
    random.setstate((version, tuple(python_state), gauss_next))
