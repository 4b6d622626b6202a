"""Built-in tasks of the CLI: a MainNet recipe plus its data. ``fmnist`` is the default demo task;
``sst2`` is sentiment of movie-review sentences with a fine-tuned all-MiniLM-L6-v2 MainNet."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from sidenet.datasets import (
    FASHION_MNIST_CLASSES,
    SST2_CLASSES,
    eight_bit,
    fashion_mnist_datasets,
    normalize_fashion_mnist,
    sst2_datasets,
)
from sidenet.loaders import TextCollator, make_loader

__all__ = ["Task", "FashionMnistTask", "Sst2Task", "TASKS", "get_task"]


@dataclass
class Task:
    """What the CLI needs to know about a workload."""

    name: str
    description: str
    default_tap: str
    input_shape: tuple[int, ...] | None  # one sample's shape; None where the split makes its own example
    class_names: Sequence[str] = field(default_factory=tuple)
    convolutional: bool = False  # a MainNet of convolutions (it can run channels-last)

    def mainnet(self, data_dir: str | Path | None = None, progress: bool = True) -> nn.Module:
        """The task's MainNet, trained on first use and cached."""
        cached = self._load_cached(progress)
        if cached is not None:
            return cached
        if progress:
            print(f"Training the {self.name} MainNet once ({self.description}); it is cached afterwards.")
        model, summary = self._train(data_dir, progress)
        if progress:
            print(summary)
        return model

    def _load_cached(self, progress: bool = True) -> nn.Module | None:
        """The cached MainNet, or None when it has not been trained yet (``progress``: bars while loading)."""
        raise NotImplementedError

    def _train(self, data_dir: str | Path | None, progress: bool) -> tuple[nn.Module, str]:
        """Train and cache the MainNet; returns it with a one-line summary of its accuracy."""
        raise NotImplementedError

    def pretrain(
        self,
        data_dir: str | Path | None = None,
        epochs: float | None = None,
        force: bool = False,
        progress: bool = True,
    ) -> str:
        """Train (or load) the task's MainNet; returns a one-line summary with its test accuracy."""
        raise NotImplementedError

    def loaders(self, data_dir: str | Path | None = None, batch_size: int = 256) -> dict[str, DataLoader]:
        """Loaders of the data partitions ``train``, ``val`` (for choosing thresholds) and ``test`` (for
        reporting)."""
        raise NotImplementedError

    def read_inputs(self, items: Sequence[str]) -> torch.Tensor:
        """Turn command-line items (file paths, sentences, ...) into a model input batch."""
        raise NotImplementedError

    def check_split(self, name: str) -> str:
        """Return ``name`` if :meth:`loaders` has a data partition of that name (the CLI's ``--split``),
        else raise ``ValueError`` listing them; loads no data, so that a command can refuse a bad
        ``--split`` up front."""
        splits = ("train", "val", "test")
        if name not in splits:
            raise ValueError(f"unknown split {name!r} of task {self.name}; splits are {', '.join(splits)}")
        return name

    def check_tap(self, tap: str | int, split_options: dict[str, Any] | None = None) -> None:
        """Raise ``ValueError`` (:class:`sidenet.TapError` for the tap, listing the valid ones) unless
        ``tap`` and ``split_options`` suit the task's MainNet architecture. Quick: it trains, loads and
        reads nothing, so commands check their arguments before the MainNet is trained or loaded.
        Tasks that do not know their architecture accept everything and leave the check to attach."""


class FashionMnistTask(Task):
    """Fashion-MNIST with the demo ResNet-20 MainNet (see :mod:`sidenet.pretrain`)."""

    def __init__(self) -> None:
        super().__init__(
            name="fmnist",
            description="Fashion-MNIST, 28x28 grey images, 10 classes; MainNet: CIFAR-style ResNet-20",
            default_tap="layer1.0",
            input_shape=(1, 28, 28),
            class_names=FASHION_MNIST_CLASSES,
            convolutional=True,
        )

    def _load_cached(self, progress: bool = True) -> nn.Module | None:
        from sidenet.pretrain import load_fmnist_resnet

        cached = load_fmnist_resnet()
        return None if cached is None else cached[0]

    def _train(self, data_dir: str | Path | None, progress: bool) -> tuple[nn.Module, str]:
        from sidenet.pretrain import pretrain_fmnist_resnet

        model, meta = pretrain_fmnist_resnet(data_dir=data_dir, progress=progress)
        return model, f"MainNet test accuracy: {meta['test_accuracy']:.4f} ({meta['train_seconds']:.0f} s)"

    def pretrain(
        self,
        data_dir: str | Path | None = None,
        epochs: float | None = None,
        force: bool = False,
        progress: bool = True,
    ) -> str:
        from sidenet.pretrain import PretrainRecipe, pretrain_fmnist_resnet

        if epochs is not None and (epochs != int(epochs) or epochs < 1):
            # The ResNet recipe's one-cycle schedule counts whole epochs: 0.5 must not become 0.
            raise ValueError(f"--epochs for {self.name} is a whole number of epochs >= 1, got {epochs}")
        recipe = PretrainRecipe() if epochs is None else PretrainRecipe(epochs=int(epochs))
        _, meta = pretrain_fmnist_resnet(recipe, data_dir=data_dir, force=force, progress=progress)
        source = meta.get("source")
        where = {None: "trained now", "shipped": "shipped with sidenet; --force retrains"}.get(
            source, f"cached in {source}; --force retrains"
        )
        return f"MainNet {meta['recipe']} test accuracy {meta['test_accuracy']:.4f} ({where})"

    def loaders(self, data_dir: str | Path | None = None, batch_size: int = 256) -> dict[str, DataLoader]:
        return {name: make_loader(ds, batch_size) for name, ds in fashion_mnist_datasets(data_dir).items()}

    def read_inputs(self, items: Sequence[str]) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        images = []
        for item in items:
            try:
                with Image.open(item) as image:
                    grey = eight_bit(image).convert("L").resize((28, 28), Image.Resampling.BILINEAR)
            except (OSError, UnidentifiedImageError) as exc:
                raise ValueError(f"cannot read image {item!r}: {exc}") from exc
            images.append(np.asarray(grey, dtype=np.uint8))
        if not images:
            raise ValueError("no input images given")
        return normalize_fashion_mnist(np.stack(images))

    def check_tap(self, tap: str | int, split_options: dict[str, Any] | None = None) -> None:
        """Cut an untrained skeleton of the demo MainNet's architecture (the default recipe's CIFAR
        ResNet) at ``tap``: an unknown tap fails in milliseconds, with the valid taps listed."""
        if split_options:
            raise ValueError(
                f"the {self.name} MainNet (a CIFAR ResNet) takes no split options, got "
                f"{', '.join(map(str, split_options))}: features is for text MainNets only"
            )
        from sidenet.models.cifar_resnet import cifar_resnet
        from sidenet.pretrain import PretrainRecipe
        from sidenet.splits import split_mainnet

        channels = self.input_shape[0] if self.input_shape else 1
        skeleton = cifar_resnet(PretrainRecipe().depth, num_classes=len(self.class_names), in_channels=channels)
        split_mainnet(skeleton, tap)


class Sst2Task(Task):
    """SST-2 with a BERT-family MainNet fine-tuned by :mod:`sidenet.text_pretrain` (all-MiniLM-L6-v2 by
    default). ``val`` is held out of SST-2 train (short phrases), ``test`` is SST-2 dev (sentences)."""

    def __init__(self, recipe: Any = None) -> None:
        from sidenet.text_pretrain import TextRecipe

        self.recipe = recipe or TextRecipe()
        super().__init__(
            name="sst2",
            description=f"SST-2 sentence sentiment, 2 classes; MainNet: {self.recipe.checkpoint} fine-tuned",
            default_tap="3",
            input_shape=None,
            class_names=SST2_CLASSES,
        )
        self._collator: TextCollator | None = None

    @property
    def collator(self) -> TextCollator:
        """Tokenises with the checkpoint's own tokenizer (the fine-tuned MainNet keeps it unchanged)."""
        if self._collator is None:
            from sidenet.text_pretrain import load_tokenizer

            self._collator = TextCollator(load_tokenizer(self.recipe.checkpoint), self.recipe.max_length)
        return self._collator

    def _load_cached(self, progress: bool = True) -> nn.Module | None:
        from sidenet.text_pretrain import load_text_mainnet

        cached = load_text_mainnet(self.recipe, progress=progress)
        return None if cached is None else cached[0]

    def _train(self, data_dir: str | Path | None, progress: bool) -> tuple[nn.Module, str]:
        from sidenet.text_pretrain import finetune_text_mainnet

        model, _, meta = finetune_text_mainnet(self.recipe, data_dir=data_dir, progress=progress)
        return model, f"MainNet SST-2 dev accuracy: {meta['test_accuracy']:.4f} ({meta['train_seconds']:.0f} s)"

    def pretrain(
        self,
        data_dir: str | Path | None = None,
        epochs: float | None = None,
        force: bool = False,
        progress: bool = True,
    ) -> str:
        from dataclasses import replace

        from sidenet.text_pretrain import finetune_text_mainnet

        recipe = self.recipe if epochs is None else replace(self.recipe, epochs=epochs)
        _, _, meta = finetune_text_mainnet(recipe, data_dir=data_dir, force=force, progress=progress)
        return (
            f"MainNet {recipe.name}: SST-2 dev accuracy {meta['test_accuracy']:.4f}, "
            f"val {meta['val_accuracy']:.4f} ({meta['train_seconds']:.0f} s of training)"
        )

    def loaders(self, data_dir: str | Path | None = None, batch_size: int = 32) -> dict[str, DataLoader]:
        """Batches of ``batch_size`` sentences, each padded to its longest (dynamic padding)."""
        return {
            name: make_loader(ds, batch_size, collate_fn=self.collator) for name, ds in sst2_datasets(data_dir).items()
        }

    def read_inputs(self, items: Sequence[str]) -> dict[str, torch.Tensor]:
        """Sentences into a tokenised batch."""
        return self.collator.encode(items)

    def check_tap(self, tap: str | int, split_options: dict[str, Any] | None = None) -> None:
        """The tap must be an encoder layer ``k`` with 1 <= k < L, L read from the checkpoint's config
        (offline, no weights); where no config can be read offline, only k >= 1 is checked here and
        ``attach`` checks the rest. ``split_options`` may hold ``features`` (first, mean or both)."""
        from sidenet.splits import TapError
        from sidenet.splits.transformers import FEATURES

        options = dict(split_options or {})
        unknown = sorted(set(options) - {"features"})
        if unknown:
            raise ValueError(f"unknown split option(s) {', '.join(unknown)} for the {self.name} MainNet: only features")
        if "features" in options and options["features"] not in FEATURES:
            raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {options['features']!r}")
        layers = None
        try:
            from transformers import AutoConfig

            from sidenet.text_pretrain import resolve_checkpoint

            config = AutoConfig.from_pretrained(resolve_checkpoint(self.recipe.checkpoint), local_files_only=True)
            layers = int(config.num_hidden_layers)
        except (ImportError, OSError, ValueError, KeyError, AttributeError, TypeError):
            pass  # a checkpoint not on this machine: attach checks the upper bound once the MainNet is loaded
        try:
            cut = int(tap) if not isinstance(tap, (bool, float)) else -1
        except (TypeError, ValueError):
            cut = -1
        if cut < 1 or (layers is not None and cut >= layers):
            valid = ", ".join(map(str, range(1, layers))) if layers else "integers 1 to L - 1 for L encoder layers"
            raise TapError(
                f"unknown tap {tap!r} for the {self.name} MainNet ({self.recipe.checkpoint}); valid taps: {valid} "
                "(the trunk is the embeddings and the first `tap` layers)"
            )


TASKS: dict[str, Task] = {"fmnist": FashionMnistTask(), "sst2": Sst2Task()}


def get_task(name: str) -> Task:
    """The task called ``name``; raises ``ValueError`` listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
