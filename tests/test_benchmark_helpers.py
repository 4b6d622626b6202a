"""Helpers of the compression benchmarks that change models: they must keep the network valid."""

from __future__ import annotations

import pytest
import torch
from benchmarks.resnet_compression import prune_channels

from sidenet.models.cifar_resnet import cifar_resnet


@torch.no_grad()
def test_channel_pruning_shrinks_blocks_and_keeps_taps() -> None:
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=4, in_channels=1).eval()
    x = torch.randn(3, 1, 16, 16)
    same = prune_channels(model, 0.0)
    torch.testing.assert_close(same(x), model(x))  # nothing removed, nothing changed
    half = prune_channels(model, 0.5)
    assert sum(p.numel() for p in half.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())
    assert half.layer1[0].conv1.out_channels == 8 and half.layer1[0].conv2.in_channels == 8
    assert half.layer1(half.forward_stem(x)).shape == model.layer1(model.forward_stem(x)).shape
    assert half(x).shape == (3, 4)
    # the kept filters are those with the largest L1 norms
    norms = model.layer2[0].conv1.weight.abs().sum((1, 2, 3))
    kept = half.layer2[0].conv1.weight.abs().sum((1, 2, 3))
    assert kept.min() >= norms.sort(descending=True).values[len(kept) - 1] - 1e-6


def test_pruning_leaves_the_original_alone() -> None:
    model = cifar_resnet(8, num_classes=4, in_channels=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_channels(model, 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError):
        prune_channels(model, 1.5)
