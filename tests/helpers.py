"""Builders shared by the tests: a tiny CIFAR ResNet MainNet on 1x16x16 images and a linearly
separable synthetic task. Fixtures wrapping them live in conftest.py."""

from __future__ import annotations

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
