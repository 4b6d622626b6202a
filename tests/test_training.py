"""Training the SideNet: the MainNet stays frozen and bit-identical, runs are reproducible, the
SideNet learns, and bad options are refused."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sidenet
from helpers import IMAGE_SHAPE, NUM_CLASSES, separable_dataset
from sidenet import AdaptiveModel, FeatureCache, cache_features, train_sidenet

FAST = {"epochs": 4, "lr": 1e-2, "batch_size": 32, "progress": False}


def attach(mainnet: nn.Module, seed: int = 0) -> AdaptiveModel:
    return sidenet.attach(mainnet, "layer1", input_shape=IMAGE_SHAPE, hidden=32, pool_size=2, seed=seed)


@torch.no_grad()
def side_accuracy(model: AdaptiveModel, dataset: TensorDataset) -> float:
    x, y = dataset.tensors
    return float((model(x, mode="side").predictions == y).float().mean())


def test_fit_leaves_mainnet_bit_identical_and_in_eval(tiny_model: AdaptiveModel, separable_loader) -> None:
    mainnet = tiny_model.split.mainnet
    before = {k: v.clone() for k, v in mainnet.state_dict().items()}
    assert any(k.endswith("running_mean") for k in before)
    modes_seen: list[bool] = []
    hooks = [
        m.register_forward_pre_hook(lambda module, args: modes_seen.append(module.training))
        for m in mainnet.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    tiny_model.train()  # even a model left in train mode must not update the MainNet's statistics
    tiny_model.fit(separable_loader, **FAST)
    for hook in hooks:
        hook.remove()
    assert modes_seen and not any(modes_seen)  # batch norm ran in eval mode throughout
    after = mainnet.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not any(m.training for m in tiny_model.modules())  # fit leaves the model in eval


def test_fit_changes_only_the_sidenet_perceptron(tiny_model: AdaptiveModel, separable_loader) -> None:
    before = {k: v.clone() for k, v in tiny_model.sidenet.state_dict().items()}
    tiny_model.fit(separable_loader, **FAST)
    assert all(not torch.equal(v, before[k]) for k, v in tiny_model.sidenet.state_dict().items())


def test_training_is_reproducible(make_mainnet, separable_loader) -> None:
    mainnet = make_mainnet()
    first, second, other_init = attach(mainnet), attach(mainnet), attach(mainnet, seed=1)
    for key, value in first.sidenet.state_dict().items():
        assert torch.equal(value, second.sidenet.state_dict()[key])  # same attach seed, same init
    first.fit(separable_loader, seed=3, **FAST)
    second.fit(separable_loader, seed=3, **FAST)
    for key, value in first.sidenet.state_dict().items():
        assert torch.equal(value, second.sidenet.state_dict()[key]), key
    assert first.history_ == second.history_
    # A different shuffling seed, or a different initialisation, gives different weights.
    other_order = attach(mainnet)
    other_order.fit(separable_loader, seed=4, **FAST)
    other_init.fit(separable_loader, seed=3, **FAST)
    for model in (other_order, other_init):
        assert not torch.equal(model.sidenet.mlp[0].weight, first.sidenet.mlp[0].weight)


def test_history_has_loss_and_accuracy_per_epoch(tiny_model: AdaptiveModel, separable_loader) -> None:
    val_loader = DataLoader(separable_dataset(32, seed=9), batch_size=16)
    tiny_model.fit(separable_loader, val_loader=val_loader, **{**FAST, "epochs": 3})
    history = tiny_model.history_
    assert [record["epoch"] for record in history] == [1, 2, 3]
    for record in history:
        assert set(record) == {"epoch", "loss", "accuracy", "val_accuracy"}
        assert math.isfinite(record["loss"]) and record["loss"] >= 0
        assert 0 <= record["accuracy"] <= 1 and 0 <= record["val_accuracy"] <= 1
    tiny_model.fit(separable_loader, **{**FAST, "epochs": 2})
    assert len(tiny_model.history_) == 2 and "val_accuracy" not in tiny_model.history_[0]


def test_sidenet_learns_a_separable_task(tiny_model: AdaptiveModel, separable_loader) -> None:
    test_set = separable_dataset(64, seed=5)
    before = side_accuracy(tiny_model, test_set)
    tiny_model.fit(
        separable_loader, epochs=8, lr=1e-2, batch_size=32, distill_weight=0.0, progress=False
    )  # labels only
    after = side_accuracy(tiny_model, test_set)
    assert before < 0.6
    assert after >= 0.95
    assert tiny_model.history_[-1]["loss"] < 0.5 * tiny_model.history_[0]["loss"]
    assert tiny_model.history_[-1]["accuracy"] >= 0.95


def test_distillation_runs_and_changes_training(make_mainnet, separable_loader) -> None:
    mainnet = make_mainnet()
    plain, distilled = attach(mainnet), attach(mainnet)
    plain.fit(separable_loader, **FAST)
    distilled.fit(separable_loader, distill_weight=0.5, distill_temperature=3.0, **FAST)
    assert all(math.isfinite(r["loss"]) for r in distilled.history_)
    assert not torch.equal(plain.sidenet.mlp[0].weight, distilled.sidenet.mlp[0].weight)
    # Pure distillation toward the MainNet pulls the SideNet's predictions toward the MainNet's.
    pure = attach(mainnet)
    pure.fit(separable_loader, distill_weight=1.0, **{**FAST, "epochs": 10})
    x, _ = separable_dataset(64, seed=5).tensors
    with torch.no_grad():
        agree_pure = (pure(x, mode="side").predictions == mainnet(x).argmax(1)).float().mean()
        agree_plain = (plain(x, mode="side").predictions == mainnet(x).argmax(1)).float().mean()
    assert agree_pure > agree_plain


def test_cache_features(tiny_model: AdaptiveModel, separable_loader) -> None:
    cache = cache_features(tiny_model, separable_loader, progress=False)
    x, y = separable_loader.dataset.tensors
    assert isinstance(cache, FeatureCache) and len(cache) == 128
    assert cache.features.shape == (128, tiny_model.sidenet.in_features)
    assert torch.equal(cache.labels, y)
    with torch.no_grad():
        torch.testing.assert_close(cache.mainnet_logits, tiny_model.split.mainnet(x))
        pooled = tiny_model.sidenet.pooled(tiny_model.split.features(tiny_model.split.trunk(x)))
        torch.testing.assert_close(cache.features, pooled)


def make_cache(n: int = 8, classes: int = NUM_CLASSES, features: int = 32) -> FeatureCache:
    return FeatureCache(torch.randn(n, features), torch.randn(n, classes), torch.arange(n) % classes)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"distill_weight": 1.5}, "distill_weight"),
        ({"distill_weight": -0.1}, "distill_weight"),
        ({"distill_temperature": 0.0}, "distill_temperature"),
    ],
)
def test_bad_training_options(tiny_model: AdaptiveModel, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train_sidenet(tiny_model.sidenet, make_cache(), progress=False, **options)


def test_cache_class_count_and_label_checks(tiny_model: AdaptiveModel) -> None:
    with pytest.raises(ValueError, match="classes"):
        train_sidenet(tiny_model.sidenet, make_cache(classes=NUM_CLASSES + 1), progress=False)
    bad_labels = make_cache()
    bad_labels.labels[0] = NUM_CLASSES
    with pytest.raises(ValueError, match="labels must lie in"):
        train_sidenet(tiny_model.sidenet, bad_labels, progress=False)


def test_bad_loaders(tiny_model: AdaptiveModel) -> None:
    with pytest.raises(ValueError, match="no batches"):
        tiny_model.fit([], progress=False)
    with pytest.raises(ValueError, match=r"\(inputs, labels\)"):
        tiny_model.fit([torch.zeros(2, *IMAGE_SHAPE)], progress=False)
    with pytest.raises(ValueError, match="input channels"):
        tiny_model.fit([(torch.zeros(2, 3, 16, 16), torch.zeros(2))], progress=False)


def test_fit_accepts_plain_lists_of_batches(tiny_model: AdaptiveModel) -> None:
    x, y = separable_dataset(16).tensors
    tiny_model.fit([(x[:8], y[:8]), [x[8:], y[8:].tolist()]], **{**FAST, "epochs": 1})
    assert len(tiny_model.history_) == 1


@pytest.mark.parametrize(
    ("make_labels", "message"),
    [
        (lambda y: y[:, None], r"1-D, one class index per sample, got shape \(8, 1\).*view\(-1\)"),
        (lambda y: y[:5], "got 5 labels for a batch of 8 inputs"),
        (lambda y: y.double(), "integer class indices, got dtype torch.float64"),
        (lambda y: y == 1, "integer class indices, got dtype torch.bool"),
        (lambda y: y + NUM_CLASSES, rf"labels must lie in \[0, {NUM_CLASSES - 1}\]"),
    ],
)
def test_fit_and_cache_refuse_bad_labels(
    tiny_model: AdaptiveModel, make_labels: Callable[[torch.Tensor], torch.Tensor], message: str
) -> None:
    # (N, 1) labels used to fail inside the loss with a message from torch, not naming the shape.
    x, y = separable_dataset(16).tensors
    batches = [(x[:8], y[:8]), (x[8:], make_labels(y[8:]))]
    before = {k: v.clone() for k, v in tiny_model.sidenet.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        tiny_model.fit(batches, **{**FAST, "epochs": 1})
    with pytest.raises(ValueError, match=message):
        cache_features(tiny_model, batches, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.sidenet.state_dict().items())  # not trained


def test_train_sidenet_refuses_a_cache_with_misshapen_labels(tiny_model: AdaptiveModel) -> None:
    cache = make_cache()
    with pytest.raises(ValueError, match=r"labels of shape \(8, 1\)"):
        train_sidenet(
            tiny_model.sidenet,
            FeatureCache(cache.features, cache.mainnet_logits, cache.labels[:, None]),
            progress=False,
        )
    with pytest.raises(ValueError, match="integer class indices"):
        train_sidenet(
            tiny_model.sidenet, FeatureCache(cache.features, cache.mainnet_logits, cache.labels.float()), progress=False
        )
