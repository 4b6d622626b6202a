"""Builders shared by the tests: a tiny CIFAR ResNet MainNet on 1x16x16 images and a linearly
separable synthetic task. Fixtures wrapping them live in conftest.py."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from sidenet.models.cifar_resnet import cifar_resnet

IMAGE_SHAPE = (1, 16, 16)
NUM_CLASSES = 4


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-default running statistics and affine parameters, as a trained
    network has (so that running the MainNet in train mode would visibly change them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.num_batches_tracked.fill_(100)
    return model


def build_tiny_mainnet(seed: int = 0, depth: int = 8, num_classes: int = NUM_CLASSES) -> nn.Module:
    torch.manual_seed(seed)
    model = cifar_resnet(depth, num_classes=num_classes, in_channels=IMAGE_SHAPE[0], width=8)
    return randomize_batchnorm(model, seed).eval()


def make_images(n: int, seed: int = 0, shape: tuple[int, ...] = IMAGE_SHAPE) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def threshold_between(confidence: torch.Tensor | Sequence[float], quantile: float) -> float:
    """A threshold near the ``quantile`` of ``confidence`` that lies strictly between two distinct
    confidences, with a float32 margin on both sides.

    A threshold taken from a sample's own confidence (a median, a quantile) puts that sample exactly
    on it; its float32 score may differ in the last bit between batch sizes and flip its exit. Tests
    choose thresholds here instead. Returns 0.0 for ``quantile`` 0 (everyone exits) and
    :data:`sidenet.NEVER_EXIT` for 1 when no confidence lies above the top gap.
    """
    values = torch.as_tensor(confidence, dtype=torch.float32).flatten().unique().sort().values.tolist()
    if quantile <= 0.0:
        return 0.0
    if quantile >= 1.0 or len(values) < 2:
        return math.inf
    # The widest gap near the quantile, so that a threshold in its middle is far from both neighbours.
    centre = min(int(quantile * (len(values) - 1)), len(values) - 2)
    window = range(max(0, centre - 2), min(len(values) - 1, centre + 3))
    low = max(window, key=lambda i: values[i + 1] - values[i])
    lower, upper = values[low], values[low + 1]
    if upper - lower < 1e-5:
        raise ValueError(f"confidences {lower} and {upper} are too close for a threshold between them")
    return (lower + upper) / 2


def separable_dataset(n: int, seed: int = 0) -> TensorDataset:
    """Class k brightens quadrant k of a noisy 16x16 image: easy for a SideNet at the stem."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    images = 0.5 * torch.randn(n, *IMAGE_SHAPE, generator=generator)
    for k in range(NUM_CLASSES):
        row, col = divmod(k, 2)
        images[labels == k, :, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8] += 2.0
    order = torch.randperm(n, generator=generator)
    return TensorDataset(images[order], labels[order])


def tiny_bert(seed: int = 0, **config: Any) -> nn.Module:
    """A random ``BertForSequenceClassification`` in eval mode: 2 layers, 16 wide, 3 labels, a
    vocabulary of 50 and 16 positions unless ``config`` says otherwise (skips without transformers)."""
    import pytest

    transformers = pytest.importorskip("transformers")
    settings = {
        "vocab_size": 50,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "num_labels": 3,
        "max_position_embeddings": 16,
        **config,
    }
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**settings)).eval()
