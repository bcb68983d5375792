"""Shared fixtures. Tests run on CPU with few threads: the CI machine has 2 cores."""
from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits():
    from gradguard.data import load_dataset

    return load_dataset("digits")


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30, lr: float = 1e-2,
                     seed: int = 0) -> nn.Module:
    """Plain Adam training loop used by tests that need an accurate model (not the Trainer under test)."""
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for start in range(0, len(y), 128):
            batch = order[start:start + 128]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_mlp(digits):
    """An MLP with ~97 % clean test accuracy on digits, trained once per session."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return train_classifier(model, digits.x_train, digits.y_train)
