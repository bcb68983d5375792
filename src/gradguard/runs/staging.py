"""Run directories that appear only complete: staging (a temporary sibling renamed into place on success, or
``.NAME.partial`` kept for ``--resume``), stale staging folders of dead processes, and ``run.json`` manifests.

``gradguard.workflow`` re-exports everything here; the commands reach it through the workflow.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from .._version import __version__
from ..errors import ConfigError, GradguardError, ResumeMismatchError
from ..layout import CHECKPOINT_DIR, JOURNAL_FILE, RUN_FILE


class KeptPartialRun(KeyboardInterrupt):
    """Ctrl-C during a resumable command whose finished work was kept for ``--resume``."""


@contextlib.contextmanager
def staged_run_dir(out: str | Path, *, replace: bool = False, resumable: bool = False,
                   resume: bool = False) -> Iterator[Path]:
    """Build a new run directory in a temporary sibling folder and rename it to ``out`` only on success.

    On any error (or Ctrl-C) the temporary folder is removed, so ``out`` is either complete or untouched.
    ``resumable`` (training) stages in ``.<name>.partial`` instead and keeps that folder when it already holds a
    checkpoint, so that ``resume=True`` (``--resume``) continues the run; ``out`` itself still appears only complete.
    Under torchrun rank 0 alone creates, fills and renames the folder (the others get its path), and only once
    every rank has finished; a rank that fails makes the others fail too, so nothing half-written appears.
    """
    from ..runtime import distributed

    out = Path(out)
    partial = out.parent / f".{out.name}.partial"
    made: list[Path] = []  # the staging folder, on the rank that created it (rank 0)

    def prepare() -> Path:
        made.append(_prepare_staging(out, partial, replace=replace, resumable=resumable, resume=resume))
        return made[0]

    staging: Path | None = None
    try:
        # under torchrun rank 0 alone checks and creates the staging folder; every rank gets its path (or error)
        staging = distributed.rank0_first(prepare)
        yield staging
        distributed.barrier()  # every rank has finished its part before rank 0 puts the run in place
        distributed.rank0_first(lambda: _move_into_place(made[0], out))
    except BaseException as error:
        staging = made[0] if made else staging
        if staging is None:
            raise
        if not (resumable and _holds_resumable_work(staging)):
            if made:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if isinstance(error, ResumeMismatchError):  # kept; its message says how to continue it
            raise
        again = "run the same command again" if resume else "add --resume to the same command"
        hint = f"the finished work is kept in {str(staging)!r}; {again} to continue"
        if isinstance(error, GradguardError):
            raise type(error)(f"{one_line(error)}; {hint}") from error
        if isinstance(error, KeyboardInterrupt):
            raise KeptPartialRun(hint) from None
        raise


def _prepare_staging(out: Path, partial: Path, *, replace: bool, resumable: bool, resume: bool) -> Path:
    """Check ``out`` and the interrupted run beside it, then create the staging folder (see ``staged_run_dir``)."""
    if resume and out.exists() and not partial.is_dir():
        raise ConfigError(f"resume: {str(out)!r} is a finished run, there is nothing to resume; drop --resume (and "
                          "pass --force to run it again, or choose another --out)")
    if out.exists() and not replace:
        raise ConfigError(f"out: {str(out)!r} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {str(out)!r} exists and is not a directory; choose another --out")
    if resume and not partial.is_dir():
        raise ConfigError(f"resume: no interrupted run of {str(out)!r} to continue (looked for {str(partial)!r}); "
                          "run without --resume to start one")
    if resumable and partial.exists() and not resume:
        if not replace:
            raise ConfigError(f"out: an interrupted run of {str(out)!r} is kept in {str(partial)!r}; continue it "
                              "with --resume, or pass --force to start over")
        shutil.rmtree(partial)
    return _make_staging(out, partial if resumable else None)


def _make_staging(out: Path, partial: Path | None) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if partial is not None:
            partial.mkdir(exist_ok=True)
            return partial
        _clear_stale_staging(out.parent)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.{_staging_owner()}.", suffix=".tmp", dir=out.parent))
    except OSError as error:
        raise ConfigError(f"out: cannot create a run directory next to {str(out)!r} ({error.strerror or error}); "
                          "choose a writable --out") from None


# a staging folder's name: .<out name>.<host>-<pid>.<8 random characters>.tmp (tempfile.mkdtemp's)
_STAGING_NAME = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]*)-(?P<pid>[0-9]+)\.[a-z0-9_]{8}\.tmp$")


def _staging_owner() -> str:
    """``<host>-<pid>`` of this process, recorded in its staging folders' names (``_clear_stale_staging``)."""
    return f"{_host()}-{os.getpid()}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:40]


def _clear_stale_staging(folder: Path) -> None:
    """Remove the staging folders in ``folder`` left by processes of this host that are gone (killed with
    SIGKILL, a crash, a power cut: nothing of theirs could clean up). A live process's, another host's (a shared
    file system) and any folder not named by ``_make_staging`` are left alone."""
    host = _host()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _STAGING_NAME.match(entry.name)
        if match and match["host"] == host and entry.is_dir() and not _process_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (True when that cannot be told: nothing is removed on a guess)."""
    if os.name != "posix" or pid <= 0:
        return True  # os.kill(pid, 0) is no existence check on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by another user
        return True
    return True


def _move_into_place(staging: Path, out: Path) -> None:
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, retired / out.name)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)


def _holds_resumable_work(run_dir: Path) -> bool:
    """A training checkpoint or an evaluation journal: work that ``--resume`` can continue."""
    from ..train.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir / CHECKPOINT_DIR) is not None or holds_journal(run_dir)


def holds_journal(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the journal of an unfinished evaluation (also the per-rank files of torchrun)."""
    from ..evaluation.journal import journal_files

    return any(f.is_file() and f.stat().st_size > 0 for f in journal_files(run_dir / JOURNAL_FILE))


def check_writable(run_dir: Path) -> None:
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"run_dir: {str(run_dir)!r} is not writable; fix its permissions or copy the run elsewhere")


def write_manifest(run_dir: Path, **fields) -> dict:
    """run.json: what made the run (command, dataset, model, threat, seed, versions), written atomically."""
    from ..io import atomic_write_json

    manifest = {"format": "gradguard-run", "gradguard": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields}
    atomic_write_json(run_dir / RUN_FILE, manifest)
    return manifest


def read_manifest(run_dir: Path) -> dict:
    from ..report.rundir import read_json

    return read_json(run_dir / RUN_FILE) or {}


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
