"""Models: the ``Normalized`` wrapper (so eps lives in pixel space) and the model zoo by name."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class Normalized(nn.Module):
    """Wraps ``model`` so it takes pixel-space inputs: forward(x) = model((x - mean) / std).

    Attacks then measure eps in pixel space, the space users think in. ``mean``/``std`` are per channel
    (a sequence) or scalars; they are buffers, so they move with ``.to(device)``.
    """

    def __init__(self, model: nn.Module, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        super().__init__()
        self.model = model
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        if bool((std_t <= 0).any()):
            from .errors import ConfigError

            raise ConfigError(f"std: must be > 0, got {std!r}")
        shape = (1, -1, 1, 1) if mean_t.dim() == 1 and mean_t.numel() > 1 else ()
        self.register_buffer("mean", mean_t.reshape(shape) if shape else mean_t)
        self.register_buffer("std", std_t.reshape(shape) if shape else std_t)

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)
