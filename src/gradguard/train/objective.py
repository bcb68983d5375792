"""The training objective's parts: J = a·L + r·‖θ‖² needs ‖θ‖² over the regularised parameters (biases and
normalisation layers excluded by default), and the step clips gradients element-wise and by global norm."""
from __future__ import annotations

import functools
import operator
from typing import Sequence

import torch
from torch import Tensor, nn

from ..models import unwrap

NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
               nn.InstanceNorm2d, nn.InstanceNorm3d, nn.SyncBatchNorm)


def regularised_parameters(model: nn.Module, l2_exclude: Sequence[str]) -> list[nn.Parameter]:
    """The parameters ‖θ‖² runs over: all but those named "bias" and those of normalisation layers ("norm"),
    as ``l2_exclude`` says."""
    excluded: set[int] = set()
    for module in unwrap(model).modules():
        if "norm" in l2_exclude and isinstance(module, NORM_LAYERS):
            excluded.update(id(p) for p in module.parameters(recurse=False))
    params = []
    for name, p in unwrap(model).named_parameters():
        if id(p) in excluded or ("bias" in l2_exclude and name.split(".")[-1] == "bias"):
            continue
        params.append(p)
    return params


def l2_penalty(params: Sequence[Tensor], device: torch.device) -> Tensor:
    """‖θ‖² over ``params``, summed left to right (zero on ``device`` when there are none)."""
    squares = [(p * p).sum() for p in params]
    if not squares:  # every parameter is excluded
        return torch.zeros((), device=device)
    return functools.reduce(operator.add, squares)  # summed left to right, as sum() does


def clip_gradients(model: nn.Module, clip_grad_value: float | None, clip_grad_norm: float | None) -> float:
    """Return the pre-clip global gradient L2 norm, then clip by value and by global norm."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    if clip_grad_value is not None:
        for g in grads:
            g.clamp_(-clip_grad_value, clip_grad_value)
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip_grad_norm)
    return norm
