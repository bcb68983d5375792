"""The four model families of the diagnostics benchmarks (issue 15): MLP, CNN, a small ResNet with BatchNorm and a
small vision transformer (patch embedding, LayerNorm, nn.MultiheadAttention). Each builder takes the input shape
(C, H, W) and the class count, and a few knobs the fault benchmark plants faults through (activation, depth).

    from diag_models import FAMILIES, build
    model = build("resnet", input_shape=(1, 28, 28))
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}


def mlp(input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10, *, depth: int = 3, width: int = 128,
        activation: str = "relu") -> nn.Module:
    """Flatten → ``depth`` hidden Linear + activation → logits."""
    features = int(torch.tensor(input_shape).prod())
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(features, width), ACTIVATIONS[activation]()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, *, width: int = 16,
        activation: str = "relu", depth: int = 2) -> nn.Module:
    """``depth`` 3×3 conv + activation blocks (stride 2 on the first two), global average pool, Linear."""
    channels, layers = input_shape[0], []
    for i in range(depth):
        out = width * (2 ** min(i, 2))
        layers += [nn.Conv2d(channels, out, 3, stride=2 if i < 2 else 1, padding=1), ACTIVATIONS[activation]()]
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """conv-BN-act-conv-BN plus the identity (or a strided 1×1 projection), then the activation."""

    def __init__(self, cin: int, cout: int, stride: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = ACTIVATIONS[activation]()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
        self.act2 = ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, *, width: int = 16,
           activation: str = "relu", blocks: int = 3) -> nn.Module:
    """Stem conv-BN-act, ``blocks`` residual blocks (widths w, 2w, 4w…, stride 2 after the first), pool, Linear."""
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                               ACTIVATIONS[activation]()]
    channels = width
    for i in range(blocks):
        out = width * (2 ** min(i, 2))
        layers.append(BasicBlock(channels, out, 1 if i == 0 else 2, activation))
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x)) with the given activation."""

    def __init__(self, dim: int, heads: int, activation: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """Patch embedding (strided conv) + learned positions, ``depth`` encoder blocks, LayerNorm, mean pool, head."""

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, *, dim: int = 32,
                 heads: int = 4, depth: int = 2, patch: int | None = None, activation: str = "gelu"):
        super().__init__()
        channels, height, width = input_shape
        patch = patch or (4 if height >= 16 else 2)
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        tokens = (height // patch) * (width // patch)
        self.position = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, activation) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def transformer(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, **kwargs) -> nn.Module:
    return TinyViT(input_shape, num_classes, **kwargs)


FAMILIES: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "resnet": resnet, "transformer": transformer}


def build(family: str, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, **kwargs) -> nn.Module:
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)}, got {family!r}")
    return FAMILIES[family](input_shape, num_classes, **kwargs)
