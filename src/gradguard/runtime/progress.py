"""The one progress-bar policy: a transient tqdm bar on stderr, and the only module that imports tqdm.

The caller decides whether a bar is wanted at all (the ``progress=`` arguments of ``evaluate``, ``certify`` and
``Trainer``; only rank 0 of a torchrun job shows one) and calls ``progress_bar`` only then. ``terminal_only``
leaves the decision to tqdm instead: the bar is silent unless stderr is a terminal (the workflow's loops).
"""
from __future__ import annotations

import sys
from typing import Any, Iterable


def progress_bar(iterable: Iterable[Any] | None = None, *, terminal_only: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar (``tqdm.auto``: a widget in notebooks) on stderr that disappears when done (``leave=False``).

    ``kwargs`` go to tqdm (``total``, ``desc``, ``unit``). Wrap an iterable, or pass ``total`` and call
    ``update``/``close`` on the bar."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if terminal_only else False, leave=False, file=sys.stderr, **kwargs)
