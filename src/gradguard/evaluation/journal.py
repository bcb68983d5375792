"""The evaluation journal: finished blocks written as JSON lines as they finish, so a killed run can resume.

The first line is a header naming what the results depend on (suite, threat, seed, batch size, sample cap, a
model fingerprint, a data fingerprint); every further line is one finished block with its per-sample outcomes.
Each line is appended, flushed and fsync'd, so after ``kill -9`` the file holds every finished block and at most
one torn last line, which is ignored (and cut off before appending again). Under torch.distributed each rank
writes its own file ``PATH.rank{r}``; resuming reads all of them, whatever the world size was.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ResumeMismatchError, describe_changes

FORMAT = 1
CHECKED = ("model", "suite", "threat", "seed", "batch_size", "max_samples", "data")
UNSHOWN = ("model", "data")  # fingerprints: a refusal names them without their values


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes: equal exactly when the weights are equal."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def journal_files(path: Path) -> list[Path]:
    """The journal and every per-rank journal beside it (``PATH``, ``PATH.rank0``, ``PATH.rank1``, ...)."""
    files = [path] if path.is_file() else []
    return files + sorted(path.parent.glob(path.name + ".rank*"))


def own_file(path: Path, rank: int, world_size: int) -> Path:
    return path if world_size == 1 else path.with_name(f"{path.name}.rank{rank}")


def remove_journals(path: Path) -> None:
    """Start over: delete the journal and its per-rank files."""
    for file in journal_files(path):
        file.unlink(missing_ok=True)


def read_journals(path: Path, header: dict) -> dict[int, dict]:
    """Finished block records (by global block index) from every journal file; a foreign journal is refused."""
    records: dict[int, dict] = {}
    for file in journal_files(path):
        lines = _complete_lines(file)
        if not lines:
            continue
        _check_header(file, lines[0], header)
        for record in lines[1:]:
            records[int(record["block"])] = record
    return records


class JournalWriter:
    """Appends one JSON line per finished block to ``file``, flushed and fsync'd, after a header line."""

    def __init__(self, file: Path, header: dict) -> None:
        file.parent.mkdir(parents=True, exist_ok=True)
        if _complete_lines(file):
            _cut_torn_tail(file)
            self.handle = open(file, "a", encoding="utf-8")
        else:
            self.handle = open(file, "w", encoding="utf-8")
            self.append(header)

    def append(self, record: dict) -> None:
        self.handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def _complete_lines(file: Path) -> list[dict]:
    """The parsed lines of ``file`` up to the first torn or unreadable one (a crash mid-write leaves at most one)."""
    if not file.is_file():
        return []
    records = []
    with open(file, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def _cut_torn_tail(file: Path) -> None:
    """Truncate ``file`` after its last complete line, so the next append starts on a fresh line."""
    data = file.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(file, "r+b") as handle:
            handle.truncate(keep)
            os.fsync(handle.fileno())


def _check_header(file: Path, found: Any, expected: dict) -> None:
    if not isinstance(found, dict) or found.get("journal") != "gradguard-evaluate" or found.get("format") != FORMAT:
        raise ConfigError(f"journal: {str(file)!r} is not a gradguard evaluation journal (format {FORMAT}); "
                          "pass another journal path, or delete the file")
    differs = [key for key in CHECKED if not _same(key, found.get(key), expected.get(key))]
    if differs:
        changes = {key: None if key in UNSHOWN else (found.get(key), expected.get(key)) for key in differs}
        raise ResumeMismatchError(
            f"journal: {str(file)!r} was written for another {', '.join(differs)} ({describe_changes(changes)}); "
            "to continue it, call again with the recorded settings; to evaluate these, pass resume=False (the "
            "journal is replaced) or another journal path", changes, where=str(file.parent))


def _same(key: str, found: Any, expected: Any) -> bool:
    """Equal values; for the data, the same first block and the same size where both runs knew it (a loader's
    length is unknown until it is read to the end)."""
    if key == "data" and isinstance(found, dict) and isinstance(expected, dict):
        sizes = (found.get("n"), expected.get("n"))
        return found.get("first_block") == expected.get("first_block") and (None in sizes or sizes[0] == sizes[1])
    return _canonical(found) == _canonical(expected)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
