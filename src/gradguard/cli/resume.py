"""How the command line words a refusal to resume: what was recorded beside what was given, and the flags that fix
it (the library's own message speaks Python: ``resume=False``, ``run_dir``)."""
from __future__ import annotations

import argparse
from typing import Any

from ..errors import ResumeMismatchError

OPTIONS = {"max_samples": "samples", "ema_decay": "ema"}  # a recorded setting -> its option, where names differ


def resume_refusal(error: ResumeMismatchError, args: argparse.Namespace) -> str:
    """One line: the recorded and the given settings, how to continue the kept work and how to run the new ones."""
    what = "evaluation" if args.command == "evaluate" else "training"
    where = f" in {error.where!r}" if error.where else ""
    flags = " ".join(flag for key, pair in error.changes.items() if pair is not None
                     for flag in [_flag(key, pair[0], args)] if flag)
    keep = f"pass the recorded {flags}" if flags else "give the recorded settings"
    if getattr(args, "model", None) is None and getattr(args, "run_dir", None):  # evaluate RUN_DIR --resume
        fresh = "drop --resume to start over (the unfinished journal is replaced)"
    else:
        fresh = f"choose a new --out, or drop --resume and add --force to start {args.out!r} over"
    return (f"resume: the interrupted {what}{where} was recorded with other settings ({error.described()}); "
            f"to continue it, {keep}; to run the new settings, {fresh}")


def _flag(key: str, value: Any, args: argparse.Namespace) -> str | None:
    """The option(s) that give ``value`` for the recorded setting ``key``; None when no single option does."""
    if key == "threat" and isinstance(value, dict) and isinstance(value.get("eps"), (int, float)):
        return f"--norm {value.get('norm')} --eps {value['eps']:g}"
    dest = OPTIONS.get(key, key)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not hasattr(args, dest):
        return None
    return f"--{dest.replace('_', '-')} {value:g}" if isinstance(value, float) else f"--{dest.replace('_', '-')} {value}"
