"""Assertions shared by the attack tests: an attack must leave the model exactly as it found it."""
from __future__ import annotations

import torch
from torch import nn


def model_state(model: nn.Module):
    """Everything an attack must leave alone: modes, requires_grad flags, parameters, .grad fields."""
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


def assert_same_state(before, after) -> None:
    assert before[0] == after[0], "train/eval modes changed"
    assert before[1] == after[1], "requires_grad flags changed"
    for a, b in zip(before[2], after[2], strict=False):
        assert torch.equal(a, b), "parameters changed"
    for a, b in zip(before[3], after[3], strict=False):
        assert (a is None and b is None) or torch.equal(a, b), ".grad changed"


class ExplodingModel(nn.Module):
    """Raises on the third forward pass, in the middle of an attack."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.linear = nn.Linear(16, classes)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return self.linear(x.flatten(1))
