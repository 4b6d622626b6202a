"""CIFAR ResNets: depths, parameter counts, option-A shortcuts, and the public checkpoints' key names."""

from __future__ import annotations

import pytest
import torch

from sidenet.models.cifar_resnet import CIFAR_RESNET_DEPTHS, CifarResNet, PadShortcut, cifar_resnet

# Parameter counts of He et al. (2016), table 6, as reproduced by the public CIFAR-10 checkpoints.
PARAMETERS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def public_checkpoint_keys(depth: int) -> list[str]:
    """The state-dict keys of the public CIFAR-10 ResNet checkpoints (``module.`` prefix removed)."""
    n = (depth - 2) // 6
    keys = ["conv1.weight", *(f"bn1.{k}" for k in BN_KEYS)]
    for stage in (1, 2, 3):
        for block in range(n):
            prefix = f"layer{stage}.{block}"
            for conv in (1, 2):
                keys.append(f"{prefix}.conv{conv}.weight")
                keys += [f"{prefix}.bn{conv}.{k}" for k in BN_KEYS]
    return [*keys, "linear.weight", "linear.bias"]


@pytest.mark.parametrize("depth", CIFAR_RESNET_DEPTHS)
def test_depth_parameters_and_output(depth: int) -> None:
    torch.manual_seed(0)
    model = cifar_resnet(depth, num_classes=10).eval()
    assert isinstance(model, CifarResNet) and model.depth == depth
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[depth]
    n = (depth - 2) // 6
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("depth", [20, 56])
def test_public_checkpoint_keys_load_strictly(depth: int) -> None:
    model = cifar_resnet(depth, num_classes=10)
    own = model.state_dict()
    expected = public_checkpoint_keys(depth)
    assert sorted(own) == sorted(expected)
    assert not any("shortcut" in key for key in own)  # option A: parameter-free shortcuts
    # A checkpoint with those names and fresh values loads strictly and is used as it is.
    generator = torch.Generator().manual_seed(depth)
    checkpoint = {}
    for key in expected:
        shape = own[key].shape
        if key.endswith("num_batches_tracked"):
            checkpoint[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            checkpoint[key] = 0.5 + torch.rand(shape, generator=generator)
        else:
            checkpoint[key] = torch.randn(shape, generator=generator)
    result = CifarResNet(depth).load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = CifarResNet(depth)
    loaded.load_state_dict(checkpoint)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, checkpoint[key]), key


def test_checkpoint_with_extra_or_missing_keys_fails_strict_load() -> None:
    checkpoint = cifar_resnet(20).state_dict()
    checkpoint["layer2.0.shortcut.0.weight"] = torch.zeros(32, 16, 1, 1)  # an option-B checkpoint
    with pytest.raises(RuntimeError, match="shortcut"):
        cifar_resnet(20).load_state_dict(checkpoint)


def test_option_a_shortcut_pads_channels_and_subsamples() -> None:
    shortcut = PadShortcut(16)
    x = torch.randn(2, 16, 8, 8)
    out = shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    assert list(shortcut.parameters()) == []
    model = cifar_resnet(20)
    assert isinstance(model.layer2[0].shortcut, PadShortcut) and isinstance(model.layer3[0].shortcut, PadShortcut)
    assert isinstance(model.layer1[0].shortcut, torch.nn.Identity)


def test_forward_is_stem_stages_head() -> None:
    torch.manual_seed(0)
    model = cifar_resnet(20, num_classes=7, in_channels=1, width=8).eval()
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        manual = model.forward_head(model.layer3(model.layer2(model.layer1(model.forward_stem(x)))))
        torch.testing.assert_close(model(x), manual)
    assert model.linear.in_features == 32 and model.linear.out_features == 7 and model.conv1.in_channels == 1


@pytest.mark.parametrize("depth", [0, 7, 19, 21, 2])
def test_bad_depth_raises(depth: int) -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(depth)


def test_smallest_depth() -> None:
    model = cifar_resnet(8)
    assert len(model.layer1) == 1


def test_constructors_are_exported_from_sidenet_models() -> None:
    # ``sidenet.models.cifar_resnet`` used to be only the submodule, so calling it failed.
    from sidenet.models import CIFAR_RESNET_DEPTHS as depths
    from sidenet.models import CifarResNet as exported_class
    from sidenet.models import cifar_resnet as exported

    model = exported(56)
    assert isinstance(model, CifarResNet) and exported_class is CifarResNet and model.depth == 56
    assert depths == CIFAR_RESNET_DEPTHS
    # The submodule stays importable by its dotted name.
    from sidenet.models.cifar_resnet import PadShortcut as shortcut

    assert shortcut is PadShortcut
