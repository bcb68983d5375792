"""Weight averaging (EMA) as a callback: the averaged weights are swapped in for validation and saving, kept in
checkpoints as ``ema.*``, and installed in the model at the end of ``fit``."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...models import unwrap
from .base import TrainCallback, TrainerLike


class WeightAverage:
    """Exponential moving average of a model's weights (Polyak averaging; as used for robust models by
    Gowal et al. 2020): after every optimiser step each floating-point parameter's shadow becomes
    d·shadow + (1 − d)·θ, and buffers (BatchNorm running statistics, counters) are copied as they are."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.parameter_names = {name for name, _ in model.named_parameters()}
        self.shadow = {key: value.detach().clone() for key, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            if key in self.parameter_names and value.dtype.is_floating_point:
                self.shadow[key].mul_(self.decay).add_(value, alpha=1 - self.decay)
            else:
                self.shadow[key].copy_(value)


def ema_decay_value(value: Any) -> float | None:
    """The EMA decay: None (off) or a number strictly between 0 and 1."""
    if value is None:
        return None
    try:
        decay = float(value)
    except (TypeError, ValueError):
        decay = math.nan
    if not 0 < decay < 1:  # also rejects NaN
        raise ConfigError(f"ema_decay: expected a number in (0, 1) such as 0.999 (or None for no averaging), "
                          f"got {value!r}")
    return decay


class WeightAveraging(TrainCallback):
    """Keeps a ``WeightAverage`` of the model (``average``, made at ``setup``) and updates it after every step."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.average: WeightAverage | None = None
        self.device: Any = None

    def setup(self, trainer: TrainerLike) -> None:
        self.device = trainer.device
        self.average = WeightAverage(unwrap(trainer.model), self.decay)

    def on_batch_end(self, trainer: TrainerLike, objective: Tensor, y: Tensor) -> None:
        assert self.average is not None
        self.average.update(unwrap(trainer.model))

    @contextlib.contextmanager
    def evaluated_weights(self, trainer: TrainerLike) -> Iterator[None]:
        """Inside: the model holds the averaged weights; after: the training weights again, exactly."""
        assert self.average is not None
        module = unwrap(trainer.model)
        live = {key: value.detach().clone() for key, value in module.state_dict().items()}
        module.load_state_dict(self.average.shadow)
        try:
            yield
        finally:
            module.load_state_dict(live)

    def install_final_weights(self, trainer: TrainerLike, record: dict) -> int | None:
        assert self.average is not None
        unwrap(trainer.model).load_state_dict(self.average.shadow)
        return len(trainer.history)

    def model_metadata(self) -> dict:
        return {"weights": f"ema (decay {self.decay:g})"}

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        assert self.average is not None
        return {f"ema.{key}": value for key, value in self.average.shadow.items()}, {}

    def load_state_dict(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        assert self.average is not None
        self.average.shadow = {key[len("ema."):]: value.to(self.device) for key, value in tensors.items()
                               if key.startswith("ema.")}
