"""attach / save_sidenet / load_sidenet and the saved config: round trips, MainNet fingerprints, and
clear errors for missing or corrupt checkpoints."""

from __future__ import annotations

import hashlib
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
    SplitMismatchError,
    load_sidenet,
    mainnet_fingerprint,
    save_sidenet,
)
from sidenet.config import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME
from sidenet.models.cifar_resnet import CifarResNet


@pytest.fixture()
def saved(tiny_model: AdaptiveModel, separable_loader, tmp_path: Path) -> tuple[AdaptiveModel, Path]:
    tiny_model.fit(separable_loader, epochs=2, batch_size=32, progress=False)
    tiny_model.threshold, tiny_model.temperature = 0.6, 1.5
    folder = save_sidenet(tiny_model, tmp_path / "saved", metadata={"note": "test"})
    return tiny_model, folder


def reseal_weights(folder: Path) -> None:
    """Record the weights file's current checksum in the config (and the config's own checksum)."""
    data = json.loads((folder / CONFIG_NAME).read_text())
    data["weights_sha256"] = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    config = SideNetConfig.from_json(json.dumps({**data, "structure_sha256": None}))
    data["structure_sha256"] = config.structure_digest()
    (folder / CONFIG_NAME).write_text(json.dumps(data))


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
    for bad in ((1, 16.5, 16), "1,16,16", (1, 0, 16), 16):
        with pytest.raises(ValueError, match="input_shape"):
            sidenet.attach(tiny_mainnet, "stem", input_shape=bad)


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
    with pytest.raises(CheckpointError, match="corrupt"):
        load_sidenet(model.split.mainnet, folder)
    # The same bytes with their checksum recorded (resealed config): safetensors itself refuses them.
    reseal_weights(folder)
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
    with pytest.raises(CheckpointError, match="sha256"):
        load_sidenet(model.split.mainnet, folder)
    reseal_weights(folder)  # as if saved with these weights
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_sidenet(model.split.mainnet, folder)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"tap": "layer1"}', "lacks the keys"),
        ({"threshold": 7}, "threshold"),
        ({"format_version": 99}, "newer"),
        ({"bogus": 1, "threshold": None}, None),
    ],
)
def test_corrupt_config(saved: tuple[AdaptiveModel, Path], text: str | dict, message: str | None) -> None:
    model, folder = saved
    if isinstance(text, dict):  # edits of the saved config
        text = json.dumps({**json.loads((folder / CONFIG_NAME).read_text()), **text})
    (folder / CONFIG_NAME).write_text(text)
    if message is None:  # unknown keys are ignored; null is never-exit
        assert load_sidenet(model.split.mainnet, folder).threshold == NEVER_EXIT
        return
    with pytest.raises(CheckpointError, match=message) as info:
        load_sidenet(model.split.mainnet, folder)
    assert str(folder) in str(info.value)


# -- the split must reproduce the MainNet's own forward ---------------------------------------------


class ShiftedCifarResNet(CifarResNet):
    """A MainNet whose forward adds a step the splitter, matching module names, cannot know about."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * 2 - 1)


def shifted_copy(mainnet: nn.Module) -> ShiftedCifarResNet:
    shifted = ShiftedCifarResNet(depth=8, num_classes=NUM_CLASSES, in_channels=IMAGE_SHAPE[0], width=8)
    shifted.load_state_dict(mainnet.state_dict())
    return shifted.eval()


def test_attach_refuses_a_forward_the_split_does_not_reproduce(tiny_mainnet: nn.Module, images) -> None:
    shifted = shifted_copy(tiny_mainnet)
    for kwargs in ({"input_shape": IMAGE_SHAPE}, {"example_input": images(4)}):
        with pytest.raises(SplitMismatchError, match=r"forward.*sidenet\.CallableSplit\(trunk=") as info:
            sidenet.attach(shifted, "layer1", **kwargs)
        assert isinstance(info.value, ValueError) and "ShiftedCifarResNet" in str(info.value)
    # The escape hatch: a split written by hand is trusted as given.
    plain = sidenet.split_mainnet(shifted, "layer1")
    split = sidenet.CallableSplit(
        trunk=lambda x: plain.trunk(x * 2 - 1), rest=plain.rest, mainnet=shifted, num_classes=NUM_CLASSES, tap="layer1"
    )
    model = sidenet.attach(split, "layer1", input_shape=IMAGE_SHAPE, hidden=8, threshold=NEVER_EXIT)
    x = images(6, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, shifted(x), rtol=0, atol=1e-6)


def test_torchvision_resnet_subclass_is_refused() -> None:
    torchvision = pytest.importorskip("torchvision")

    class Shifted(torchvision.models.ResNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x * 2 - 1)

    torch.manual_seed(0)
    args = (torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    with pytest.raises(SplitMismatchError, match="does not reproduce"):
        sidenet.attach(Shifted(*args, num_classes=5).eval(), "layer1", input_shape=(3, 32, 32))
    plain = torchvision.models.ResNet(*args, num_classes=5).eval()
    assert sidenet.attach(plain, "layer1", input_shape=(3, 32, 32), hidden=8).tap == "layer1"


def test_load_refuses_a_forward_the_split_does_not_reproduce(tiny_model: AdaptiveModel, tmp_path: Path) -> None:
    """Same weights (same fingerprint), other forward: caught on load too."""
    folder = save_sidenet(tiny_model, tmp_path / "s")
    shifted = shifted_copy(tiny_model.split.mainnet)
    assert mainnet_fingerprint(shifted) == mainnet_fingerprint(tiny_model.split.mainnet)
    with pytest.raises(SplitMismatchError, match="CallableSplit"):
        load_sidenet(shifted, folder)


def test_mainnet_logits_default_and_no_mainnet(tiny_mainnet: nn.Module, images) -> None:
    split = sidenet.split_mainnet(tiny_mainnet, "layer1")
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(split.mainnet_logits(x), tiny_mainnet(x), rtol=0, atol=0)
    bare = sidenet.CallableSplit(trunk=lambda v: v, rest=lambda v: v)
    with pytest.raises(ValueError, match="no MainNet"):
        bare.mainnet_logits(x)


# -- dtype and device --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_low_and_high_precision_mainnet(make_mainnet, images, tmp_path: Path, dtype: torch.dtype) -> None:
    mainnet = make_mainnet().to(dtype)
    model = sidenet.attach(mainnet, "layer1", input_shape=IMAGE_SHAPE, hidden=8, threshold=NEVER_EXIT)
    assert {p.dtype for p in model.sidenet.parameters()} == {dtype}
    x = images(5, seed=1).to(dtype)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out.logits, mainnet(x), rtol=0, atol=0)
        model.threshold = 0.0
        assert model(x).exited.all()
    # A float32 example batch is cast to the MainNet's dtype.
    assert sidenet.attach(mainnet, "layer1", example_input=images(2), hidden=8).sidenet.mlp[0].weight.dtype == dtype
    folder = save_sidenet(model, tmp_path / "low")
    loaded = load_sidenet(make_mainnet().to(dtype), folder)
    assert {p.dtype for p in loaded.sidenet.parameters()} == {dtype}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mainnet(make_mainnet, images, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    mainnet = make_mainnet().cuda()
    model = sidenet.attach(mainnet, "layer1", input_shape=IMAGE_SHAPE, hidden=8, threshold=0.5)
    assert next(model.sidenet.parameters()).is_cuda
    x = images(5, seed=1).cuda()
    with torch.no_grad():
        expected = model(x).logits
    folder = save_sidenet(model, tmp_path / "cuda")
    assert all(t.device.type == "cpu" for t in load_file(str(folder / WEIGHTS_NAME)).values())
    loaded = load_sidenet(make_mainnet().cuda(), folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=0)
    on_cpu = load_sidenet(make_mainnet(), folder)
    assert next(on_cpu.sidenet.parameters()).device.type == "cpu"
