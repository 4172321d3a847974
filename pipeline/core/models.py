"""Model registry. Every model is `fc(features(x))` with GroupNorm, no BatchNorm and no in-place
ops, so Opacus can hook it and finetuning strategies can name the head and the norms."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Classifier(nn.Module):
    """A backbone that maps images to a feature vector, and a linear head."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _groups(channels: int) -> int:
    return min(32, channels // 4) if channels >= 8 else 1


def _conv_gn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(_groups(cout), cout), nn.ReLU()]


def gn_cnn(in_channels: int, num_classes: int, width: int = 32) -> Classifier:
    """Small GroupNorm CNN (3 conv blocks, global average pool): the CPU default."""
    features = nn.Sequential(
        *_conv_gn(in_channels, width),
        *_conv_gn(width, 2 * width, stride=2),
        *_conv_gn(2 * width, 4 * width, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return Classifier(features, 4 * width, num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm and an out-of-place residual add (Opacus-safe)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(_groups(cout), cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(_groups(cout), cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet18_gn(in_channels: int, num_classes: int, width: int = 64) -> Classifier:
    """GroupNorm ResNet-18 with a CIFAR-style 3×3 stem (seed 000's model)."""
    layers: list[nn.Module] = _conv_gn(in_channels, width)
    cin = width
    for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
        stride = 1 if i == 0 else 2
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), cin, num_classes)


def mlp(in_channels: int, num_classes: int, width: int = 32) -> Classifier:
    """Two-layer perceptron; has no GroupNorm and no convolutions."""
    hidden = 4 * width
    features = nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU())
    return Classifier(features, hidden, num_classes)


MODELS: dict[str, Callable[..., Classifier]] = {"gn_cnn": gn_cnn, "resnet18_gn": resnet18_gn, "mlp": mlp}


def build(name: str, input_shape: tuple[int, ...], num_classes: int, width: int, seed: int) -> Classifier:
    """Build a model with seeded initial weights (lazy layers materialised)."""
    if name not in MODELS:
        raise ValueError(f"model.name '{name}' unknown; choose one of {', '.join(MODELS)}.")
    torch.manual_seed(seed)
    model = MODELS[name](input_shape[0], num_classes, width=width)
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))  # materialise LazyLinear
    return model
