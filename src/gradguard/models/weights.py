"""Model weight files, formats only: safetensors weights + a JSON sidecar (``save``), and foreign state dicts read
tensors-only (``read_state_dict``) and fitted to a model (``fit_state_dict``, ``load_weights``).

Nothing is ever unpickled: ``.pt``/``.pth``/``.bin`` files go through ``torch.load(weights_only=True)``, which
refuses arbitrary Python objects. Foreign state dicts are unwrapped from the usual containers
(``{"state_dict": ...}``, ``{"model": ...}``, EMA copies) and stripped of ``module.`` (DataParallel / DDP) and
``_orig_mod.`` (torch.compile) prefixes before they are matched to the model. Rebuilding a saved model from its
sidecar (``load``) is one more spec form of ``sources``, which imports this module (never the other way).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..layout import MODEL_JSON_FILE as SIDECAR_FILE  # gradguard.models exports the layout's names as these
from ..layout import MODEL_WEIGHTS_FILE as WEIGHTS_FILE
from .base import Normalized, model_source, model_spec, unwrap

FORMAT = "gradguard-model"
# Where checkpoints keep their tensors, in the order we look: the trained weights before any EMA copy.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module",
                   "state_dict_ema", "model_ema", "ema_state_dict", "ema")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOW_KEYS = 5


def weight_paths(path) -> tuple[Path, Path]:
    """(weights file, sidecar) of a run directory or a ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / WEIGHTS_FILE, path / SIDECAR_FILE


def state_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict as contiguous CPU tensors that own their memory (safetensors rejects shared ones)."""
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in unwrap(model).state_dict().items()}


def save(model: nn.Module, path, **metadata) -> Path:
    """Save weights to ``path`` (a run directory, or a ``.safetensors`` file) plus a JSON sidecar.

    The sidecar records how to rebuild the model (``"source"``: zoo name, ``package.module:callable``, ... with its
    kwargs, original weights and normalisation; ``"model"``: the zoo spec, as before), library versions, the SHA-256
    of the weights file and any ``metadata`` (dataset, threat, method, ...). Both files are written atomically; the
    weights file also carries the records in its safetensors header, so it is self-describing.
    """
    from datetime import datetime, timezone

    import safetensors
    from safetensors.torch import save as to_bytes

    from .._version import __version__
    from ..io import atomic_write_bytes, atomic_write_json, sha256_file

    weights_path, sidecar_path = weight_paths(path)
    spec, source = model_spec(model), model_source(model)
    header = {"format": FORMAT, "model": json.dumps(spec), "source": json.dumps(source)}
    atomic_write_bytes(weights_path, to_bytes(state_tensors(model), metadata=header))
    sidecar = {
        "format": FORMAT, "format_version": 1, "model": spec, "source": source, "weights": weights_path.name,
        "sha256": sha256_file(weights_path), "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"gradguard": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__},
        **metadata,
    }
    atomic_write_json(sidecar_path, sidecar)
    return weights_path


def read_safetensors(path, argument: str = "path") -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) from a safetensors file; CheckpointError if missing or corrupt."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{argument}: no weights file at {str(path)!r}; pass a run directory or a "
                              ".safetensors file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises several types for truncated / garbled files
        raise CheckpointError(f"{argument}: {str(path)!r} is not a valid safetensors file ({error}); "
                              "it may be truncated by a crash — use an earlier checkpoint") from None
    return tensors, header


def read_state_dict(path, argument: str = "weights") -> dict[str, Tensor]:
    """The tensors of a weights file: ``.safetensors`` / a run directory, or a ``.pt``/``.pth``/``.bin`` state dict
    read with ``torch.load(weights_only=True)`` and unwrapped from the usual checkpoint containers."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return read_safetensors(weight_paths(path)[0], argument)[0]
    if not path.is_file():
        raise CheckpointError(f"{argument}: no file at {str(path)!r}; pass a .safetensors, .pt, .pth or .bin file")
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{argument}: {str(path)!r} is not a tensors-only state dict: it holds pickled Python objects (a whole "
            "model or custom classes) that torch.load(weights_only=True) refuses to run; re-save just the tensors "
            "with torch.save(model.state_dict(), path) or safetensors.torch.save_file(model.state_dict(), path)"
        ) from None
    except Exception as error:
        raise CheckpointError(f"{argument}: {str(path)!r} is not a tensors-only state dict that torch.load can read "
                              f"({type(error).__name__}: {_first_line(error)}); re-save it with "
                              "torch.save(model.state_dict(), path) or safetensors") from None
    tensors = _find_state_dict(loaded)
    if tensors is None:
        found = sorted(map(str, loaded))[:10] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise CheckpointError(f"{argument}: found no state dict in {str(path)!r} (top level: {found}); expected "
                              f"name -> tensor, possibly under one of {list(STATE_DICT_KEYS)}")
    return tensors


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _find_state_dict(obj, depth: int = 0) -> dict[str, Tensor] | None:
    """``obj`` itself if it maps names to tensors, else the first such dict under a known wrapper key."""
    if not isinstance(obj, Mapping) or depth > 3:
        return None
    if obj and all(isinstance(key, str) and isinstance(value, Tensor) for key, value in obj.items()):
        return dict(obj)
    for key in STATE_DICT_KEYS:
        found = _find_state_dict(obj.get(key), depth + 1)
        if found is not None:
            return found
    return None


def strip_wrapper_prefixes(tensors: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Remove ``module.`` / ``_orig_mod.`` prefixes that every key shares, unless the keys already fit."""
    while set(tensors) != expected:
        prefix = next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in tensors)), None)
        if prefix is None:
            break
        tensors = {key[len(prefix):]: value for key, value in tensors.items()}
    return tensors


def fit_state_dict(model: nn.Module, tensors: dict[str, Tensor], path, *, argument: str = "weights",
                   strict: bool = True) -> None:
    """Load ``tensors`` into ``model``; a CheckpointError lists the missing / unexpected keys and shape mismatches."""
    expected = unwrap(model).state_dict()
    tensors = strip_wrapper_prefixes(tensors, set(expected))
    problems = mismatch_report(expected, tensors, strict=strict)
    if problems:
        hint = ("pass weights saved from this architecture (or the model kwargs they were trained with)"
                if not {"mean", "std"} <= set(tensors) - set(expected) else
                "these come from a Normalized gradguard model: pass its run directory as the model instead")
        raise CheckpointError(f"{argument}: the tensors in {str(path)!r} do not fit the model: {problems}; {hint}")
    try:
        unwrap(model).load_state_dict(tensors, strict=strict)
    except RuntimeError as error:
        raise CheckpointError(f"{argument}: weights in {str(path)!r} do not fit the model: "
                              f"{_first_line(error)}") from None


def mismatch_report(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], *, strict: bool = True) -> str:
    """'' when ``found`` fits ``expected``; else one line: missing and unexpected keys (first few, with counts)
    and shape mismatches."""
    parts = []
    if strict:
        missing = [key for key in expected if key not in found]
        unexpected = [key for key in found if key not in expected]
        parts += [_listed(len(missing), "missing key", missing), _listed(len(unexpected), "unexpected key", unexpected)]
    shapes = [f"{key} file {tuple(found[key].shape)} vs model {tuple(value.shape)}" for key, value in expected.items()
              if key in found and found[key].shape != value.shape]
    parts.append(_listed(len(shapes), "shape mismatch", shapes, plural="es"))
    return "; ".join(part for part in parts if part)


def _listed(count: int, noun: str, items: list[str], plural: str = "s") -> str:
    if not count:
        return ""
    shown = ", ".join(items[:SHOW_KEYS]) + (", …" if count > SHOW_KEYS else "")
    return f"{count} {noun}{plural if count != 1 else ''} ({shown})"


def load_weights(model: nn.Module, path, *, strict: bool = True) -> nn.Module:
    """Load weights into an existing ``model`` from a ``.safetensors`` file, a run directory, or a foreign
    ``.pt``/``.pth``/``.bin`` state dict (``torch.load(weights_only=True)``: tensors only, never arbitrary pickles).
    Checkpoint containers and DDP / torch.compile prefixes are handled; a ``Normalized`` model takes weights
    saved for the model it wraps as well as its own."""
    tensors = read_state_dict(path, argument="path")
    target = unwrap(model)
    if isinstance(target, Normalized) and "mean" not in tensors:  # weights of the wrapped model alone
        target = target.model
    fit_state_dict(target, tensors, path, argument="path", strict=strict)
    return model
