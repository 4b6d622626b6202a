"""AdaptiveModel beyond one plain call: copies (deepcopy, pickle) that run their own MainNet, counts
kept exactly under threads, a MainNet that stays frozen whatever its modes, and low-precision MainNets."""

from __future__ import annotations

import copy
import pickle
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import sidenet
from helpers import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    build_tiny_mainnet,
    make_images,
    randomize_batchnorm,
    threshold_between,
    tiny_bert,
)
from sidenet import NEVER_EXIT, AdaptiveModel, CallableSplit, SideNet

ATOL = 1e-5


def pickle_round_trip(model: AdaptiveModel) -> AdaptiveModel:
    return pickle.loads(pickle.dumps(model))


COPIES = {"deepcopy": copy.deepcopy, "pickle": pickle_round_trip}


def vision_case(name: str) -> tuple[AdaptiveModel, Any, Callable[[nn.Module], torch.Tensor]]:
    """An attached model, an input batch and the MainNet's last bias, for each kind of split."""
    torch.manual_seed(0)
    if name == "torchvision_resnet":
        net = randomize_batchnorm(torchvision.models.resnet18(weights=None, num_classes=5)).eval()
        model = sidenet.attach(net, "layer1", input_shape=(3, 32, 32), hidden=8)
        return model, torch.randn(3, 3, 32, 32), lambda m: m.fc.bias
    if name == "cifar_resnet":
        model = sidenet.attach(build_tiny_mainnet(), "layer1", input_shape=IMAGE_SHAPE, hidden=8)
        return model, make_images(3), lambda m: m.linear.bias
    if name == "sequential":
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
        model = sidenet.attach(net, 2, input_shape=(1, 8, 8), hidden=8)
        return model, torch.randn(3, 1, 8, 8), lambda m: m[3].bias
    model = sidenet.attach(tiny_bert(num_hidden_layers=3), 1, hidden=8)
    ids = torch.randint(1, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, lambda m: m.classifier.bias


# -- 1. copies run their own MainNet --------------------------------------------------------------


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("name", ["torchvision_resnet", "cifar_resnet", "sequential", "bert"])
@torch.no_grad()
def test_copy_runs_its_own_mainnet(name: str, how: str) -> None:
    model, x, last_bias = vision_case(name)
    keys = list(model.state_dict())
    clone = COPIES[how](model)
    assert clone.split.mainnet is not model.split.mainnet
    last_bias(clone.split.mainnet).add_(1.0)
    expected = clone.split.mainnet(**x).logits if isinstance(x, dict) else clone.split.mainnet(x)
    clone.threshold = NEVER_EXIT
    for mode in ("main", "adaptive"):
        torch.testing.assert_close(clone(x, mode=mode).logits, expected, rtol=0, atol=ATOL)
    # The original is untouched: its logits are 1 below the copy's.
    torch.testing.assert_close(model(x, mode="main").logits + 1.0, expected, rtol=0, atol=1e-4)
    # Nothing duplicates the MainNet's parameters in the state dict.
    assert list(clone.state_dict()) == keys
    assert all(k.startswith(("split.mainnet.", "sidenet.")) for k in keys)


def test_copy_keeps_settings_and_statistics(tiny_model: AdaptiveModel, images) -> None:
    tiny_model.threshold, tiny_model.temperature = 0.0, 2.0
    with torch.no_grad():
        tiny_model(images(5))
    for copy_fn in COPIES.values():
        clone = copy_fn(tiny_model)
        assert (clone.threshold, clone.temperature, clone.samples_seen, clone.samples_exited) == (0.0, 2.0, 5, 5)
        with torch.no_grad():
            clone(images(3))  # the copy has a working lock of its own
        assert (clone.samples_seen, tiny_model.samples_seen) == (8, 5)
        assert len(clone.recent_confidence) == 8


# -- 2. threads -----------------------------------------------------------------------------------


@torch.no_grad()
def test_counts_exact_under_threads(tiny_model: AdaptiveModel, images) -> None:
    threads, calls, batch = 8, 150, 2
    x = images(batch)
    tiny_model.threshold = 0.0  # everyone exits: cheap calls, and exited must equal seen
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work() -> None:
        try:
            start.wait()
            for _ in range(calls):
                tiny_model(x)
        except BaseException as exc:
            errors.append(exc)

    # Switch threads as often as possible so that unguarded read-modify-writes interleave.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    total = threads * calls * batch
    assert (tiny_model.samples_seen, tiny_model.samples_exited) == (total, total)
    assert len(tiny_model.recent_confidence) == min(total, tiny_model.stats_window)


# -- 3. the MainNet stays frozen --------------------------------------------------------------------


def batchnorm_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("mode", ["adaptive", "main", "side", "batch"])
@pytest.mark.parametrize("which", ["mainnet", "layer1", "layer3"])
def test_mainnet_in_train_mode_keeps_its_statistics(tiny_model: AdaptiveModel, images, mode: str, which: str) -> None:
    mainnet = tiny_model.split.mainnet
    before = batchnorm_state(mainnet)
    tiny_model.threshold = NEVER_EXIT  # adaptive: the rest runs too
    with torch.no_grad():
        expected = mainnet(images(4))
    (mainnet if which == "mainnet" else getattr(mainnet, which)).train()
    out = tiny_model(images(4), mode=mode)
    after = batchnorm_state(mainnet)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in mainnet.modules())
    if mode in ("adaptive", "main"):
        torch.testing.assert_close(out.logits, expected, rtol=0, atol=ATOL)


def test_mainnet_parameters_frozen(tiny_model: AdaptiveModel) -> None:
    assert not any(p.requires_grad for p in tiny_model.split.parameters())
    assert all(p.requires_grad for p in tiny_model.sidenet.parameters())


@pytest.mark.parametrize("mode", ["adaptive", "main", "side"])
def test_no_graph_through_the_mainnet(tiny_model: AdaptiveModel, images, mode: str) -> None:
    mainnet = tiny_model.split.mainnet
    mainnet.requires_grad_(True)  # even when the user unfreezes it again
    x = images(6).requires_grad_(True)
    tiny_model.threshold = threshold_between(tiny_model(images(6), mode="side").confidence.detach(), 0.5)
    out = tiny_model(x, mode=mode)
    if mode == "main":
        assert out.logits.grad_fn is None
    else:
        out.logits.sum().backward()
        assert all(p.grad is not None for p in tiny_model.sidenet.parameters())
    assert x.grad is None
    assert all(p.grad is None for p in mainnet.parameters())
    front = tiny_model.front_pass(x, "side")
    assert front.side_logits.grad_fn is not None
    assert front.state.grad_fn is None


# -- 5. dtypes and devices --------------------------------------------------------------------------


@torch.no_grad()
def test_bfloat16_mainnet_and_sidenet() -> None:
    mainnet = build_tiny_mainnet().to(torch.bfloat16)
    split = sidenet.split_mainnet(mainnet, "layer1")
    side = SideNet((8, 16, 16), NUM_CLASSES, hidden=16, pool_size=2).to(torch.bfloat16)
    model = AdaptiveModel(split, side, threshold=NEVER_EXIT)
    x = make_images(6).to(torch.bfloat16)
    out = model(x)
    assert out.logits.dtype == torch.bfloat16 and not out.exited.any()
    torch.testing.assert_close(out.logits, mainnet(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x, mode="main").logits, mainnet(x), rtol=0, atol=0)
    side_out = model(x, mode="side")
    assert side_out.exited.all() and side_out.confidence.dtype == torch.float32
    model.threshold = threshold_between(side_out.confidence, 0.5)
    mixed = model(x)
    assert 0 < int(mixed.exited.sum()) < len(x)
    expected = torch.where(mixed.exited[:, None], side_out.logits, mainnet(x))
    torch.testing.assert_close(mixed.logits, expected, rtol=0, atol=0)
    assert model.samples_seen == 12


def test_sidenet_reads_features_of_another_dtype() -> None:
    """A float32 SideNet on a bfloat16 MainNet's features (attach may leave it in float32)."""
    side = SideNet((4,), 3, hidden=8)
    out = side(torch.randn(2, 4).to(torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (2, 3)


def test_input_dtype_mismatch_is_named(tiny_model: AdaptiveModel, images) -> None:
    x = images(2).double()
    message = (
        r"input dtype torch.float64 does not match the MainNet's torch.float32; convert with x.to\(torch.float32\)"
    )
    for mode in ("adaptive", "main"):
        with pytest.raises(ValueError, match=message):
            tiny_model(x, mode=mode)
    tiny_model.split.mainnet.to(torch.float64)  # checked against the MainNet's dtype now, not a cached one
    tiny_model.sidenet.to(torch.float64)
    with torch.no_grad():
        assert tiny_model(x).logits.dtype == torch.float64
    with pytest.raises(ValueError, match="float32 does not match the MainNet's torch.float64"):
        tiny_model(images(2))


def test_input_device_mismatch_is_named(tiny_model: AdaptiveModel) -> None:
    x = torch.zeros(2, *IMAGE_SHAPE, device="meta")
    with pytest.raises(ValueError, match="input is on meta but the MainNet is on cpu"):
        tiny_model.split.validate_input(x)


def test_integer_inputs_and_parameterless_splits_are_not_dtype_checked() -> None:
    embed = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.ReLU(), nn.Linear(12, 3))
    sidenet.split_mainnet(embed, 2).validate_input(torch.zeros(2, 3, dtype=torch.long))
    CallableSplit(trunk=lambda x: x, rest=lambda s: s).validate_input(torch.zeros(2, 3, dtype=torch.float64))
    no_parameters = CallableSplit(trunk=lambda x: x, rest=lambda s: s, mainnet=nn.ReLU())
    no_parameters.validate_input(torch.zeros(2, 3, dtype=torch.float16))


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
@pytest.mark.parametrize("how", list(COPIES))
@torch.no_grad()
def test_text_copies_run_their_own_mainnet(family: str, how: str) -> None:
    """Every text family deep-copies and pickles (their layouts hold module-level functions)."""
    pytest.importorskip("transformers")
    from test_text_split import attached, make_batch, tiny_encoder

    model = attached(tiny_encoder(family), 2)
    copied = COPIES[how](model)
    classifier = copied.split.mainnet.classifier
    (classifier.out_proj if family == "roberta" else classifier).bias.add_(1.0)
    batch = make_batch([5, 3, 7])
    expected = copied.split.mainnet_logits(batch)
    torch.testing.assert_close(copied(batch, mode="main").logits, expected, rtol=0, atol=ATOL)
    assert not torch.allclose(model(batch, mode="main").logits, expected)
