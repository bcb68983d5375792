"""One resolver for every model source: ``resolve(spec, weights, mean=, std=, **kwargs) -> nn.Module``.

``spec`` is an ``nn.Module``, a run directory or ``.safetensors`` file, a zoo name, ``package.module:callable``
(the user's own code, found on the current directory and PYTHONPATH), ``torchvision:NAME`` or ``timm:NAME``.
The result carries a JSON record of how it was made (``model_source``), which ``save`` writes into the run
directory and ``resolve_source`` turns back into the same model; ``load`` rebuilds a model from such a run
directory (the weight file formats themselves live in ``weights``).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, GradguardError
from .base import Normalized, Stats, make_source, model_source, normalise, parse_stats, record, unwrap
from .outputs import LogitsKey, parse_logits_key, with_logits
from .weights import WEIGHTS_FILE, fit_state_dict, read_safetensors, read_state_dict, weight_paths
from .zoo import MODELS, build_model, list_models

CALLABLE_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
HUBS = ("torchvision", "timm")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SPEC_FORMS = ("a zoo name", "a run directory", "a .safetensors file", "package.module:callable", "torchvision:NAME",
              "timm:NAME")


def resolve(spec: nn.Module | str | os.PathLike, weights: str | os.PathLike | None = None, *,
            mean: Stats | None = None, std: Stats | None = None, map_location: str | torch.device = "cpu",
            logits: LogitsKey | None = None, **kwargs) -> nn.Module:
    """The model ``spec`` names, with ``weights`` loaded and, given ``mean``/``std``, wrapped in ``Normalized``.

    ``spec``: an ``nn.Module`` (used as is); a gradguard run directory or ``.safetensors`` file; a zoo name
    (``list_models()``); ``package.module:callable`` (a factory or class, called with ``**kwargs``);
    ``torchvision:NAME`` / ``timm:NAME`` (built without pretrained weights, with ``**kwargs``).
    ``weights``: ``.safetensors`` or a ``.pt``/``.pth``/``.bin`` state dict (read tensors-only), loaded strictly into
    the model before normalisation. ``mean``/``std``: one value or one per channel, so eps stays in pixel space.
    ``logits``: for a model whose output is not a logits tensor, the key or index that holds them (``Logits``;
    an output with ``.logits`` needs none), recorded so that a run directory rebuilds the same selection. The mode (train/eval) is left as the builder made it. Errors name the argument (``model``, ``weights``,
    ``model_kwargs``, ``mean``/``std``) and the fix.
    """
    mean, std = parse_stats(mean, std)
    model = _base_model(spec, kwargs)
    if weights is not None:
        model = _load_weights(model, weights)
    return with_logits(normalise(model, mean, std), parse_logits_key(logits)).to(map_location)


def resolve_source(source: dict, *, with_weights: bool = True, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from its ``model_source`` record; ``with_weights=False`` skips the recorded weights file
    (a run directory then loads its own). A weights file whose SHA-256 changed since it was recorded is refused."""
    if not isinstance(source, dict) or not isinstance(source.get("spec"), str):
        raise ConfigError(f"source: expected a record from gradguard.models.model_source() with a 'spec' string, "
                          f"got {source!r:.80}")
    kwargs = source.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"source: 'kwargs' must be a dict of keyword arguments, got {kwargs!r:.80}")
    weights = source.get("weights") if with_weights else None
    if weights is not None:
        _check_recorded_weights(Path(weights), source.get("weights_sha256"))
    try:
        return resolve(source["spec"], weights, mean=source.get("mean"), std=source.get("std"),
                       map_location=map_location, logits=source.get("logits"), **kwargs)
    except ConfigError as error:
        if source.get("module_file") and "no module" in str(error):
            raise ConfigError(f"{error} (when recorded it was {source['module_file']})") from None
        raise


def describe_source(source: dict | None) -> str:
    """One human line for reports, e.g. ``mymodels:Net(width=2) + net.pth (sha256 1a2b3c4d…), normalised
    mean=(0.49, 0.48, 0.45) std=0.25``."""
    if not isinstance(source, dict) or not source.get("spec"):
        return "a model gradguard did not build (no source recorded)"
    kwargs = source.get("kwargs") or {}
    text = str(source["spec"])
    if kwargs:
        text += "(" + ", ".join(f"{key}={value!r}" for key, value in kwargs.items()) + ")"
    if source.get("weights"):
        sha = source.get("weights_sha256")
        text += f" + {Path(source['weights']).name}" + (f" (sha256 {sha[:8]}…)" if sha else "")
    if source.get("mean") is not None:
        text += f", normalised mean={_format_stat(source['mean'])} std={_format_stat(source.get('std'))}"
    return text


def _format_stat(value) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(f"{float(v):g}" for v in value) + ")"
    return f"{float(value):g}" if value is not None else "?"


# ------------------------------------------------------------------------------------------------
# The spec forms
# ------------------------------------------------------------------------------------------------
def _base_model(spec, kwargs: dict) -> nn.Module:
    if isinstance(spec, nn.Module):
        _no_kwargs(kwargs, "an nn.Module")
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigError(f"model: expected an nn.Module or a string ({', '.join(SPEC_FORMS)}), "
                          f"got {type(spec).__name__}")
    text = os.fspath(spec)
    path = Path(text)
    if text in MODELS and not (path / WEIGHTS_FILE).is_file():  # a zoo name, unless a run directory has that name
        return build_model(text, **kwargs)
    if path.exists():
        return _from_path(path, kwargs)
    if text.split(":", 1)[0] in HUBS and ":" in text:
        return _from_hub(text, kwargs)
    if text.rpartition(":")[0].endswith(".py"):
        module = Path(text.rpartition(":")[0])
        raise ConfigError(f"model: {text!r} names a file; write the module name instead — "
                          f"{module.stem}:{text.rpartition(':')[2]} — and run from {str(module.parent)!r} or put it on "
                          "PYTHONPATH")
    if CALLABLE_SPEC.match(text):
        return _from_callable(text, kwargs)
    if text.endswith(".safetensors") or os.sep in text:
        raise CheckpointError(f"model: no run directory or file at {text!r}; check the path")
    raise ConfigError(f"model: unknown model {text!r}; give one of: {', '.join(SPEC_FORMS)} "
                      f"(zoo: {', '.join(list_models())})")


def _from_path(path: Path, kwargs: dict) -> nn.Module:
    if path.suffix.lower() in WEIGHT_SUFFIXES:
        raise ConfigError(f"model: {str(path)!r} holds weights, not an architecture; pass the architecture as model "
                          "(package.module:callable, torchvision:NAME, a zoo name) and this file as weights")
    if not (path.is_dir() or path.suffix == ".safetensors"):
        raise ConfigError(f"model: {str(path)!r} is neither a run directory nor a .safetensors file; give one of: "
                          f"{', '.join(SPEC_FORMS)}")
    _no_kwargs(kwargs, "a run directory (it rebuilds its own architecture)")
    return load(path)


def _no_kwargs(kwargs: dict, what: str) -> None:
    if kwargs:
        raise ConfigError(f"model_kwargs: {sorted(kwargs)} do not apply to {what}; drop them, or give the model as a "
                          "name or package.module:callable")


def _from_callable(text: str, kwargs: dict) -> nn.Module:
    module_name, attribute = text.split(":", 1)
    factory = import_callable(module_name, attribute)
    module_file = getattr(sys.modules.get(module_name), "__file__", None)
    return record(call_factory(factory, text, kwargs), source=make_source(text, kwargs, module_file=module_file))


def _from_hub(text: str, kwargs: dict) -> nn.Module:
    package, name = text.split(":", 1)
    if not name:
        raise ConfigError(f"model: {text!r} names no model; write e.g. {package}:resnet18")
    try:
        hub = importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"model: {text!r} needs the {package} package, which is not installed; "
                          f"pip install {package} (gradguard itself does not depend on it)") from None
    factory: Callable[..., object]
    if package == "torchvision":
        factory = functools.partial(hub.models.get_model, name, weights=None)
    else:
        factory = functools.partial(hub.create_model, name, pretrained=False)
    return record(call_factory(factory, text, kwargs), source=make_source(text, kwargs))


def import_callable(module_name: str, attribute: str) -> Callable[..., object]:
    """``module_name.attribute`` imported from the current directory or PYTHONPATH; ConfigError naming ``model``."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # after PYTHONPATH and site-packages, so a local file never shadows an installed package
    importlib.invalidate_caches()  # a module written since the last import must be seen
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise ConfigError(f"model: no module {module_name!r} in the current directory ({cwd}) or on PYTHONPATH; "
                              f"put {module_name.split('.')[0]}.py there or add its folder to PYTHONPATH") from None
        raise ConfigError(f"model: importing {module_name!r} failed: {error}; install that package or fix the "
                          "import") from error
    except Exception as error:
        raise ConfigError(f"model: importing {module_name!r} raised {type(error).__name__}: {error}; fix the "
                          "module") from error
    target: object = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"model: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                              f"{attribute!r}; choose one of {_callables_in(module)}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"model: {module_name}:{attribute} is a {type(target).__name__}, not a callable; name a "
                          "factory function or an nn.Module class")
    return target


def _callables_in(module) -> list[str]:
    return sorted(name for name, value in vars(module).items() if not name.startswith("_") and callable(value)
                  and getattr(value, "__module__", None) == module.__name__)


def call_factory(factory: Callable[..., object], label: str, kwargs: dict) -> nn.Module:
    """``factory(**kwargs)``, checked: kwargs that do not fit its signature, an exception inside it, or a result
    that is not an ``nn.Module`` each become one ConfigError line naming the argument and the fix."""
    try:
        signature: inspect.Signature | None = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C extensions have none
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as error:
            raise ConfigError(f"model_kwargs: {label} cannot take {_call_text(kwargs)}: {error}; its parameters are "
                              f"{signature}") from None
    try:
        model = factory(**kwargs)
    except Exception as error:
        raise ConfigError(f"model: {label}({_call_text(kwargs)}) raised {type(error).__name__}: {error}; fix the "
                          "factory or pass other model_kwargs") from error
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {label} returned a {type(model).__name__}, not a torch.nn.Module; make it return "
                          "the model")
    return model


def _call_text(kwargs: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in kwargs.items())


# ------------------------------------------------------------------------------------------------
# A run directory: rebuild the model ``save`` wrote
# ------------------------------------------------------------------------------------------------
def load(path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved with ``save`` (a run directory or a ``.safetensors`` file).

    The architecture comes from the sidecar's (or the header's) source — a zoo name, ``package.module:callable``,
    ``torchvision:``/``timm:`` name with its kwargs and normalisation — built without its original weights; then the
    run's own weights load strictly. Old sidecars with only a zoo spec still load. Nothing is unpickled. Missing,
    corrupt or mismatching files raise ``CheckpointError``.
    """
    from ..io import sha256_file

    weights_path, sidecar_path = weight_paths(path)
    sidecar = _read_sidecar(sidecar_path)
    expected = sidecar.get("sha256")
    if expected and weights_path.is_file() and sha256_file(weights_path) != expected:
        raise CheckpointError(f"path: {str(weights_path)!r} does not match the SHA-256 in {sidecar_path.name}; "
                              "the file is corrupt or was replaced")
    tensors, header = read_safetensors(weights_path)
    model = _rebuild(_stored_record(sidecar, header, "source"), _stored_record(sidecar, header, "model"), weights_path)
    fit_state_dict(model, tensors, weights_path, argument="path")
    source = model_source(model)
    if source is not None:  # it now holds the run's weights: record those, so resolve_source gives this model back
        source.update(weights=str(weights_path.resolve()), weights_sha256=expected or sha256_file(weights_path))
        record(model, source=source)
    return model.to(map_location)


def _read_sidecar(sidecar_path: Path) -> dict:
    if not sidecar_path.is_file():
        return {}
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"path: sidecar {str(sidecar_path)!r} is not valid JSON ({error})") from None
    return sidecar if isinstance(sidecar, dict) else {}


def _stored_record(sidecar: dict, header: dict[str, str], key: str) -> dict | None:
    if sidecar.get(key):
        return sidecar[key]
    try:
        value = json.loads(header[key]) if header.get(key) else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _rebuild(source: dict | None, spec: dict | None, weights_path: Path) -> nn.Module:
    if source is not None:
        try:
            return resolve_source(source, with_weights=False)
        except GradguardError as error:
            raise type(error)(f"{error} (needed to rebuild the model saved in {str(weights_path)!r})") from None
    if spec and spec.get("name") in MODELS:
        return build_model(spec["name"], **spec.get("kwargs", {}))
    raise CheckpointError(
        f"path: {str(weights_path)!r} does not record how to build its architecture; pass the architecture with "
        "resolve('package.module:callable', weights=path) (CLI: --model ... --weights), or build the model yourself "
        "and call gradguard.models.load_weights(model, path)")


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------
def _load_weights(model: nn.Module, weights: str | os.PathLike) -> nn.Module:
    """Load a weights file into ``model`` (into the wrapped model of a ``Normalized``) and record it."""
    from ..io import sha256_file

    path = Path(weights)
    target = unwrap(model)
    if isinstance(target, Normalized):
        target = target.model
    fit_state_dict(target, read_state_dict(path, argument="weights"), path, argument="weights")
    source = model_source(model)
    if source is not None:
        source.update(weights=str(path.resolve()), weights_sha256=sha256_file(_weights_file(path)))
        record(unwrap(model), source=source)
    return model


def _weights_file(path: Path) -> Path:
    return path / WEIGHTS_FILE if path.is_dir() else path


def _check_recorded_weights(path: Path, expected: str | None) -> None:
    from ..io import sha256_file

    if not path.exists():
        raise CheckpointError(f"weights: the recorded weights file {str(path)!r} no longer exists; restore it, or "
                              "rebuild with with_weights=False and load other weights")
    if expected and sha256_file(_weights_file(path)) != expected:
        raise CheckpointError(f"weights: {str(path)!r} changed since it was recorded (SHA-256 differs); restore the "
                              "original file, or resolve the model again with the new weights")

