"""Logits: where they are in a model's output, and the checked forward passes that read them.

``select_logits`` is the one output adapter (moved here from ``models/outputs.py``, which re-exports it with
``Logits``, ``first_pass`` and the rest): a tensor is used as is, an output with a ``logits`` attribute or key is
used through it automatically (a Hugging Face ``ModelOutput``, a dict), any other output needs an explicit key or
index — ``Logits(model, key)`` in Python, ``--logits KEY|INDEX`` on the command line — and without one the error
names that option and shows what the output looked like.

``check_logits``, ``forward_logits`` and ``voted_logits`` (moved here from ``attacks/base.py``, which re-exports
them) are the checked forward passes every algorithm family uses: a finite (batch, classes) float tensor or a
``ModelOutputError``. Both live in ``core`` so that the check can find the logits without importing ``models``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn

from ..errors import ModelOutputError
from ..runtime.precision import amp_name, autocast, upcast_logits

LogitsKey = Union[str, int]
AUTO_KEY = "logits"
FLAG = "--logits"


def select_logits(output: Any, key: LogitsKey | None = None) -> Tensor:
    """The logits tensor in ``output``: ``output[key]`` / ``output.key`` for a string key, ``output[key]`` for an
    integer index; with ``key=None`` the output itself when it is a tensor, else its ``logits`` attribute or key.
    Raises ModelOutputError naming ``--logits`` / ``Logits(model, key)`` and the output's structure otherwise."""
    if key is None:
        if isinstance(output, Tensor):
            return output
        found = _lookup(output, AUTO_KEY)
        if isinstance(found, Tensor):
            return found
        raise ModelOutputError(f"model: the model returned {describe_output(output)}, not a logits tensor; "
                               f"{_advice(output)}")
    if isinstance(output, Tensor):
        raise ModelOutputError(f"logits: the model already returns a logits tensor (shape {tuple(output.shape)}), "
                               f"so there is nothing to select with {key!r}; drop {FLAG} (Python: Logits)")
    found = _lookup(output, key)
    if found is _MISSING:
        raise ModelOutputError(f"logits: the model's output has no {_key_text(output, key)} (it returned "
                               f"{describe_output(output)}); {_advice(output, key)}")
    if not isinstance(found, Tensor):
        raise ModelOutputError(f"logits: the model's output{_key_text(output, key)} is {describe_output(found)}, not a "
                               f"logits tensor (the model returned {describe_output(output)}); {_advice(output, key)}")
    return found


_MISSING: Any = object()


def _lookup(output: Any, key: LogitsKey) -> Any:
    if isinstance(key, int) and not isinstance(key, bool):
        if isinstance(output, (tuple, list)):
            return output[key] if -len(output) <= key < len(output) else _MISSING
        if isinstance(output, Mapping):  # a dict keyed by integers, or a ModelOutput (indexable by position)
            if key in output:
                return output[key]
            values = list(output.values())
            return values[key] if hasattr(output, "to_tuple") and -len(values) <= key < len(values) else _MISSING
        return _MISSING
    if isinstance(output, Mapping) and key in output:
        return output[key]
    if not isinstance(output, (Tensor, Mapping, tuple, list)) and isinstance(key, str):
        return getattr(output, key, _MISSING)
    return _MISSING


def _key_text(output: Any, key: LogitsKey) -> str:
    """How ``key`` reads on ``output``: ``.logits`` for an attribute (a ModelOutput), ``['out']``, ``[0]``."""
    if isinstance(key, str) and (hasattr(output, "to_tuple") or not isinstance(output, (Mapping, tuple, list))):
        return f".{key}"
    return f"[{key!r}]"


def output_label(output: Any, key: LogitsKey | None) -> str:
    """Where the logits came from, for run.json and the report: ``tensor``, ``.logits``, ``['out']``, ``[0]``."""
    if key is None:
        if isinstance(output, Tensor):
            return "tensor"
        key = AUTO_KEY
    return _key_text(output, key)


def describe_output(output: Any, depth: int = 0) -> str:
    """A short picture of a model's output: ``a dict {'out': Tensor(2, 10), 'feat': Tensor(2, 64)}``."""
    def inner(value: Any) -> str:
        if isinstance(value, Tensor):
            return f"Tensor{tuple(value.shape)}"
        if depth >= 1 or not isinstance(value, (Mapping, tuple, list)):
            return type(value).__name__
        return describe_output(value, depth + 1).removeprefix("a ")

    if isinstance(output, Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, Mapping):
        items = list(output.items())[:6]
        text = ", ".join(f"{k!r}: {inner(v)}" for k, v in items) + (", …" if len(output) > 6 else "")
        return f"a {type(output).__name__} {{{text}}}"
    if isinstance(output, (tuple, list)):
        text = ", ".join(inner(v) for v in list(output)[:6]) + (", …" if len(output) > 6 else "")
        return f"a {type(output).__name__} of {len(output)} ({text})"
    fields = {name: value for name, value in vars(output).items() if not name.startswith("_")} \
        if hasattr(output, "__dict__") else {}
    if fields:
        return f"a {type(output).__name__} ({', '.join(f'{k}: {inner(v)}' for k, v in list(fields.items())[:6])})"
    return f"a {type(output).__name__}"


def _candidates(output: Any) -> list[LogitsKey]:
    """Keys / indices of ``output`` that hold 2-D tensors (batch, classes): the likely logits, first first."""
    if isinstance(output, Mapping):
        pairs: list[tuple[LogitsKey, Any]] = list(output.items())
    elif isinstance(output, (tuple, list)):
        pairs = list(enumerate(output))
    else:
        return []
    return [k for k, v in pairs if isinstance(v, Tensor) and v.dim() == 2 and v.shape[1] >= 2]


def _advice(output: Any, key: LogitsKey | None = None) -> str:
    candidates = [k for k in _candidates(output) if k != key]
    example: LogitsKey = candidates[0] if candidates else (0 if isinstance(output, (tuple, list)) else "KEY")
    return (f"say which part holds the logits with {FLAG} {example} (Python: gradguard.models.Logits(model, "
            f"{example!r})), or make forward() return the logits tensor")


# ------------------------------------------------------------------------------------------------
# The checked forward passes
# ------------------------------------------------------------------------------------------------
def check_logits(logits: Any, batch: int, argument: str = "model", amp: torch.dtype | None = None) -> Tensor:
    """The logits in a model's output, checked: a finite (batch, classes) float tensor, else ModelOutputError.

    An output that is not a tensor goes through the output adapter (``gradguard.models.select_logits``): its
    ``logits`` attribute or key is used (a Hugging Face ``ModelOutput``, a dict); any other output is refused with
    a message that says how to select the logits (``--logits``, ``gradguard.models.Logits``)."""
    if not isinstance(logits, Tensor):
        logits = select_logits(logits)
    if logits.dim() != 2 or logits.shape[0] != batch or logits.shape[1] < 2:
        raise ModelOutputError(
            f"{argument}: expected (batch={batch}, classes>=2) logits, got shape {tuple(logits.shape)}; "
            "flatten or wrap the model's output"
        )
    if not bool(torch.isfinite(logits).all()):
        if amp is not None:
            raise ModelOutputError(
                f"{argument}: the model returned NaN or inf logits under amp={amp_name(amp)!r}; its activations "
                "overflow in low precision: use amp='bf16' (fp16 overflows above 65504) or amp=None"
            )
        raise ModelOutputError(
            f"{argument}: the model returned NaN or inf logits; check its weights and input normalisation"
        )
    return logits


def forward_logits(model: Callable[[Tensor], Any], x: Tensor, amp: torch.dtype | None = None) -> Tensor:
    """Checked logits of ``model`` at ``x``, under autocast at ``amp`` when given (then cast up to float32)."""
    if amp is None:
        return check_logits(model(x), x.shape[0])
    with autocast(x.device, amp):
        logits = model(x)
    return upcast_logits(check_logits(logits, x.shape[0], amp=amp))


@torch.no_grad()
def voted_logits(model: nn.Module, x: Tensor, labels: Tensor, votes: int,
                 succeeded: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """(success, logits): the majority verdict of ``votes`` forward passes of a randomised model at ``x``.

    A sample succeeds when more than half of the passes say ``succeeded(logits, labels)``. Its logits are those
    of one pass that agrees with the verdict, so ``argmax`` and ``success`` never contradict each other.
    """
    if votes == 1:
        logits = check_logits(model(x), x.shape[0])
        return succeeded(logits, labels), upcast_logits(logits)
    passes = [check_logits(model(x), x.shape[0]) for _ in range(votes)]
    verdicts = torch.stack([succeeded(logits, labels) for logits in passes])  # (votes, batch)
    success = 2 * verdicts.sum(0) > votes
    agree = verdicts == success[None]  # at least one pass agrees with the majority, always
    first = agree.int().argmax(0)
    chosen = torch.stack(passes)[first, torch.arange(x.shape[0], device=x.device)]
    return success, upcast_logits(chosen)

