"""The SideNet: a one-hidden-layer perceptron that classifies from a MainNet's tap activations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["SideNet"]


class SideNet(nn.Module):
    """Pooling, then Linear -> ReLU -> Linear.

    Args:
        feature_shape: shape of one sample's tap features: ``(C, H, W)`` for convolutional maps
            (average-pooled to a ``pool_size`` x ``pool_size`` grid, then flattened) or ``(D,)``
            for vectors (used as they are).
        num_classes: number of classes; must equal the MainNet's.
        hidden: width of the hidden layer.
        pool_size: side of the pooling grid for convolutional maps (capped at the map's size); 7 by
            default, the grid that won on validation in ``benchmarks/sidenet_design.py`` (4 before).
    """

    def __init__(self, feature_shape: Sequence[int], num_classes: int, hidden: int = 256, pool_size: int = 7) -> None:
        super().__init__()
        feature_shape = tuple(int(d) for d in feature_shape)
        if len(feature_shape) not in (1, 3) or min(feature_shape) < 1:
            raise ValueError(f"feature_shape must be (C, H, W) or (D,), got {feature_shape}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if hidden < 1 or pool_size < 1:
            raise ValueError(f"hidden and pool_size must be positive, got {hidden} and {pool_size}")
        self.feature_shape = feature_shape
        self.num_classes = num_classes
        self.hidden = hidden
        self.pool_size = pool_size
        if len(feature_shape) == 3:
            channels, height, width = feature_shape
            grid = (min(pool_size, height), min(pool_size, width))
            # Where the grid divides the map, the same means by fixed windows: PyTorch's CPU kernel for those
            # runs faster than the adaptive one (every batch pays it, exit or not), with equal values.
            windows = (height // grid[0], width // grid[1])
            divides = height % grid[0] == 0 and width % grid[1] == 0
            pool = nn.AvgPool2d(windows) if divides else nn.AdaptiveAvgPool2d(grid)
            self.pool: nn.Module = nn.Sequential(pool, nn.Flatten())
            in_features = channels * grid[0] * grid[1]
        else:
            self.pool = nn.Identity()
            in_features = feature_shape[0]
        self.in_features = in_features
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """The flat vector the perceptron reads; training caches these instead of whole maps."""
        if tuple(features.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"SideNet expects features of shape (N, {', '.join(map(str, self.feature_shape))}), "
                f"got {tuple(features.shape)}"
            )
        return self.pool(features)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits from pooled features, in the SideNet's dtype.

        Features in another floating dtype (a bfloat16 MainNet feeding a float32 SideNet, or the
        reverse) are cast first: ``nn.Linear`` refuses mixed dtypes. A no-op when they agree.
        """
        return self.mlp(pooled.to(self.mlp[0].weight.dtype))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pooled(features))
