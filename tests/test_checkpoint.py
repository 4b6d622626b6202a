"""Saved SideNet folders: atomic saves, checksums of the weights and of the config's structural fields,
every config key required and type-checked, and the tap features checked against the config on load."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sidenet import AdaptiveModel, CheckpointError, SideNetConfig, load_sidenet, save_sidenet
from sidenet.config import CONFIG_NAME, REFERENCE_NAME, WEIGHTS_NAME

# The module that saves: its save_file is patched to inject failures.
checkpoint_module = importlib.import_module("sidenet.checkpoint")

# Every key a saved config must hold (only the free-form metadata may be left out).
REQUIRED = [
    "tap",
    "split_options",
    "feature_shape",
    "num_classes",
    "hidden",
    "pool_size",
    "threshold",
    "temperature",
    "policy",
    "mainnet_fingerprint",
    "mainnet_class",
    "format_version",
    "input_shape",
    "input_dtype",
    "weights_sha256",
    "reference_sha256",
    "structure_sha256",
]


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / CONFIG_NAME).read_text())


def write_config(folder: Path, data: dict[str, Any]) -> None:
    (folder / CONFIG_NAME).write_text(json.dumps(data))


def resealed(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its structure checksum recomputed: a consistent config, as if saved that way."""
    config = SideNetConfig.from_json(json.dumps({**data, "structure_sha256": None}))
    return {**data, "structure_sha256": config.structure_digest()}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture()
def saved(tiny_model: AdaptiveModel, tmp_path: Path) -> tuple[AdaptiveModel, Path]:
    tiny_model.threshold, tiny_model.temperature = 0.6, 1.5
    tiny_model.set_reference(np.linspace(0.2, 1.0, 50))
    return tiny_model, save_sidenet(tiny_model, tmp_path / "saved", metadata={"note": "first"})


def assert_outputs_equal(a: AdaptiveModel, b: AdaptiveModel, images) -> None:
    x = images(8, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits, rtol=0, atol=0)


# -- atomic saves -----------------------------------------------------------------------------------


def test_bad_metadata_fails_before_writing(saved: tuple[AdaptiveModel, Path], images) -> None:
    model, folder = saved
    before, first = snapshot(folder), model.sidenet.mlp[0].weight.detach().clone()
    with torch.no_grad():
        model.sidenet.mlp[0].weight.add_(1.0)  # the second save would write other weights
    with pytest.raises(ValueError, match="'bad'"):
        save_sidenet(model, folder, metadata={"ok": 1, "bad": object()})
    with pytest.raises(ValueError, match="metadata"):
        save_sidenet(model, folder, metadata={3: "a non-string key"})  # type: ignore[dict-item]
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["saved"]  # no temporary folder left
    loaded = load_sidenet(model.split.mainnet, folder)
    assert torch.equal(loaded.sidenet.mlp[0].weight, first)


@pytest.mark.parametrize("failing_call", [0, 1])
def test_failure_mid_write_keeps_the_old_folder(
    saved: tuple[AdaptiveModel, Path], monkeypatch: pytest.MonkeyPatch, failing_call: int
) -> None:
    """A save that dies while writing (disk full, killed) leaves the previous save as it was."""
    model, folder = saved
    before = snapshot(folder)
    real_save_file = checkpoint_module.save_file
    calls = []

    def failing(tensors: dict, path: str) -> None:
        calls.append(path)
        if len(calls) - 1 == failing_call:
            Path(path).write_bytes(b"half a file")
            raise OSError("disk full")
        real_save_file(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", failing)
    with torch.no_grad():
        model.sidenet.mlp[0].weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_sidenet(model, folder, metadata={"note": "second"})
    assert len(calls) == failing_call + 1
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["saved"]
    monkeypatch.undo()
    assert load_sidenet(model.split.mainnet, folder).tap == "layer1"


def test_resave_replaces_the_sidenet_and_keeps_other_files(saved: tuple[AdaptiveModel, Path], images) -> None:
    """The CLI writes plots and reports into a SideNet's folder; saving again must not delete them, and
    must drop a reference file that the new save does not have."""
    model, folder = saved
    (folder / "curve_test.png").write_bytes(b"png")
    (folder / "report").mkdir()
    (folder / "report" / "report.html").write_text("<html>")
    with torch.no_grad():
        model.sidenet.mlp[0].weight.add_(1.0)
    model.reference_confidence = None
    save_sidenet(model, folder, metadata={"note": "second"})
    assert (folder / "curve_test.png").read_bytes() == b"png"
    assert (folder / "report" / "report.html").read_text() == "<html>"
    assert not (folder / REFERENCE_NAME).exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["saved"]
    loaded = load_sidenet(model.split.mainnet, folder)
    assert loaded.reference_confidence is None and read_config(folder)["metadata"]["note"] == "second"
    assert_outputs_equal(loaded, model, images)


def test_save_into_a_file_path_raises(tiny_model: AdaptiveModel, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        save_sidenet(tiny_model, tmp_path / "file")


def test_save_through_a_symlink_and_permissions(
    tiny_model: AdaptiveModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = save_sidenet(tiny_model, tmp_path / "real")
    (tmp_path / "plain").mkdir()
    assert real.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777  # not mkdtemp's 0700
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    tiny_model.threshold = 0.3
    save_sidenet(tiny_model, link)
    assert link.is_symlink() and read_config(real)["threshold"] == 0.3
    monkeypatch.chdir(real)
    with pytest.raises(ValueError, match="working directory"):
        save_sidenet(tiny_model, ".")


# -- checksums --------------------------------------------------------------------------------------


def flip_data_bytes(path: Path, count: int = 1000) -> None:
    """Invert ``count`` bytes of tensor data, after the safetensors header (which still parses)."""
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    assert len(raw) - start >= count
    for i in range(start, start + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_flipped_weight_bytes_are_detected(saved: tuple[AdaptiveModel, Path]) -> None:
    model, folder = saved
    flip_data_bytes(folder / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="sha256") as info:
        load_sidenet(model.split.mainnet, folder)
    assert str(folder) in str(info.value)


def test_flipped_or_missing_reference_is_detected(saved: tuple[AdaptiveModel, Path]) -> None:
    model, folder = saved
    reference = folder / REFERENCE_NAME
    good = reference.read_bytes()
    flip_data_bytes(reference, 100)
    with pytest.raises(CheckpointError, match="sha256"):
        load_sidenet(model.split.mainnet, folder)
    reference.unlink()
    with pytest.raises(CheckpointError, match=f"no {REFERENCE_NAME}"):
        load_sidenet(model.split.mainnet, folder)
    reference.write_bytes(good)
    assert load_sidenet(model.split.mainnet, folder).reference_confidence is not None


def test_reference_file_not_in_the_config_is_refused(tiny_model: AdaptiveModel, tmp_path: Path) -> None:
    folder = save_sidenet(tiny_model, tmp_path / "plain")
    tiny_model.set_reference([0.5, 0.7])
    other = save_sidenet(tiny_model, tmp_path / "other")
    (folder / REFERENCE_NAME).write_bytes((other / REFERENCE_NAME).read_bytes())
    with pytest.raises(CheckpointError, match="not part of"):
        load_sidenet(tiny_model.split.mainnet, folder)


def test_tap_edited_to_a_layer_of_the_same_shape_is_detected(saved: tuple[AdaptiveModel, Path]) -> None:
    """The stem and layer1 of the tiny ResNet both give 8x16x16 maps: only the checksum can tell."""
    model, folder = saved
    write_config(folder, {**read_config(folder), "tap": "stem"})
    with pytest.raises(CheckpointError, match="edited") as info:
        load_sidenet(model.split.mainnet, folder)
    assert "tap" in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("hidden", 16),
        ("pool_size", 1),
        ("split_options", {"x": 1}),
        ("mainnet_fingerprint", ""),
        ("feature_shape", [8, 16, 15]),
        ("num_classes", 5),
        ("input_shape", [1, 8, 8]),
        ("weights_sha256", "0" * 64),
    ],
)
def test_structural_edits_are_detected(saved: tuple[AdaptiveModel, Path], key: str, value: Any) -> None:
    model, folder = saved
    write_config(folder, {**read_config(folder), key: value})
    with pytest.raises(CheckpointError, match="edited"):
        load_sidenet(model.split.mainnet, folder)


def test_exit_rule_and_metadata_may_be_edited_by_hand(saved: tuple[AdaptiveModel, Path]) -> None:
    model, folder = saved
    data = read_config(folder)
    write_config(folder, {**data, "threshold": 0.75, "temperature": 2.0, "policy": "margin", "metadata": {"a": 1}})
    loaded = load_sidenet(model.split.mainnet, folder)
    assert (loaded.threshold, loaded.temperature, loaded.policy_kind) == (0.75, 2.0, "margin")
    assert loaded.history_ == []


def test_feature_shape_at_the_tap_is_checked(saved: tuple[AdaptiveModel, Path]) -> None:
    """A consistent config whose tap reads other features than the SideNet was built for is refused on
    load, not at the first forward."""
    model, folder = saved
    write_config(folder, resealed({**read_config(folder), "tap": "layer2"}))  # 16x8x8 features there
    with pytest.raises(CheckpointError, match=r"feature shape \(16, 8, 8\)") as info:
        load_sidenet(model.split.mainnet, folder)
    assert "[8, 16, 16]" in str(info.value)


def test_feature_shape_of_another_mainnet_is_checked(saved: tuple[AdaptiveModel, Path]) -> None:
    """With the fingerprint check off, a MainNet with other tap features still cannot load the SideNet."""
    from sidenet.models.cifar_resnet import cifar_resnet

    model, folder = saved
    wider = cifar_resnet(8, num_classes=4, in_channels=1, width=16).eval()
    with pytest.raises(CheckpointError, match="feature shape"):
        load_sidenet(wider, folder, check_fingerprint=False)


def test_hand_built_model_without_input_shape_still_saves_and_loads(tiny_model: AdaptiveModel, tmp_path: Path) -> None:
    """An AdaptiveModel built without attach() has no known input shape: stored as null, checks skipped."""
    bare = AdaptiveModel(tiny_model.split, tiny_model.sidenet)
    folder = save_sidenet(bare, tmp_path / "bare")
    assert read_config(folder)["input_shape"] is None
    assert load_sidenet(tiny_model.split.mainnet, folder).tap == "layer1"


# -- required keys and their types ------------------------------------------------------------------


@pytest.mark.parametrize("key", REQUIRED)
def test_every_key_is_required(saved: tuple[AdaptiveModel, Path], key: str) -> None:
    model, folder = saved
    data = read_config(folder)
    del data[key]
    write_config(folder, data)
    with pytest.raises(CheckpointError, match=f"lacks the keys.*'{key}'"):
        load_sidenet(model.split.mainnet, folder)


def test_metadata_may_be_missing(saved: tuple[AdaptiveModel, Path]) -> None:
    model, folder = saved
    data = read_config(folder)
    del data["metadata"]
    write_config(folder, data)
    assert load_sidenet(model.split.mainnet, folder).history_ == []


MALFORMED = [
    ("hidden", "abc"),
    ("hidden", 0),
    ("hidden", True),
    ("hidden", 2.5),
    ("feature_shape", 5),
    ("feature_shape", [8, "16", 16]),
    ("feature_shape", []),
    ("feature_shape", [8, 0, 16]),
    ("num_classes", None),
    ("num_classes", 1),
    ("split_options", []),
    ("split_options", "features=mean"),
    ("threshold", "0.5"),
    ("threshold", 1.5),
    ("threshold", True),
    ("temperature", -1),
    ("temperature", "1"),
    ("policy", 3),
    ("policy", "vote"),
    ("tap", [1]),
    ("tap", None),
    ("tap", True),
    ("pool_size", None),
    ("mainnet_fingerprint", 5),
    ("mainnet_fingerprint", "abc"),
    ("mainnet_class", None),
    ("format_version", "2"),
    ("format_version", 0),
    ("metadata", []),
    ("weights_sha256", "xyz"),
    ("weights_sha256", 12),
    ("reference_sha256", "A" * 64),
    ("structure_sha256", ["a"]),
    ("input_shape", "1,16,16"),
    ("input_shape", [1, -16, 16]),
    ("input_dtype", "float99"),
    ("input_dtype", 32),
]


@pytest.mark.parametrize(("key", "value"), MALFORMED)
def test_malformed_values_name_the_key(saved: tuple[AdaptiveModel, Path], key: str, value: Any) -> None:
    model, folder = saved
    data = read_config(folder)
    write_config(folder, {**data, key: value})
    with pytest.raises(CheckpointError, match=key) as info:
        load_sidenet(model.split.mainnet, folder)
    assert str(folder) in str(info.value)


def base_config_text() -> str:
    config = SideNetConfig(
        tap="layer1",
        feature_shape=[8, 16, 16],
        num_classes=4,
        input_shape=[1, 16, 16],
        input_dtype="float32",
        mainnet_fingerprint="ab" * 32,
        mainnet_class="CifarResNet",
        weights_sha256="cd" * 32,
    )
    return dataclasses.replace(config, structure_sha256=config.structure_digest()).to_json()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from([*REQUIRED, "metadata", "unknown"]), value=JSON)
def test_any_json_value_loads_or_raises_checkpoint_error(key: str, value: Any) -> None:
    data = json.loads(base_config_text())
    data[key] = value
    try:
        config = SideNetConfig.from_json(json.dumps(data))
    except CheckpointError as exc:
        assert key in str(exc) or "edited" in str(exc)
        return
    assert isinstance(config.feature_shape, list) and isinstance(config.num_classes, int)


def test_format_1_folder_of_the_previous_release_loads(saved: tuple[AdaptiveModel, Path], images) -> None:
    """Format 1 stored no checksums and no input shape: such folders still load (without those checks),
    but every key that format had is required."""
    model, folder = saved
    (folder / REFERENCE_NAME).unlink()
    data = read_config(folder)
    for key in ("input_shape", "input_dtype", "weights_sha256", "reference_sha256", "structure_sha256"):
        del data[key]
    write_config(folder, {**data, "format_version": 1})
    loaded = load_sidenet(model.split.mainnet, folder)
    assert_outputs_equal(loaded, model, images)
    del data["policy"]
    write_config(folder, {**data, "format_version": 1})
    with pytest.raises(CheckpointError, match="lacks the keys.*'policy'"):
        load_sidenet(model.split.mainnet, folder)


def test_checksums_are_of_the_file_bytes(saved: tuple[AdaptiveModel, Path]) -> None:
    _, folder = saved
    data = read_config(folder)
    assert data["weights_sha256"] == hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert data["reference_sha256"] == hashlib.sha256((folder / REFERENCE_NAME).read_bytes()).hexdigest()
    assert data["input_shape"] == [1, 16, 16] and data["input_dtype"] == "float32"
    assert SideNetConfig.from_json(json.dumps(data)).structure_digest() == data["structure_sha256"]
