"""The demo MainNet recipe, on a small synthetic stand-in for Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from sidenet import pretrain
from sidenet.pretrain import PretrainRecipe, load_fmnist_resnet, pretrain_fmnist_resnet


@pytest.fixture()
def synthetic_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (256,), generator=generator)
    # Learnable: each class brightens its own row band.
    images = 0.1 * torch.randn(256, 1, 28, 28, generator=generator)
    for i, label in enumerate(labels.tolist()):
        images[i, 0, 2 * label : 2 * label + 3] += 2.0
    data = TensorDataset(images, labels)
    monkeypatch.setattr(
        pretrain, "fashion_mnist_splits", lambda data_dir=None: {"train": data, "val": data, "test": data}
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
