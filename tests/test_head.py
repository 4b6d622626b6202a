"""SideNet head: shapes, pooling grid, argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sidenet import SideNet


@pytest.mark.parametrize(
    ("feature_shape", "pool_size", "in_features"),
    [
        ((8, 16, 16), 4, 8 * 4 * 4),
        ((8, 16, 16), 1, 8),
        ((3, 2, 3), 4, 3 * 2 * 3),  # grid capped at the 2x3 map
        ((5, 1, 1), 4, 5),
        ((6, 7, 9), 8, 6 * 7 * 8),  # capped on one side only
        ((12,), 4, 12),
    ],
)
def test_output_shape_and_in_features(feature_shape: tuple[int, ...], pool_size: int, in_features: int) -> None:
    torch.manual_seed(0)
    head = SideNet(feature_shape, num_classes=5, hidden=16, pool_size=pool_size)
    assert head.in_features == in_features
    features = torch.randn(3, *feature_shape)
    pooled = head.pooled(features)
    assert pooled.shape == (3, in_features)
    assert head(features).shape == (3, 5)
    torch.testing.assert_close(head.classify(pooled), head(features))


def test_pooling_is_average_over_grid_cells() -> None:
    head = SideNet((2, 4, 4), num_classes=2, hidden=4, pool_size=2)
    features = torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 4)
    expected = features.reshape(1, 2, 2, 2, 2, 2).mean(dim=(3, 5)).flatten(1)
    torch.testing.assert_close(head.pooled(features), expected)


@pytest.mark.parametrize(
    ("feature_shape", "pool_size"), [((16, 28, 28), 7), ((8, 16, 16), 4), ((6, 7, 9), 3), ((3, 2, 3), 4)]
)
def test_pooling_equals_adaptive_average_pooling(feature_shape: tuple[int, ...], pool_size: int) -> None:
    """Fixed windows where the grid divides the map (faster on a CPU), adaptive ones elsewhere: the values
    of adaptive average pooling either way, so a SideNet saved before loads to the same answers."""
    head = SideNet(feature_shape, num_classes=2, hidden=4, pool_size=pool_size)
    grid = (min(pool_size, feature_shape[1]), min(pool_size, feature_shape[2]))
    divides = feature_shape[1] % grid[0] == 0 and feature_shape[2] % grid[1] == 0
    assert isinstance(head.pool[0], nn.AvgPool2d if divides else nn.AdaptiveAvgPool2d)
    features = torch.randn(5, *feature_shape, generator=torch.Generator().manual_seed(0))
    expected = nn.functional.adaptive_avg_pool2d(features, grid).flatten(1)
    torch.testing.assert_close(head.pooled(features), expected, rtol=0, atol=1e-6)


def test_vector_features_used_as_they_are() -> None:
    head = SideNet((6,), num_classes=3, hidden=4)
    features = torch.randn(2, 6)
    assert torch.equal(head.pooled(features), features)
    assert isinstance(head.mlp[0], nn.Linear) and head.mlp[0].in_features == 6
    assert head.mlp[-1].out_features == 3


def test_hidden_width() -> None:
    head = SideNet((4, 2, 2), num_classes=3, hidden=7)
    assert head.mlp[0].out_features == 7 and head.mlp[2].in_features == 7


@pytest.mark.parametrize(
    ("feature_shape", "shape"),
    [
        ((8, 4, 4), (2, 8, 4, 5)),
        ((8, 4, 4), (2, 7, 4, 4)),
        ((8, 4, 4), (2, 8 * 16)),
        ((10,), (2, 11)),
        ((10,), (2, 1, 10)),
    ],
)
def test_wrong_feature_shape_raises(feature_shape: tuple[int, ...], shape: tuple[int, ...]) -> None:
    head = SideNet(feature_shape, num_classes=3, hidden=4)
    with pytest.raises(ValueError, match="SideNet expects features of shape"):
        head(torch.zeros(shape))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"feature_shape": (3, 4)}, "feature_shape"),
        ({"feature_shape": ()}, "feature_shape"),
        ({"feature_shape": (3, 0, 4)}, "feature_shape"),
        ({"num_classes": 1}, "num_classes"),
        ({"hidden": 0}, "hidden"),
        ({"pool_size": 0}, "pool_size"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    args = {"feature_shape": (4, 8, 8), "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        SideNet(**args)
