"""The config as the one source of truth (as peft's PeftConfig): attach takes it, the model keeps it,
saving writes it with the live exit rule, loading builds from it; and the errors' common base."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

import sidenet
from helpers import IMAGE_SHAPE, NUM_CLASSES, build_tiny_mainnet, make_images
from sidenet import AdaptiveModel, ExitPolicy, SideNetConfig, load_sidenet, save_sidenet
from sidenet.config import CONFIG_NAME, SAVED, SETTINGS

ROOT = Path(__file__).resolve().parents[1]


def test_settings_are_the_config_fields_a_user_chooses() -> None:
    roles = {f.name: f.metadata["role"] for f in dataclasses.fields(SideNetConfig)}
    assert set(SETTINGS) == {
        "num_classes",
        "split_options",
        "hidden",
        "pool_size",
        "threshold",
        "temperature",
        "policy",
        "metadata",
    }
    assert {name for name, role in roles.items() if role == SAVED} == {
        "mainnet_fingerprint",
        "weights_sha256",
        "reference_sha256",
        "structure_sha256",
        "format_version",
    }


def test_attach_keeps_its_settings_in_model_config(tiny_mainnet: nn.Module) -> None:
    model = sidenet.attach(
        tiny_mainnet,
        "layer1",
        input_shape=IMAGE_SHAPE,
        hidden=8,
        pool_size=2,
        threshold=0.7,
        metadata={"data": "separable"},
    )
    config = model.config
    assert (config.tap, config.hidden, config.pool_size, config.threshold) == ("layer1", 8, 2, 0.7)
    assert (config.feature_shape, config.num_classes) == ([8, 16, 16], NUM_CLASSES)
    assert (config.input_shape, config.input_dtype, config.mainnet_class) == ([1, 16, 16], "float32", "CifarResNet")
    assert config.metadata == {"data": "separable"}
    assert config.weights_sha256 is None and config.mainnet_fingerprint == ""  # written by saving only
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hidden = 3  # type: ignore[misc]


def test_attach_takes_a_config_and_keywords_over_it(tiny_mainnet: nn.Module) -> None:
    base = SideNetConfig(tap="layer2", hidden=8, pool_size=3, threshold=0.6, input_shape=list(IMAGE_SHAPE))
    model = sidenet.attach(tiny_mainnet, config=base)
    assert (model.tap, model.sidenet.hidden, model.sidenet.pool_size, model.threshold) == ("layer2", 8, 3, 0.6)
    keywords = sidenet.attach(tiny_mainnet, "layer2", input_shape=IMAGE_SHAPE, hidden=8, pool_size=3, threshold=0.6)
    assert model.config == keywords.config
    assert torch.equal(model.sidenet.mlp[0].weight, keywords.sidenet.mlp[0].weight)
    # Another model's config reproduces it, measured fields included; keywords and tap win over it.
    again = sidenet.attach(tiny_mainnet, config=model.config)
    assert again.config == model.config
    moved = sidenet.attach(tiny_mainnet, "stem", config=model.config, hidden=4, threshold=0.2)
    assert (moved.tap, moved.sidenet.hidden, moved.threshold, moved.sidenet.pool_size) == ("stem", 4, 0.2, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"hiden": 8}, "hiden"), ({"feature_shape": [1]}, "feature_shape"), ({"config": {"tap": "layer1"}}, "config")],
)
def test_attach_refuses_what_is_not_a_setting(tiny_mainnet: nn.Module, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sidenet.attach(tiny_mainnet, "layer1", input_shape=IMAGE_SHAPE, **kwargs)


def test_model_config_follows_the_live_exit_rule(tiny_model: AdaptiveModel) -> None:
    tiny_model.threshold, tiny_model.temperature, tiny_model.policy_kind = 0.4, 2.0, "margin"
    config = tiny_model.config
    assert (config.threshold, config.temperature, config.policy) == (0.4, 2.0, "margin")
    assert config.exit_rule() == tiny_model.policy


def test_saved_config_is_model_config_plus_checksums(tiny_model: AdaptiveModel, tmp_path: Path) -> None:
    tiny_model.threshold = 0.3
    folder = save_sidenet(tiny_model, tmp_path / "saved", metadata={"note": "x"})
    saved = SideNetConfig.load(folder)
    unsaved = dataclasses.replace(saved.unsaved(), metadata={k: v for k, v in saved.metadata.items() if k != "history"})
    assert unsaved == dataclasses.replace(tiny_model.config, metadata={"note": "x"})
    assert saved.weights_sha256 and saved.structure_sha256 and saved.mainnet_fingerprint
    loaded = load_sidenet(tiny_model.split.mainnet, folder)
    assert loaded.config == unsaved  # the loaded model keeps the saved settings and metadata
    # Saving the loaded model again keeps its metadata and writes the same config.
    again = save_sidenet(loaded, tmp_path / "again")
    assert json.loads((again / CONFIG_NAME).read_text()) == json.loads((folder / CONFIG_NAME).read_text())


def test_hand_built_model_reads_its_config_off_its_parts(tiny_model: AdaptiveModel) -> None:
    bare = AdaptiveModel(tiny_model.split, tiny_model.sidenet, threshold=0.5)
    assert bare.config == dataclasses.replace(tiny_model.config, threshold=0.5, input_shape=None, input_dtype=None)
    from_config = AdaptiveModel(tiny_model.split, tiny_model.sidenet, config=tiny_model.config)
    assert from_config.config == tiny_model.config
    warmer = AdaptiveModel(tiny_model.split, tiny_model.sidenet, temperature=3.0, config=tiny_model.config)
    assert (warmer.temperature, warmer.threshold) == (3.0, tiny_model.threshold)


@pytest.mark.parametrize(
    ("field", "value"), [("hidden", 7), ("tap", "layer2"), ("num_classes", 9), ("feature_shape", [1, 2, 3])]
)
def test_a_config_that_contradicts_the_parts_is_refused(tiny_model: AdaptiveModel, field: str, value: object) -> None:
    wrong = dataclasses.replace(tiny_model.config, **{field: value})
    with pytest.raises(ValueError, match=field):
        AdaptiveModel(tiny_model.split, tiny_model.sidenet, config=wrong)


def test_none_is_no_threshold(tiny_model: AdaptiveModel) -> None:
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveModel(tiny_model.split, tiny_model.sidenet, threshold=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ExitPolicy"):
        tiny_model.policy = "margin"  # type: ignore[assignment]
    tiny_model.policy = ExitPolicy(0.2, kind="entropy")
    assert (tiny_model.threshold, tiny_model.policy_kind) == (0.2, "entropy")


# -- errors ---------------------------------------------------------------------------------------------
ERRORS = [
    "CheckpointError",
    "ClassCountMismatchError",
    "FrozenExitPolicyError",
    "MainNetMismatchError",
    "SplitMismatchError",
    "TapError",
    "UnsupportedMainNetError",
]


@pytest.mark.parametrize("name", ERRORS)
def test_every_error_is_a_sidenet_error_and_a_value_error(name: str) -> None:
    error = getattr(sidenet, name)
    assert issubclass(error, sidenet.SidenetError) and issubclass(error, ValueError)
    assert getattr(sidenet.errors, name) is error


def test_errors_keep_their_second_bases_and_old_homes() -> None:
    assert issubclass(sidenet.CheckpointError, FileNotFoundError)
    assert issubclass(sidenet.UnsupportedMainNetError, TypeError)
    assert issubclass(sidenet.FrozenExitPolicyError, dataclasses.FrozenInstanceError)
    from sidenet.attach import CheckpointError, MainNetMismatchError, SplitMismatchError, load_sidenet, save_sidenet
    from sidenet.config import CheckpointError as config_error
    from sidenet.routing import ClassCountMismatchError  # noqa: F401 - importable where it lived
    from sidenet.splits import TapError, UnsupportedMainNetError

    assert CheckpointError is config_error is sidenet.CheckpointError
    assert (MainNetMismatchError, SplitMismatchError) == (sidenet.MainNetMismatchError, sidenet.SplitMismatchError)
    assert (TapError, UnsupportedMainNetError) == (sidenet.TapError, sidenet.UnsupportedMainNetError)
    assert (load_sidenet, save_sidenet) == (sidenet.load_sidenet, sidenet.save_sidenet)


def test_one_catch_for_sidenet_errors(tiny_mainnet: nn.Module) -> None:
    with pytest.raises(sidenet.SidenetError):
        sidenet.attach(tiny_mainnet, "layer9", input_shape=IMAGE_SHAPE)
    with pytest.raises(sidenet.SidenetError):
        sidenet.split_mainnet(object(), "layer1")  # type: ignore[arg-type]


# -- the public API and the version -----------------------------------------------------------------------
def test_public_api_is_exported_once() -> None:
    assert len(sidenet.__all__) == len(set(sidenet.__all__))
    assert all(hasattr(sidenet, name) for name in sidenet.__all__)


def test_submodules_are_reached_from_the_package_without_being_imported_by_it() -> None:
    """``import sidenet`` then ``sidenet.calibration.calibrate(...)`` (the README's calibration example), without
    ``import sidenet`` itself loading the analysis and serving layers (a fresh interpreter: this one's tests
    import them)."""
    code = (
        "import sys, sidenet\n"
        "heavy = ['sidenet.calibration', 'sidenet.audit', 'sidenet.report', 'sidenet.cli']\n"
        "assert not any(name in sys.modules for name in heavy), [n for n in heavy if n in sys.modules]\n"
        "assert callable(sidenet.calibration.calibrate) and sidenet.audit.LiveAudit\n"
        "assert callable(sidenet.models.cifar_resnet)\n"
        "try:\n"
        "    sidenet.no_such_module\n"
        "except AttributeError as exc:\n"
        "    assert 'no_such_module' in str(exc)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "assert not hasattr(sidenet, '__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_version_is_written_once() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sidenet.__version__"}
    assert isinstance(sidenet.__version__, str) and sidenet.__version__.count(".") == 2


def test_a_loaded_model_routes_like_the_saved_one(tmp_path: Path) -> None:
    mainnet = build_tiny_mainnet()
    model = sidenet.attach(mainnet, "layer1", input_shape=IMAGE_SHAPE, hidden=8, threshold=0.5)
    loaded = load_sidenet(mainnet, save_sidenet(model, tmp_path / "s"))
    x = make_images(6)
    with torch.no_grad():
        assert torch.equal(loaded(x).exited, model(x).exited)
