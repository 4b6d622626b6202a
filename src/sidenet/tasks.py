"""Built-in tasks of the CLI: a MainNet recipe plus its data. ``fmnist`` is the default demo task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from sidenet.data import FASHION_MNIST_CLASSES, fashion_mnist_splits, make_loader, normalize_fashion_mnist

__all__ = ["Task", "FashionMnistTask", "TASKS", "get_task"]


@dataclass
class Task:
    """What the CLI needs to know about a workload."""

    name: str
    description: str
    default_tap: str
    input_shape: tuple[int, ...]
    class_names: Sequence[str] = field(default_factory=tuple)

    def mainnet(self, data_dir: str | Path | None = None, progress: bool = True) -> nn.Module:
        """The task's MainNet, trained on first use and cached."""
        raise NotImplementedError

    def loaders(self, data_dir: str | Path | None = None, batch_size: int = 256) -> dict[str, DataLoader]:
        """``train``, ``val`` (for choosing thresholds) and ``test`` (for reporting) loaders."""
        raise NotImplementedError

    def read_inputs(self, items: Sequence[str]) -> torch.Tensor:
        """Turn command-line items (file paths, sentences, ...) into a model input batch."""
        raise NotImplementedError


class FashionMnistTask(Task):
    """Fashion-MNIST with the demo ResNet-20 MainNet (see :mod:`sidenet.pretrain`)."""

    def __init__(self) -> None:
        super().__init__(
            name="fmnist",
            description="Fashion-MNIST, 28x28 grey images, 10 classes; MainNet: CIFAR-style ResNet-20",
            default_tap="stem",
            input_shape=(1, 28, 28),
            class_names=FASHION_MNIST_CLASSES,
        )

    def mainnet(self, data_dir: str | Path | None = None, progress: bool = True) -> nn.Module:
        from sidenet.pretrain import load_fmnist_resnet, pretrain_fmnist_resnet

        cached = load_fmnist_resnet()
        if cached is not None:
            return cached[0]
        if progress:
            print("Training the demo MainNet (ResNet-20 on Fashion-MNIST) once; it is cached afterwards.")
        model, meta = pretrain_fmnist_resnet(data_dir=data_dir, progress=progress)
        if progress:
            print(f"MainNet test accuracy: {meta['test_accuracy']:.4f} ({meta['train_seconds']:.0f} s)")
        return model

    def loaders(self, data_dir: str | Path | None = None, batch_size: int = 256) -> dict[str, DataLoader]:
        return {name: make_loader(ds, batch_size) for name, ds in fashion_mnist_splits(data_dir).items()}

    def read_inputs(self, items: Sequence[str]) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        images = []
        for item in items:
            try:
                with Image.open(item) as image:
                    grey = image.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
            except (OSError, UnidentifiedImageError) as exc:
                raise ValueError(f"cannot read image {item!r}: {exc}") from exc
            images.append(np.asarray(grey, dtype=np.uint8))
        if not images:
            raise ValueError("no input images given")
        return normalize_fashion_mnist(np.stack(images))


TASKS: dict[str, Task] = {"fmnist": FashionMnistTask()}


def get_task(name: str) -> Task:
    """The task called ``name``; raises ``ValueError`` listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def describe(task: Task) -> dict[str, Any]:
    return {"task": task.name, "description": task.description}
