"""The demo MainNet: a CIFAR-style ResNet-20 trained by sidenet on Fashion-MNIST, cached on disk.

Users bring their own pretrained MainNet; this recipe exists so that the demo, the tests of the CLI
and the benchmarks have a real one without the internet. It trains on the 55,000-image ``train``
split of :func:`sidenet.data.fashion_mnist_datasets`, so the ``val`` split stays unseen for choosing
thresholds.

The weights of the default recipe ship with the package (``sidenet/assets``, about 1 MB, with a
model card): training them takes about half an hour on a 2-core machine, so the demo starts from
them, after checking their SHA-256. ``sidenet pretrain --force`` retrains into the cache, and a
cached model is preferred to the shipped one from then on.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sidenet.datasets import fashion_mnist_datasets
from sidenet.errors import ShippedWeightsError
from sidenet.models.cifar_resnet import CifarResNet, cifar_resnet
from sidenet.paths import cache_dir

__all__ = [
    "PretrainRecipe",
    "pretrain_fmnist_resnet",
    "load_fmnist_resnet",
    "load_shipped_fmnist_resnet",
    "evaluate_accuracy",
    "augment",
    "ShippedWeightsError",
    "SHIPPED_RECIPE",
    "SHIPPED_SHA256",
]


@dataclass(frozen=True)
class PretrainRecipe:
    """Settings of the demo MainNet's training; the cache key is derived from them."""

    depth: int = 20
    epochs: int = 10
    batch_size: int = 128
    max_lr: float = 0.2
    weight_decay: float = 5e-4
    seed: int = 0

    @property
    def name(self) -> str:
        return f"fmnist_resnet{self.depth}_e{self.epochs}_s{self.seed}"


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The demo MainNet's augmentation of an image batch (N, C, H, W): a random horizontal flip per
    image, then one random translation of up to 2 pixels for the whole batch (replicate-pad by 2,
    crop back to H x W). Every draw comes from ``generator``, so a seeded generator repeats it exactly;
    reuse it to fine-tune a variant of the demo MainNet with the same recipe."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    padded = F.pad(images, (2, 2, 2, 2), mode="replicate")
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + images.shape[2], dx : dx + images.shape[3]]


@torch.no_grad()
def evaluate_accuracy(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on in-memory tensors."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(len(images), 1)


def _paths(recipe: PretrainRecipe, root: Path | None) -> tuple[Path, Path]:
    folder = (root or cache_dir() / "mainnets") / recipe.name
    return folder / "model.safetensors", folder / "meta.json"


# The recipe whose weights ship in sidenet/assets, and the SHA-256 of that file: written here, apart
# from the file, so that a damaged or swapped file is caught before it is loaded.
SHIPPED_RECIPE = PretrainRecipe()
SHIPPED_SHA256 = "09f7ca9922a75257b79955a9af2d5a167e35d5702119c4dc066f0a54fa5a3ccf"


def _build(recipe: PretrainRecipe, tensors: dict[str, torch.Tensor]) -> CifarResNet:
    model = cifar_resnet(recipe.depth, num_classes=10, in_channels=1)
    model.load_state_dict(tensors)
    return model.eval()


def _shipped_name() -> str:
    return f"{SHIPPED_RECIPE.name}.safetensors"


def load_shipped_fmnist_resnet() -> tuple[CifarResNet, dict]:
    """The demo MainNet of :data:`SHIPPED_RECIPE` that ships with the package, after checking the
    SHA-256 of its weights; raises :class:`ShippedWeightsError` when they are missing or altered."""
    folder = resources.files("sidenet") / "assets"
    weights = folder / _shipped_name()
    if not weights.is_file():
        raise ShippedWeightsError(
            f"the shipped demo MainNet {weights} is missing; train it with `sidenet pretrain --force`"
        )
    data = weights.read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != SHIPPED_SHA256:
        raise ShippedWeightsError(
            f"the shipped demo MainNet {weights} has SHA-256 {found}, expected {SHIPPED_SHA256}: the file "
            "is damaged or was replaced; reinstall sidenet or train it with `sidenet pretrain --force`"
        )
    meta = json.loads((folder / f"{SHIPPED_RECIPE.name}.json").read_text())
    return _build(SHIPPED_RECIPE, load_safetensors(data)), {**meta, "source": "shipped"}


def load_fmnist_resnet(
    recipe: PretrainRecipe = PretrainRecipe(), root: Path | None = None, shipped: bool = True
) -> tuple[CifarResNet, dict] | None:
    """Load the demo MainNet and its metadata: the one trained into the cache (``root``, by default
    sidenet's cache folder) if any, else, for the shipped recipe and ``shipped=True``, the weights that
    ship with the package; ``None`` when neither exists."""
    weights, meta_path = _paths(recipe, root)
    if weights.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return _build(recipe, load_file(str(weights))), {**meta, "source": str(weights)}
    # A missing shipped file (a build without package data) means "train it"; an altered one raises.
    if shipped and recipe == SHIPPED_RECIPE and (resources.files("sidenet") / "assets" / _shipped_name()).is_file():
        return load_shipped_fmnist_resnet()
    return None


def pretrain_fmnist_resnet(
    recipe: PretrainRecipe = PretrainRecipe(),
    data_dir: str | Path | None = None,
    root: Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> tuple[CifarResNet, dict]:
    """Train (or load from the cache or the shipped weights) the demo MainNet; returns the model in
    eval mode and metadata with its test accuracy. SGD with Nesterov momentum and a one-cycle learning
    rate. ``force`` retrains into the cache even when a cached or shipped model exists."""
    if not force:
        cached = load_fmnist_resnet(recipe, root, shipped=root is None)
        if cached is not None:
            return cached
    torch.manual_seed(recipe.seed)
    splits = fashion_mnist_datasets(data_dir)
    images, labels = splits["train"].tensors
    model = cifar_resnet(recipe.depth, num_classes=10, in_channels=1)
    steps_per_epoch = math.ceil(len(images) / recipe.batch_size)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.max_lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.max_lr, epochs=recipe.epochs, steps_per_epoch=steps_per_epoch
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    started = time.perf_counter()
    history = []
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        bar = tqdm(range(steps_per_epoch), desc=f"MainNet epoch {epoch + 1}/{recipe.epochs}", disable=not progress)
        total_loss = 0.0
        for step in bar:
            index = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            loss = F.cross_entropy(model(augment(images[index], generator)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += float(loss.detach())
            bar.set_postfix(loss=f"{total_loss / (step + 1):.3f}")
        val_images, val_labels = splits["val"].tensors
        history.append(
            {
                "epoch": epoch + 1,
                "loss": total_loss / steps_per_epoch,
                "val_accuracy": evaluate_accuracy(model, val_images, val_labels),
            }
        )
    test_images, test_labels = splits["test"].tensors
    meta = {
        "recipe": asdict(recipe),
        "arch": "cifar_resnet",
        "in_channels": 1,
        "num_classes": 10,
        "test_accuracy": evaluate_accuracy(model, test_images, test_labels),
        "train_seconds": time.perf_counter() - started,
        "history": history,
    }
    weights, meta_path = _paths(recipe, root)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta_path.write_text(json.dumps(meta, indent=2))
    return model.eval(), meta
