"""Named datasets. ``load_dataset("digits")`` is the embedded default (scikit-learn's bundled 8x8 digits)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import DataError


@dataclass
class Dataset:
    """Train and test tensors in pixel space [0, 1], images shaped (N, C, H, W), labels int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: list[str]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _digits(test_fraction: float = 0.25, split_seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), [0, 1]
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(split_seed).permutation(len(y)))  # fixed split
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], [str(i) for i in range(10)])


def load_dataset(name: str = "digits", **kwargs) -> Dataset:
    """Load a dataset by name."""
    if name == "digits":
        return _digits(**kwargs)
    raise DataError(f"name: unknown dataset {name!r}; available: ['digits']")
