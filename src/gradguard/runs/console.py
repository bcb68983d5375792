"""What a command says on the console: progress notes and timings on stderr (stdout stays clean for ``--json``),
the terminal-only progress bar, and the kept ``[gradguard]`` data lines that a command says once its work is done.

``gradguard.workflow`` re-exports everything here.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator


def log(message: str) -> None:
    """Progress notes go to stderr so that stdout stays clean for --json."""
    print(message, file=sys.stderr, flush=True)


def progress(iterable, **kwargs):
    """tqdm on a terminal (stderr), silent otherwise."""
    from ..runtime.progress import progress_bar

    return progress_bar(iterable, terminal_only=True, **kwargs)


@contextlib.contextmanager
def timed(message: str) -> Iterator[None]:
    """Log ``message`` to stderr, then how long the block took."""
    log(message)
    started, cpu = time.perf_counter(), time.process_time()
    yield
    log(f"        ... {time.perf_counter() - started:.1f} s ({time.process_time() - cpu:.1f} s CPU)")


NOTES: list[str] = []  # data lines for the console, said once a command has done its work (say_notes)


def say(message: str) -> None:
    """Keep one ``[gradguard]`` console line for ``say_notes``: a command that fails before its work is done
    still ends with its one-line error alone."""
    NOTES.append(f"[gradguard] {message}")


def say_notes() -> None:
    """Print the kept console lines (stderr), once under torchrun; the CLI calls it when a command succeeded."""
    from ..runtime import distributed

    if distributed.is_main_process():
        for message in NOTES:
            log(message)
    NOTES.clear()
