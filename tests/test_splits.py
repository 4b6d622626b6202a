"""Splitters: every tap of torchvision and CIFAR ResNets, nn.Sequential, CallableSplit, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import sidenet
from helpers import randomize_batchnorm
from sidenet import NEVER_EXIT, CallableSplit, MainNetSplit, TapError, split_mainnet
from sidenet.models.cifar_resnet import cifar_resnet
from sidenet.splits import (
    SPLITTERS,
    SequentialSplit,
    StagedSplit,
    concat_samples,
    register_splitter,
    select_samples,
)
from sidenet.splits.vision import is_cifar_resnet, is_torchvision_resnet


def blocks(stage_sizes: dict[str, int]) -> list[str]:
    return [f"{layer}.{i}" for layer, n in stage_sizes.items() for i in range(n)]


def check_taps(taps: list[str], stage_sizes: dict[str, int]) -> None:
    """``taps`` are stem, every block and every stage alias, listed in execution order (an alias sits
    beside its stage's last block)."""
    order = ["stem", *blocks(stage_sizes)]
    assert set(taps) == set(order) | set(stage_sizes)
    last = {layer: f"{layer}.{n - 1}" for layer, n in stage_sizes.items()}
    positions = [order.index(last.get(tap, tap)) for tap in taps]
    assert positions == sorted(positions)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.resnet18(weights=None, num_classes=5)).eval()


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.resnet50(weights=None, num_classes=3)).eval()


def check_split(model: nn.Module, tap: str | int, x: torch.Tensor) -> MainNetSplit:
    split = split_mainnet(model, tap)
    with torch.no_grad():
        expected = model(x)
        state = split.trunk(x)
        torch.testing.assert_close(split.rest(state), expected)
        torch.testing.assert_close(split(x), expected)
    assert split.tap == tap
    return split


# -- torchvision ResNets --------------------------------------------------------------------------


def test_resnet18_every_tap(resnet18: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    taps = split_mainnet(resnet18, "stem").valid_taps
    check_taps(taps, {"layer1": 2, "layer2": 2, "layer3": 2, "layer4": 2})
    for tap in taps:
        split = check_split(resnet18, tap, x)
        assert split.num_classes == 5 and split.in_channels == 3


def test_resnet18_tap_shapes_and_aliases(resnet18: nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64)
    channels = {"stem": (64, 16), "layer1": (64, 16), "layer2": (128, 8), "layer3": (256, 4), "layer4": (512, 2)}
    with torch.no_grad():
        for tap, (c, side) in channels.items():
            assert split_mainnet(resnet18, tap).trunk(x).shape == (1, c, side, side)
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            alias, last = split_mainnet(resnet18, layer), split_mainnet(resnet18, f"{layer}.1")
            assert torch.equal(alias.trunk(x), last.trunk(x))


RESNET50_STAGES = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}


def test_resnet50_valid_taps(resnet50: nn.Module) -> None:
    taps = split_mainnet(resnet50, "stem").valid_taps
    check_taps(taps, RESNET50_STAGES)
    assert len(taps) == 1 + 16 + 4


@pytest.mark.parametrize("tap", ["stem", *blocks(RESNET50_STAGES), *RESNET50_STAGES])
def test_resnet50_every_tap(resnet50: nn.Module, tap: str) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    check_split(resnet50, tap, x)


def test_torchvision_resnet_attach_never_exit(resnet18: nn.Module) -> None:
    model = sidenet.attach(resnet18, "layer2", input_shape=(3, 32, 32), hidden=8, threshold=NEVER_EXIT)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, resnet18(x), rtol=0, atol=1e-5)
    assert model.sidenet.feature_shape == (128, 4, 4)


@pytest.mark.parametrize("attach_classes", [None, 7])
def test_torchvision_resnet_with_sequential_fc(attach_classes: int | None) -> None:
    """``fc = Sequential(Dropout, Linear)``: the class count comes from the last Linear inside."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 7))
    net.eval()
    model = sidenet.attach(
        net, "layer1", input_shape=(3, 64, 64), num_classes=attach_classes, hidden=8, threshold=NEVER_EXIT
    )
    assert model.split.num_classes == 7 and model.sidenet.num_classes == 7
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, net(x), rtol=0, atol=1e-5)


def test_resnet_head_without_linear_takes_attach_classes() -> None:
    """A head with no Linear inside (a 1x1 convolution here): the count is unknown, attach's is used."""

    class ConvHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(512, 6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x[:, :, None, None]).flatten(1)

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = ConvHead()
    assert split_mainnet(net.eval(), "layer2").num_classes is None
    with pytest.raises(ValueError, match="num_classes"):
        sidenet.attach(net, "layer2", input_shape=(3, 32, 32))
    assert sidenet.attach(net, "layer2", input_shape=(3, 32, 32), num_classes=6, hidden=8).sidenet.num_classes == 6


def test_cifar_resnet_with_sequential_linear() -> None:
    model = cifar_resnet(8, num_classes=10)
    model.linear = nn.Sequential(nn.Dropout(), nn.Linear(64, 3))
    split = split_mainnet(model.eval(), "layer1")
    assert split.num_classes == 3
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(split(x), model(x))


def test_torchvision_unknown_tap_lists_valid_taps(resnet18: nn.Module) -> None:
    with pytest.raises(TapError) as info:
        split_mainnet(resnet18, "layer5")
    message = str(info.value)
    assert "'layer5'" in message and "ResNet" in message
    for tap in ("stem", "layer1", "layer1.0", "layer4.1"):
        assert tap in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(TapError, match="valid taps"):
        split_mainnet(resnet18, "layer1.2")


# -- CIFAR ResNets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_cifar_resnet_every_tap(depth: int) -> None:
    torch.manual_seed(depth)
    model = randomize_batchnorm(cifar_resnet(depth, num_classes=10)).eval()
    n = (depth - 2) // 6
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(depth))
    taps = split_mainnet(model, "stem").valid_taps
    check_taps(taps, {"layer1": n, "layer2": n, "layer3": n})
    for tap in taps:
        split = check_split(model, tap, x)
        assert split.num_classes == 10 and split.in_channels == 3


def test_cifar_resnet110_some_taps() -> None:
    torch.manual_seed(110)
    model = randomize_batchnorm(cifar_resnet(110, num_classes=10)).eval()
    x = torch.randn(2, 3, 16, 16)
    assert len(split_mainnet(model, "stem").valid_taps) == 1 + 54 + 3
    for tap in ("layer1.17", "layer2.5"):
        check_split(model, tap, x)


def test_cifar_resnet_tap_shapes() -> None:
    model = cifar_resnet(20, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for tap, shape in {"stem": (16, 32), "layer1": (16, 32), "layer2.0": (32, 16), "layer3": (64, 8)}.items():
            assert split_mainnet(model, tap).trunk(x).shape == (1, shape[0], shape[1], shape[1])


def test_cifar_unknown_tap_lists_valid_taps() -> None:
    with pytest.raises(TapError) as info:
        split_mainnet(cifar_resnet(20), "layer4")
    message = str(info.value)
    assert "valid taps: stem, layer1.0" in message and "layer3.2" in message


def test_cifar_input_checks() -> None:
    split = split_mainnet(cifar_resnet(20, in_channels=1), "layer1")
    split.validate_input(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="expected 1 input channels, got 3"):
        split.validate_input(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"image batch of shape \(N, 1, H, W\)"):
        split.validate_input(torch.zeros(28, 28))


def test_model_detection() -> None:
    assert is_cifar_resnet(cifar_resnet(20)) and not is_torchvision_resnet(cifar_resnet(20))
    resnet = torchvision.models.resnet18(weights=None)
    assert is_torchvision_resnet(resnet) and not is_cifar_resnet(resnet)

    class LookAlike(nn.Module):  # laid out like a CIFAR ResNet but not one
        def __init__(self) -> None:
            super().__init__()
            source = cifar_resnet(8, num_classes=3)
            self.conv1, self.bn1, self.linear = source.conv1, source.bn1, source.linear
            self.layer1, self.layer2, self.layer3 = source.layer1, source.layer2, source.layer3

    assert isinstance(split_mainnet(LookAlike(), "layer2"), StagedSplit)


# -- nn.Sequential ----------------------------------------------------------------------------------


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 3),
    ).eval()


def test_sequential_integer_taps() -> None:
    model = small_cnn()
    x = torch.randn(4, 1, 16, 16)
    for tap in range(1, len(model)):
        split = check_split(model, tap, x)
        assert isinstance(split, SequentialSplit) and split.num_classes == 3
    with torch.no_grad():
        assert split_mainnet(model, 2).trunk(x).shape == (4, 4, 16, 16)
    assert split_mainnet(model, "3").tap == 3
    # The CLI passes taps as text; integer types other than int count as integers.
    for tap in ("3", " 3 ", np.int64(3), torch.tensor(3)):
        split = split_mainnet(model, tap)
        assert split.tap == 3 and type(split.tap) is int


@pytest.mark.parametrize(
    "tap", [0, 7, -1, "layer1", None, 2.7, 2.0, "2.7", "-1", True, False, np.bool_(True), torch.tensor(True)]
)
def test_sequential_bad_tap(tap: object) -> None:
    """Floats and booleans are refused, not truncated: ``int(2.7)`` is 2 and ``int(True)`` is 1."""
    with pytest.raises(TapError, match=r"valid taps: integers 1\.\.6"):
        split_mainnet(small_cnn(), tap)


def test_sequential_input_checks() -> None:
    cnn = split_mainnet(small_cnn(), 2)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        cnn.validate_input(torch.zeros(2, 3, 16, 16))
    mlp = split_mainnet(nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 2)), 2)
    mlp.validate_input(torch.zeros(3, 10))
    with pytest.raises(ValueError, match="10 features"):
        mlp.validate_input(torch.zeros(3, 12))


def test_sequential_flatten_first_accepts_images() -> None:
    """An MLP that flattens its image input: the first Linear's width is not the input's last dim."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    model = sidenet.attach(net, 3, input_shape=(1, 16, 16), hidden=8, threshold=NEVER_EXIT)
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, net(x))


# -- CallableSplit and the registry -----------------------------------------------------------------


class TwoPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_callable_split_without_subclassing() -> None:
    torch.manual_seed(0)
    net = TwoPart().eval()
    split = CallableSplit(trunk=net.body, rest=net.head, mainnet=net, num_classes=3, tap="body")
    x = torch.randn(5, 6)
    check_split(split, "body", x)
    assert split_mainnet(split, "anything") is split
    model = sidenet.attach(split, "ignored", example_input=x, hidden=4, threshold=NEVER_EXIT)
    assert model.tap == "body" and model.sidenet.feature_shape == (8,)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, net(x))
    model.threshold = 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, model.sidenet(net.body(x)))


def test_callable_split_class_count() -> None:
    net = TwoPart()
    split = CallableSplit(trunk=net.body, rest=net.head, mainnet=net)
    with pytest.raises(ValueError, match="num_classes"):
        sidenet.attach(split, "t", input_shape=(6,))
    assert sidenet.attach(split, "t", input_shape=(6,), num_classes=3, hidden=4).sidenet.num_classes == 3
    with pytest.raises(TapError, match="in place of the MainNet"):  # the split given as the tap
        sidenet.attach(net, split, input_shape=(6,), num_classes=3)
    known = CallableSplit(trunk=net.body, rest=net.head, mainnet=net, num_classes=3)
    with pytest.raises(ValueError, match="num_classes=4 but the MainNet predicts 3"):
        sidenet.attach(known, "t", input_shape=(6,), num_classes=4)


def test_attach_needs_an_input_shape() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        sidenet.attach(small_cnn(), 2)


def test_non_tensor_state_needs_features() -> None:
    split = CallableSplit(trunk=lambda x: (x, x), rest=lambda s: s[0])
    with pytest.raises(TypeError, match="features"):
        split.features(split.trunk(torch.zeros(2, 3)))


def test_base_split_is_abstract() -> None:
    split = MainNetSplit(None, "t")
    with pytest.raises(NotImplementedError):
        split.trunk(torch.zeros(1))
    with pytest.raises(NotImplementedError):
        split.rest(torch.zeros(1))


def test_select_samples_nested_state() -> None:
    state = {"a": torch.arange(5), "b": [torch.arange(10).reshape(5, 2), "label"], "c": (torch.ones(5, 1, 2),)}
    index = torch.tensor([4, 1])
    picked = select_samples(state, index)
    assert picked["a"].tolist() == [4, 1]
    assert picked["b"][0].tolist() == [[8, 9], [2, 3]] and picked["b"][1] == "label"
    assert picked["c"][0].shape == (2, 1, 2)


def test_concat_samples_undoes_select() -> None:
    state = {"a": torch.arange(5), "b": [torch.arange(10).reshape(5, 2), "label"]}
    parts = [select_samples(state, torch.tensor(index)) for index in ([0, 1], [2], [3, 4])]
    joined = concat_samples(parts)
    assert torch.equal(joined["a"], state["a"]) and torch.equal(joined["b"][0], state["b"][0])
    assert joined["b"][1] == "label"


@pytest.mark.parametrize(
    ("states", "message"),
    [
        ([], "no states"),
        ([torch.zeros(2, 3), {"a": torch.zeros(2, 3)}], "structures"),
        ([torch.zeros(2, 3), torch.zeros(2, 4)], "sample shapes"),
    ],
)
def test_concat_samples_refuses_mismatched_states(states: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        concat_samples(states)


def test_unknown_model_type() -> None:
    with pytest.raises(TypeError, match="CallableSplit"):
        split_mainnet(TwoPart(), "body")


def test_registered_splitter_takes_precedence() -> None:
    def build(model: nn.Module, tap: str) -> MainNetSplit:
        return CallableSplit(trunk=model.body, rest=model.head, mainnet=model, num_classes=3, tap=tap)

    register_splitter("two_part", lambda m: isinstance(m, TwoPart), build)
    try:
        net = TwoPart()
        split = split_mainnet(net, "body")
        assert isinstance(split, CallableSplit) and split.tap == "body"
    finally:
        SPLITTERS.pop("two_part")
    with pytest.raises(TypeError):
        split_mainnet(net, "body")
