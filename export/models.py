"""Reference classifiers defined in the project (torchvision does not import beside the CPU torch).

Every model keeps the arguments it was built with in ``model.config`` so that a checkpoint
(safetensors: weights + this config as metadata) can rebuild it, and uses one module instance
per activation so that ``torch.fx`` sees every layer by name.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm, identity or 1x1 projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, four stages of BasicBlocks (strides 1,2,2,2), GAP, Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 widths: Sequence[int] = (16, 32, 64, 128), blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        self.config = dict(arch="resnet", in_channels=in_channels, num_classes=num_classes,
                           widths=list(widths), blocks=list(blocks))
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, previous = [], widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if index == 0 else 2
            layers = [BasicBlock(previous, width, stride)]
            layers += [BasicBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            previous = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


class VGG(nn.Module):
    """VGG-style CNN: conv stages separated by max-pools, then Flatten -> Linear -> ReLU -> Dropout -> Linear.

    ``head_batchnorm=True`` inserts BatchNorm1d after the first Linear (the variant whose backward
    needs the BN scale).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10,
                 stages: Sequence[Sequence[int]] = ((32,), (64,), (64, 64)),
                 input_size: int = 28, hidden: int = 128, dropout: float = 0.5,
                 head_batchnorm: bool = False):
        super().__init__()
        self.config = dict(arch="vgg", in_channels=in_channels, num_classes=num_classes,
                           stages=[list(s) for s in stages], input_size=input_size, hidden=hidden,
                           dropout=dropout, head_batchnorm=head_batchnorm)
        layers, previous, size = [], in_channels, input_size
        for index, stage in enumerate(stages):
            if index > 0:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            for width in stage:
                layers += [nn.Conv2d(previous, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU()]
                previous = width
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        head = [nn.Linear(previous * size * size, hidden)]
        if head_batchnorm:
            head.append(nn.BatchNorm1d(hidden))
        head += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)]
        self.classifier = nn.Sequential(*head)

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


class DepthwiseSeparable(nn.Module):
    """MobileNet block: 3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        x = self.relu1(self.bn1(self.depthwise(x)))
        return self.relu2(self.bn2(self.pointwise(x)))


class MobileNet(nn.Module):
    """Small MobileNet-style net: 3x3 stem, depthwise-separable blocks, GAP, Dropout, Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, stem: int = 16,
                 blocks: Sequence[Sequence[int]] = ((32, 2), (64, 1), (96, 2), (128, 1)),
                 dropout: float = 0.2):
        super().__init__()
        self.config = dict(arch="mobilenet", in_channels=in_channels, num_classes=num_classes,
                           stem=stem, blocks=[list(b) for b in blocks], dropout=dropout)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(stem), nn.ReLU())
        layers, previous = [], stem
        for width, stride in blocks:
            layers.append(DepthwiseSeparable(previous, width, stride))
            previous = width
        self.blocks = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x):
        x = self.avgpool(self.blocks(self.stem(x)))
        return self.fc(self.dropout(self.flatten(x)))


ARCHITECTURES = {"resnet": ResNet, "vgg": VGG, "mobilenet": MobileNet}

#: Named layouts accepted by ``build_model`` and ``gradprobe train --arch``.
PRESETS = {
    "resnet18": dict(arch="resnet", widths=[64, 128, 256, 512], blocks=[2, 2, 2, 2]),
    "resnet18-quarter": dict(arch="resnet", widths=[16, 32, 64, 128], blocks=[2, 2, 2, 2]),
    "resnet-tiny": dict(arch="resnet", widths=[8, 16, 32, 64], blocks=[1, 1, 1, 1]),
    "vgg": dict(arch="vgg"),
    "vgg-bn": dict(arch="vgg", head_batchnorm=True),
    "mobilenet": dict(arch="mobilenet"),
}


def build_model(spec: str | dict, **overrides) -> nn.Module:
    """Build a reference model from a preset name or a config dict (as stored in ``model.config``)."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown model preset {spec!r}; expected one of {sorted(PRESETS)}")
        spec = PRESETS[spec]
    config = {**spec, **overrides}
    arch = config.pop("arch", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**config)
