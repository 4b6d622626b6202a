"""FLOPs: counting, the trunk/SideNet/rest profile, and its identity with the whole MainNet."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import sidenet
from helpers import threshold_between
from sidenet import FlopProfile, SideNet, count_flops, profile_flops, split_mainnet
from sidenet.models.cifar_resnet import cifar_resnet


def test_count_flops_linear_and_conv() -> None:
    linear = nn.Linear(8, 4)
    flops, out = count_flops(linear, torch.zeros(3, 8))
    assert flops == 2 * 3 * 8 * 4 and out.shape == (3, 4)
    conv = nn.Conv2d(2, 5, 3, padding=1, bias=False)
    flops, _ = count_flops(conv, torch.zeros(1, 2, 6, 6))
    assert flops == 2 * (2 * 9) * 5 * 36
    flops, _ = count_flops(lambda x: torch.relu(x) + 1, torch.zeros(4, 4))
    assert flops == 0  # element-wise work is not counted


def test_count_flops_runs_without_grad() -> None:
    linear = nn.Linear(2, 2)
    _, out = count_flops(linear, torch.zeros(1, 2))
    assert not out.requires_grad


@pytest.mark.parametrize(
    ("name", "tap", "shape"),
    [
        ("cifar20", "stem", (3, 16, 16)),
        ("cifar20", "layer1.1", (3, 16, 16)),
        ("cifar20", "layer2", (3, 16, 16)),
        ("cifar20", "layer3.2", (3, 16, 16)),
        ("resnet18", "stem", (3, 32, 32)),
        ("resnet18", "layer2.0", (3, 32, 32)),
        ("resnet18", "layer4", (3, 32, 32)),
        ("sequential", 2, (1, 16, 16)),
        ("sequential", 5, (1, 16, 16)),
    ],
)
def test_trunk_plus_rest_is_the_mainnet(name: str, tap: str | int, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    if name == "cifar20":
        model = cifar_resnet(20, num_classes=10)
    elif name == "resnet18":
        model = torchvision.models.resnet18(weights=None, num_classes=4)
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 3)
        )
    model.eval()
    x = torch.randn(1, *shape)
    split = split_mainnet(model, tap)
    with torch.no_grad():
        features = split.features(split.trunk(x))
    head = SideNet(features.shape[1:], split.num_classes, hidden=16, pool_size=2)
    profile = profile_flops(split, head, x)
    whole, _ = count_flops(model, x)
    assert profile.trunk + profile.rest == whole == profile.mainnet
    assert profile.trunk > 0 and profile.rest > 0
    side, _ = count_flops(head, features)
    assert profile.side == side
    # The SideNet's cost: its two linear layers (pooling is not counted).
    assert side == 2 * (head.in_features * 16 + 16 * split.num_classes)


def test_profile_needs_a_single_sample() -> None:
    split = split_mainnet(cifar_resnet(8), "stem")
    with pytest.raises(ValueError, match="batch of one"):
        profile_flops(split, SideNet((16, 8, 8), 10), torch.zeros(2, 3, 8, 8))


def test_flop_profile_arithmetic() -> None:
    profile = FlopProfile(trunk=100, side=10, rest=300)
    assert profile.mainnet == 400
    assert profile.adaptive(0.0) == 410
    assert profile.adaptive(1.0) == 110
    assert profile.adaptive(0.25) == pytest.approx(110 + 0.75 * 300)
    assert profile.to_dict() == {"trunk": 100, "side": 10, "rest": 300, "mainnet": 400}


def test_adaptive_flops_per_sample(tiny_model: sidenet.AdaptiveModel, images) -> None:
    x = images(10)
    profile = tiny_model.flop_profile(x)
    whole, _ = count_flops(tiny_model.split.mainnet, x[:1])
    assert profile.mainnet == whole
    with torch.no_grad():
        confidence = tiny_model(x).confidence
        tiny_model.threshold = threshold_between(confidence, 0.5)
        out = tiny_model(x)
    assert 0 < int(out.exited.sum()) < len(x)
    assert torch.all(out.flops[out.exited] == profile.trunk + profile.side)
    assert torch.all(out.flops[~out.exited] == profile.trunk + profile.side + profile.rest)
    assert float(out.flops.mean()) == pytest.approx(profile.adaptive(float(out.exited.float().mean())))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao.quantization
def test_quantised_mainnet_counts_flops_on_its_float_twin() -> None:
    """FlopCounterMode counts no int8 kernel; count_flops_with(float twin) restores the FLOPs while the
    routed outputs stay those of the quantised MainNet."""
    import copy

    import sidenet

    torch.manual_seed(0)
    mainnet = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)).eval()
    int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(mainnet), {nn.Linear}, dtype=torch.qint8)
    model = sidenet.attach(int8, 2, input_shape=(16,), num_classes=5, hidden=8, threshold=sidenet.NEVER_EXIT)
    x = torch.randn(4, 16)
    assert model.flop_profile(x).mainnet == 0  # nothing counted on int8 kernels
    model.count_flops_with(mainnet)
    assert model.flop_profile(x).mainnet == 2 * (16 * 64 + 64 * 64 + 64 * 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, int8(x))
    model.count_flops_with(None)
    assert model.flop_profile(x).mainnet == 0


def test_the_ledger_keeps_one_profile_per_input_size(tiny_model) -> None:
    """The model's FLOPs methods hand over to its FlopLedger, which measures once per input size and
    forgets its profiles when told to count on another MainNet; a float twin follows the model's .to()."""
    from helpers import build_tiny_mainnet, make_images

    ledger = tiny_model.flop_ledger
    assert isinstance(ledger, sidenet.FlopLedger) and ledger.profiles == {}
    profile = tiny_model.flop_profile(make_images(3))
    assert ledger.profiles == {(1, 16, 16): profile} and ledger.profile(make_images(5)) is profile
    twin = build_tiny_mainnet(seed=3)
    assert tiny_model.count_flops_with(twin) is tiny_model and ledger.profiles == {}
    assert ledger.twin is not None and not any(p.requires_grad for p in ledger.twin.parameters())
    assert tiny_model.flop_profile(make_images(2)) == profile  # same architecture, same FLOPs
    tiny_model.to(torch.float64)
    assert next(ledger.twin.parameters()).dtype == torch.float64
