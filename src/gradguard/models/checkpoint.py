"""Where the model checkpoint functions used to live (a re-export shim, kept one step): the weight file formats
(``save``, ``read_safetensors``, ``read_state_dict``, ``fit_state_dict``, ``load_weights``) are in ``weights``, and
``load`` (rebuild a saved model from its sidecar: one spec form of the resolver) is in ``sources``.
"""
from __future__ import annotations

from .sources import load
from .weights import (
    FORMAT,
    SHOW_KEYS,
    SIDECAR_FILE,
    STATE_DICT_KEYS,
    WEIGHTS_FILE,
    WRAPPER_PREFIXES,
    fit_state_dict,
    load_weights,
    mismatch_report,
    read_safetensors,
    read_state_dict,
    save,
    state_tensors,
    strip_wrapper_prefixes,
)

__all__ = ["FORMAT", "SHOW_KEYS", "SIDECAR_FILE", "STATE_DICT_KEYS", "WEIGHTS_FILE", "WRAPPER_PREFIXES",
           "fit_state_dict", "load", "load_weights", "mismatch_report", "read_safetensors", "read_state_dict", "save",
           "state_tensors", "strip_wrapper_prefixes"]
