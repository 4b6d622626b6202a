"""CIFAR-style ResNets of He et al. (2016), section 4.2: depth 6n+2 with three stages of n blocks.

Module names follow the widely shared public CIFAR-10 checkpoints (``conv1``, ``bn1``,
``layer1.0.conv1``, ..., ``linear``), and the shortcut is the paper's "option A": a strided identity
whose missing channels are zero-padded, so those checkpoints load with ``load_state_dict`` as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "cifar_resnet", "CIFAR_RESNET_DEPTHS"]

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes - in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stem, stages of 16/32/64 channels, global pooling, ``linear``.

    Args:
        depth: 6n+2, one of 20, 32, 44, 56, 110 (any 6n+2 works).
        num_classes: output classes.
        in_channels: 3 for CIFAR, 1 for grey images such as Fashion-MNIST.
        width: channels of the first stage (16 in the paper); later stages double it.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes = width
        self.layer1 = self._make_stage(planes, width, n, stride=1)
        self.layer2 = self._make_stage(width, 2 * width, n, stride=2)
        self.layer3 = self._make_stage(2 * width, 4 * width, n, stride=2)
        self.linear = nn.Linear(4 * width, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.forward_head(x)


def cifar_resnet(depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """Build a CIFAR ResNet of the given depth (see :class:`CifarResNet`)."""
    return CifarResNet(depth=depth, num_classes=num_classes, in_channels=in_channels, width=width)
