"""Models from anywhere: one resolver (``resolve``) for zoo names, run directories, ``package.module:callable``,
``torchvision:``/``timm:`` names and foreign weights; the ``Normalized`` wrapper (so eps lives in pixel space);
the ``Logits`` output adapter (for models that return a dict, a tuple or a Hugging Face ``ModelOutput``);
safe safetensors checkpoints that record how to rebuild their model.

    model = resolve("mymodels:Net", "net.pth", mean=(0.49, 0.48, 0.45), std=0.25, width=2)
    save(model, "runs/mine"); load("runs/mine")          # rebuilt from the recorded source
"""
from __future__ import annotations

from .base import SOURCE_ATTRIBUTE, SPEC_ATTRIBUTE, Normalized, model_source, model_spec, parse_stats, unwrap
from .outputs import FirstPass, Logits, as_logits_model, describe_output, first_pass, select_logits, with_logits
from .sources import call_factory, describe_source, import_callable, load, resolve, resolve_source
from .weights import (
                   FORMAT,
                   SIDECAR_FILE,
                   WEIGHTS_FILE,
                   fit_state_dict,
                   load_weights,
                   read_safetensors,
                   read_state_dict,
                   save,
                   state_tensors,
)
from .zoo import ACTIVATIONS, INITS, MODELS, PreActResNet18, build_model, fmnist_cnn, list_models, mlp, small_cnn

__all__ = [
    "ACTIVATIONS", "FORMAT", "INITS", "MODELS", "SIDECAR_FILE", "SOURCE_ATTRIBUTE", "SPEC_ATTRIBUTE", "WEIGHTS_FILE",
    "FirstPass", "Logits", "Normalized", "as_logits_model", "describe_output", "first_pass", "select_logits",
    "with_logits", "PreActResNet18", "build_model", "call_factory", "describe_source", "fit_state_dict", "fmnist_cnn",
    "import_callable", "list_models", "load", "load_weights", "mlp", "model_source", "model_spec", "parse_stats",
    "read_safetensors", "read_state_dict", "resolve", "resolve_source", "save", "small_cnn", "state_tensors",
    "unwrap",
]
