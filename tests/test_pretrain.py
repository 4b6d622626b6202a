"""The demo MainNet recipe, on a small synthetic stand-in for Fashion-MNIST."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from sidenet import pretrain
from sidenet.datasets import DEBIAN_FASHION_MNIST_DIR, fashion_mnist_datasets
from sidenet.models.cifar_resnet import CifarResNet
from sidenet.pretrain import PretrainRecipe, evaluate_accuracy, load_fmnist_resnet, pretrain_fmnist_resnet


@pytest.fixture()
def synthetic_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (256,), generator=generator)
    # Learnable: each class brightens its own row band.
    images = 0.1 * torch.randn(256, 1, 28, 28, generator=generator)
    for i, label in enumerate(labels.tolist()):
        images[i, 0, 2 * label : 2 * label + 3] += 2.0
    data = TensorDataset(images, labels)
    # Under the new name and the old one (an alias), whichever the recipe's module reads.
    for name in ("fashion_mnist_datasets", "fashion_mnist_splits"):
        monkeypatch.setattr(
            pretrain, name, lambda data_dir=None: {"train": data, "val": data, "test": data}, raising=False
        )


def test_pretrain_learns_caches_and_reloads(synthetic_splits: None, tmp_path: Path) -> None:
    recipe = PretrainRecipe(depth=8, epochs=6, batch_size=32, max_lr=0.05)
    assert load_fmnist_resnet(recipe, root=tmp_path) is None
    model, meta = pretrain_fmnist_resnet(recipe, root=tmp_path, progress=False)
    assert meta["test_accuracy"] > 0.4  # chance is 0.1
    assert len(meta["history"]) == 6 and not model.training
    loaded, loaded_meta = load_fmnist_resnet(recipe, root=tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded_meta["test_accuracy"] == meta["test_accuracy"]
    # A second call returns the cached model without training.
    again, _ = pretrain_fmnist_resnet(recipe, root=tmp_path, progress=False)
    assert torch.equal(again.linear.weight, model.linear.weight)


def test_shipped_weights_load_after_their_hash_is_checked() -> None:
    model, meta = pretrain.load_shipped_fmnist_resnet()
    assert meta["source"] == "shipped" and meta["recipe"] == asdict(pretrain.SHIPPED_RECIPE)
    assert meta["test_accuracy"] > 0.9 and not model.training
    assert isinstance(model, CifarResNet) and model.linear.out_features == 10


def test_shipped_weights_are_what_a_task_without_a_cache_uses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SIDENET_CACHE", str(tmp_path))  # an empty cache: nothing trained here
    model, meta = load_fmnist_resnet()
    shipped, _ = pretrain.load_shipped_fmnist_resnet()
    assert meta["source"] == "shipped"
    assert torch.equal(model.linear.weight, shipped.linear.weight)
    assert load_fmnist_resnet(shipped=False) is None


def test_a_trained_cache_is_preferred_to_the_shipped_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What `sidenet pretrain --force` trains into the cache is used from then on."""
    monkeypatch.setenv("SIDENET_CACHE", str(tmp_path))
    shipped, meta = pretrain.load_shipped_fmnist_resnet()
    with torch.no_grad():
        shipped.linear.bias += 1.0
    folder = tmp_path / "mainnets" / pretrain.SHIPPED_RECIPE.name
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in shipped.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "source"}))
    model, loaded_meta = load_fmnist_resnet()
    assert loaded_meta["source"] == str(folder / "model.safetensors")
    assert torch.equal(model.linear.bias, shipped.linear.bias)


def test_altered_shipped_weights_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrain, "SHIPPED_SHA256", "0" * 64)
    with pytest.raises(pretrain.ShippedWeightsError, match="SHA-256"):
        pretrain.load_shipped_fmnist_resnet()


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_shipped_weights_reach_their_model_card_accuracy() -> None:
    """On the first 2,000 real Fashion-MNIST test images (the card states the full test accuracy)."""
    model, meta = pretrain.load_shipped_fmnist_resnet()
    images, labels = fashion_mnist_datasets()["test"].tensors
    accuracy = evaluate_accuracy(model, images[:2000], labels[:2000])
    assert accuracy > meta["test_accuracy"] - 0.02
