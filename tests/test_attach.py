"""attach / save_sidenet / load_sidenet and the saved config: round trips, MainNet fingerprints, and
clear errors for missing or corrupt checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sidenet
from helpers import IMAGE_SHAPE, NUM_CLASSES
from sidenet import (
    NEVER_EXIT,
    AdaptiveModel,
    CheckpointError,
    ClassCountMismatchError,
    MainNetMismatchError,
    SideNetConfig,
    load_sidenet,
    mainnet_fingerprint,
    save_sidenet,
)
from sidenet.config import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME


@pytest.fixture()
def saved(tiny_model: AdaptiveModel, separable_loader, tmp_path: Path) -> tuple[AdaptiveModel, Path]:
    tiny_model.fit(separable_loader, epochs=2, batch_size=32, progress=False)
    tiny_model.threshold, tiny_model.temperature = 0.6, 1.5
    folder = save_sidenet(tiny_model, tmp_path / "saved", metadata={"note": "test"})
    return tiny_model, folder


def test_attach_builds_a_fresh_sidenet(tiny_mainnet: nn.Module) -> None:
    tiny_mainnet.train()
    model = sidenet.attach(tiny_mainnet, "layer2", input_shape=IMAGE_SHAPE, hidden=16, pool_size=3, threshold=0.7)
    assert not tiny_mainnet.training  # attach puts the MainNet in eval mode
    assert model.tap == "layer2" and model.threshold == 0.7
    assert model.sidenet.feature_shape == (16, 8, 8) and model.sidenet.num_classes == NUM_CLASSES
    assert model.sidenet.in_features == 16 * 3 * 3 and model.sidenet.hidden == 16
    same = sidenet.attach(tiny_mainnet, "layer2", example_input=torch.zeros(5, *IMAGE_SHAPE), hidden=16, pool_size=3)
    assert torch.equal(same.sidenet.mlp[0].weight, model.sidenet.mlp[0].weight)  # seeded initialisation
    other = sidenet.attach(tiny_mainnet, "layer2", input_shape=IMAGE_SHAPE, hidden=16, pool_size=3, seed=1)
    assert not torch.equal(other.sidenet.mlp[0].weight, model.sidenet.mlp[0].weight)


def test_attach_does_not_disturb_the_global_rng(tiny_mainnet: nn.Module) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sidenet.attach(tiny_mainnet, "stem", input_shape=IMAGE_SHAPE, hidden=8)
    assert torch.equal(torch.rand(3), expected)


def test_attach_bad_inputs(tiny_mainnet: nn.Module) -> None:
    with pytest.raises(sidenet.TapError, match="valid taps"):
        sidenet.attach(tiny_mainnet, "layer9", input_shape=IMAGE_SHAPE)
    with pytest.raises(ValueError, match="input channels"):
        sidenet.attach(tiny_mainnet, "stem", input_shape=(3, 16, 16))
    with pytest.raises(ValueError, match="threshold"):
        sidenet.attach(tiny_mainnet, "stem", input_shape=IMAGE_SHAPE, threshold=2.0)


def test_round_trip_gives_identical_outputs(saved: tuple[AdaptiveModel, Path], make_mainnet, images) -> None:
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = load_sidenet(make_mainnet(), folder)  # a fresh copy of the same MainNet
    assert (loaded.tap, loaded.threshold, loaded.temperature) == ("layer1", 0.6, 1.5)
    assert loaded.history_ == model.history_ and len(loaded.history_) == 2
    assert not loaded.training
    for key, value in model.sidenet.state_dict().items():
        assert torch.equal(loaded.sidenet.state_dict()[key], value), key
    x = images(16, seed=3)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.exited, expected.exited)
    assert torch.equal(got.flops, expected.flops)


def test_config_contents(saved: tuple[AdaptiveModel, Path]) -> None:
    model, folder = saved
    data = json.loads((folder / CONFIG_NAME).read_text())
    assert data["tap"] == "layer1" and data["feature_shape"] == [8, 16, 16] and data["num_classes"] == NUM_CLASSES
    assert (data["hidden"], data["pool_size"], data["threshold"], data["temperature"]) == (32, 2, 0.6, 1.5)
    assert data["mainnet_fingerprint"] == mainnet_fingerprint(model.split.mainnet)
    assert data["mainnet_class"] == "CifarResNet" and data["format_version"] == FORMAT_VERSION
    assert data["metadata"]["note"] == "test" and len(data["metadata"]["history"]) == 2


def test_never_exit_is_stored_as_null(tiny_model: AdaptiveModel, tmp_path: Path) -> None:
    tiny_model.threshold = NEVER_EXIT
    folder = save_sidenet(tiny_model, tmp_path / "never")
    assert json.loads((folder / CONFIG_NAME).read_text())["threshold"] is None
    assert load_sidenet(tiny_model.split.mainnet, folder).threshold == NEVER_EXIT


@pytest.mark.parametrize("threshold", [0.0, 0.35, 1.0, math.inf])
def test_config_json_round_trip(threshold: float) -> None:
    config = SideNetConfig(tap=3, feature_shape=[4, 2, 2], num_classes=5, threshold=threshold, metadata={"a": [1]})
    text = config.to_json()
    assert "Infinity" not in text
    back = SideNetConfig.from_json(text)
    assert back == config


def test_sequential_mainnet_round_trip_with_integer_tap(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    model = sidenet.attach(net, 2, input_shape=(6,), hidden=4, threshold=0.5)
    loaded = load_sidenet(net, save_sidenet(model, tmp_path / "seq"))
    assert loaded.tap == 2
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_loading_onto_a_different_mainnet_raises(saved: tuple[AdaptiveModel, Path], make_mainnet) -> None:
    _, folder = saved
    other = make_mainnet(seed=1)
    with pytest.raises(MainNetMismatchError, match="trained on a different MainNet") as info:
        load_sidenet(other, folder)
    assert isinstance(info.value, ValueError)
    # One changed batch-norm statistic is a different MainNet too.
    nudged = make_mainnet()
    with torch.no_grad():
        nudged.bn1.running_var[0] += 1e-3
    with pytest.raises(MainNetMismatchError):
        load_sidenet(nudged, folder)
    assert load_sidenet(other, folder, check_fingerprint=False).tap == "layer1"


def test_fingerprint() -> None:
    torch.manual_seed(0)
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert mainnet_fingerprint(a) == mainnet_fingerprint(b) and len(mainnet_fingerprint(a)) == 64
    with torch.no_grad():
        b.bias[0] += 1
    assert mainnet_fingerprint(a) != mainnet_fingerprint(b)
    assert mainnet_fingerprint(a) != mainnet_fingerprint(a.double())


def test_class_count_mismatch_on_load(saved: tuple[AdaptiveModel, Path], make_mainnet) -> None:
    _, folder = saved
    five_classes = make_mainnet(num_classes=NUM_CLASSES + 1)
    with pytest.raises(ClassCountMismatchError, match="classes"):
        load_sidenet(five_classes, folder, check_fingerprint=False)


def test_missing_folder(tiny_mainnet: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"no {CONFIG_NAME}") as info:
        load_sidenet(tiny_mainnet, tmp_path / "nowhere")
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)


def test_missing_weights(saved: tuple[AdaptiveModel, Path]) -> None:
    model, folder = saved
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"no {WEIGHTS_NAME}"):
        load_sidenet(model.split.mainnet, folder)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_corrupt_weights(saved: tuple[AdaptiveModel, Path], content: bytes) -> None:
    model, folder = saved
    (folder / WEIGHTS_NAME).write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_sidenet(model.split.mainnet, folder)


def test_truncated_weights(saved: tuple[AdaptiveModel, Path]) -> None:
    model, folder = saved
    weights = folder / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_sidenet(model.split.mainnet, folder)


def test_weights_not_matching_config(saved: tuple[AdaptiveModel, Path]) -> None:
    model, folder = saved
    save_file({"mlp.0.weight": torch.zeros(3, 3)}, str(folder / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_sidenet(model.split.mainnet, folder)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"tap": "layer1"}', "lacks the keys"),
        ('{"tap": "layer1", "feature_shape": [8, 16, 16], "num_classes": 4, "threshold": 7}', "threshold"),
        ('{"tap": "layer1", "feature_shape": [8, 16, 16], "num_classes": 4, "format_version": 99}', "newer"),
        (
            '{"tap": "layer1", "feature_shape": [8, 16, 16], "num_classes": 4, "hidden": 32, "pool_size": 2, '
            '"bogus": 1, "threshold": null}',
            None,
        ),
    ],
)
def test_corrupt_config(saved: tuple[AdaptiveModel, Path], text: str, message: str | None) -> None:
    model, folder = saved
    (folder / CONFIG_NAME).write_text(text)
    if message is None:  # unknown keys are ignored; null is never-exit
        assert load_sidenet(model.split.mainnet, folder).threshold == NEVER_EXIT
        return
    with pytest.raises(CheckpointError, match=message) as info:
        load_sidenet(model.split.mainnet, folder)
    assert str(folder) in str(info.value)
