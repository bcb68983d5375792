"""The output adapter for models (``Logits``, defined in ``base.py`` beside ``Normalized`` and re-exported here),
and the first-pass check of model and data.

Models do not all return a logits tensor: Hugging Face classifiers return a ``ModelOutput`` with ``.logits``, others
a dict or a ``(logits, features)`` tuple. ``select_logits`` (in ``core/logits.py``, re-exported here) is the one
place that finds the logits in an output: a tensor is used as is, an output with a ``logits`` attribute or key is
used through it automatically, any other output needs an explicit key or index — ``Logits(model, key)`` in Python,
``--logits KEY|INDEX`` on the command line — and without one the error names that option and shows what the output
looked like.

``first_pass`` runs a model once on a couple of samples before any work: it checks that the data, the
normalisation (``mean``/``std``) and the model's first layer agree on the number of channels, turns an exception
of the model into one line naming the input shape (chained, so Python still shows the original), and says where
the logits were found (``"model output: .logits"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.guard import model_guard
from ..core.logits import AUTO_KEY as AUTO_KEY  # the output adapter itself lives in core (check_logits needs it)
from ..core.logits import FLAG as FLAG
from ..core.logits import LogitsKey as LogitsKey
from ..core.logits import check_logits, output_label, select_logits
from ..core.logits import describe_output as describe_output
from ..errors import ConfigError, GradguardError, ModelOutputError, ShapeError
from .base import Logits as Logits  # the adapter lives in base.py (unwrap looks through it); re-exported here
from .base import Normalized, unwrap
from .base import as_logits_model as as_logits_model
from .base import inner_model as inner_model
from .base import with_logits as with_logits


def parse_logits_key(text: str | int | None) -> LogitsKey | None:
    """``--logits`` as typed: an integer index (``0``, ``-1``) or a key name (``out``); None stays None."""
    if text is None or isinstance(text, int):
        return text
    text = text.strip()
    if not text:
        raise ConfigError(f"logits: expected a key name or an integer index, e.g. {FLAG} logits or {FLAG} 0; "
                          "got an empty string")
    try:
        return int(text)
    except ValueError:
        return text


# ------------------------------------------------------------------------------------------------
# The first pass: model, data and normalisation agree before any work
# ------------------------------------------------------------------------------------------------
@dataclass
class FirstPass:
    """What the first pass found: the model to use (adapted to return logits), where its logits came from
    (``tensor``, ``.logits``, ``['out']``, ``[0]``), the number of classes and the input shape it was given."""

    model: nn.Module
    output: str
    num_classes: int
    input_shape: tuple[int, ...]


def first_pass(model: nn.Module, x: Tensor, logits: LogitsKey | None = None) -> FirstPass:
    """Run ``model`` once on ``x`` (a couple of samples) in eval mode without gradients and check it before any work.

    The data's channels, the per-channel ``mean``/``std`` of a ``Normalized`` model and the model's first layer must
    agree (one line naming the three otherwise); an exception of the model becomes one ``ModelOutputError`` line
    naming the input shape (chained to the original); the logits are found in the output (``select_logits``,
    ``logits`` as the key or index; None is automatic) and checked to be (batch, classes) finite numbers. Returns
    the model to use — wrapped in ``Logits`` (and recording the key) when its output is not a tensor — with a
    label saying where the logits came from.
    """
    if logits is not None:
        model = with_logits(model, logits)
    if x.shape[0] == 0:  # nothing to run on: the command's own checks refuse empty data
        return FirstPass(model, "unknown", 0, tuple(x.shape))
    data_channels = int(x.shape[1]) if x.dim() == 4 else None
    normalized = _find(model, Normalized)
    stats = int(normalized.mean.shape[1]) if normalized is not None and normalized.mean.dim() == 4 else None
    first, expects = _first_layer(model)
    if data_channels is not None and stats is not None and stats != data_channels:
        raise ShapeError(f"mean/std: {_channels(data_channels, stats, expects)}; give --mean/--std one value per data "
                         f"channel ({data_channels}) or a single value for all")
    try:
        with model_guard(model), torch.no_grad():
            output = model.model(x) if isinstance(model, Logits) else model(x)
    except GradguardError:
        raise
    except Exception as error:
        if data_channels is not None and expects is not None and expects != data_channels:
            raise ShapeError(f"model: {_channels(data_channels, stats, expects)} ({first}); use data with {expects} "
                             f"channel{'s' if expects != 1 else ''} or a model built for {data_channels}") from error
        raise ModelOutputError(f"model: the first forward pass, on an input of shape {tuple(x.shape)}, raised "
                               f"{type(error).__name__}: {_first_line(error)}; check that the model fits this data "
                               "(channels, image size, dtype)") from error
    key = logits if logits is not None else getattr(model, "key", None)
    tensor = select_logits(output, key)
    check_logits(tensor, x.shape[0])
    label = output_label(output, key)
    if not isinstance(output, Tensor) and not isinstance(model, Logits):
        model = with_logits(model, AUTO_KEY)
    return FirstPass(model, label, int(tensor.shape[1]), tuple(x.shape))


def _channels(data: int, stats: int | None, expects: int | None) -> str:
    parts = [f"the data has {data} channel{'s' if data != 1 else ''}"]
    parts.append(f"--mean/--std have {stats} values" if stats is not None else "no per-channel --mean/--std")
    if expects is not None:
        parts.append(f"the model's first layer expects {expects}")
    return ", ".join(parts)


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).strip().splitlines()[:1]).strip()
    return text[:300] or "(no message)"


def _find(model: nn.Module, kind: type) -> Any:
    return next((m for m in unwrap(model).modules() if isinstance(m, kind)), None)


def _first_layer(model: nn.Module) -> tuple[str, int | None]:
    """The first convolution in ``model`` (name and class) and the channels it takes, or ("", None)."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            return f"{name or 'the model'}: {type(module).__name__}", int(module.in_channels)
    return "", None
