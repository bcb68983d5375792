"""Class order: a class list given by the user (``classes=`` / ``--classes``) or a ``classes.txt``, the label
mapping in words, and the chance-level check that catches a wrong mapping after the fact.

A label is an index into ``classes``. An image folder's labels come from its subfolder names; without a list they
are numbered alphabetically, which is right only when the model was trained with that order.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

CLASSES_FILE = "classes.txt"
GIVEN = "the class list given (--classes / classes=)"
MAPPING_SHOWN = 20  # labels spelled out on the console; longer lists end with "..."
CHANCE_STANDARD_ERRORS = 2.0  # the margin above chance: two binomial standard errors of a chance-level classifier
CHANCE_MARGIN_CAP = 0.5  # ... but at most half the chance rate itself


def parse_classes(value: Any) -> list[str] | None:
    """``None``, ``"a,b,c"`` or a sequence of names -> a list of names (``ConfigError`` for an empty or repeated one)."""
    if value is None:
        return None
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",")]
    elif isinstance(value, Sequence):
        names = [str(part).strip() for part in value]
    else:
        raise ConfigError(f"classes: expected comma-separated class names such as cats,dogs, got {value!r}")
    if not names or any(not name for name in names):
        raise ConfigError(f"classes: expected comma-separated class names such as cats,dogs (none empty), got {value!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"classes: {repeated} listed more than once; list each class once, in label order")
    return names


def read_classes_file(path: Path) -> list[str]:
    """One class name per line (blank lines skipped); line i names label i."""
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"classes: cannot read {str(path)!r} ({error}); write one class name per line") from None
    repeated = sorted({name for name in names if names.count(name) > 1})
    if not names or repeated:
        raise DataError(f"classes: {str(path)!r} " + (f"repeats {repeated}" if repeated else "is empty")
                        + "; write each class name once, one per line, in label order")
    return names


def match_subfolders(names: list[str], subfolders: list[str], where: str, source: str) -> None:
    """``names`` must be the subfolders of ``where``, each once: else one line naming ``source`` and the difference."""
    missing = [name for name in names if name not in subfolders]
    unlisted = [name for name in subfolders if name not in names]
    if not missing and not unlisted:
        return
    parts = ([f"no subfolder for {missing}"] if missing else []) + ([f"subfolders {unlisted} not listed"]
                                                                     if unlisted else [])
    message = (f"classes: {source} does not match the class subfolders of {where!r} ({'; '.join(parts)}); list "
               f"every subfolder once, in label order: {','.join(subfolders)}")
    raise (ConfigError if source.startswith("--classes") else DataError)(message)


def mapping_text(classes: Sequence[str], shown: int = MAPPING_SHOWN) -> str:
    """``0 ants, 1 bees, ...`` (the first ``shown`` labels, then how many there are)."""
    text = ", ".join(f"{index} {name}" for index, name in enumerate(list(classes)[:shown]))
    return text + (f", ... ({len(classes)} classes)" if len(classes) > shown else "")


def chance_threshold(num_classes: int, n_samples: int) -> float:
    """1/K plus a margin: two standard errors of a chance-level classifier's accuracy on ``n_samples`` samples,
    at most half of 1/K.

    A classifier that guesses (or whose labels are shuffled against its outputs) scores 1/K on average with
    standard error sqrt(p(1-p)/n); it stays under 1/K + 2 SE about 97.5 % of the time, while a model with real
    skill clears it easily (10 classes, 1000 samples: 11.9 %; 200 samples: 14.2 %). The cap keeps a handful of
    samples from calling a clearly better score "chance" (2 classes, 4 samples: 75 %, not 100 %).
    """
    p = 1.0 / max(1, num_classes)
    return p + min(CHANCE_STANDARD_ERRORS * math.sqrt(p * (1.0 - p) / max(1, n_samples)), CHANCE_MARGIN_CAP * p)


def chance_warning(accuracy: float | None, num_classes: int, n_samples: int, source: str | None = None,
                   class_source: str | None = None) -> str | None:
    """A warning when clean accuracy is at chance level or below it, else None. For a folder the class mapping
    is named as the likely cause; otherwise the labels and their order."""
    if accuracy is None or num_classes < 2 or n_samples < 1 or accuracy > chance_threshold(num_classes, n_samples):
        return None
    note = (f"clean accuracy {100 * accuracy:.1f} % on {n_samples} samples is at or below chance level for "
            f"{num_classes} classes ({100 / num_classes:.1f} %)")
    if source and source.startswith("folder:"):
        how = f"numbered by {class_source}" if class_source else "numbered from the subfolder names"
        return (f"{note}: the likely cause is the class mapping (labels {how}) not matching the model's outputs; "
                f"give the order the model was trained with in {CLASSES_FILE} in the folder or with --classes")
    return f"{note}: check the labels and the class order against the model's outputs"
