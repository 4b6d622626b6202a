"""The CLI end to end on a tiny registered task (a random CIFAR ResNet on synthetic images)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from sidenet import cli, cli_fit
from sidenet.loaders import make_loader
from sidenet.models.cifar_resnet import cifar_resnet
from sidenet.tasks import TASKS, FashionMnistTask

runner = CliRunner()


class TinyTask(FashionMnistTask):
    """Fashion-MNIST-shaped task with a fixed random MainNet and 96 synthetic images per split."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "tiny"
        torch.manual_seed(0)
        self._mainnet = cifar_resnet(8, num_classes=10, in_channels=1).eval()
        generator = torch.Generator().manual_seed(1)
        self._splits = {
            name: TensorDataset(
                torch.randn(96, 1, 28, 28, generator=generator), torch.randint(0, 10, (96,), generator=generator)
            )
            for name in ("train", "val", "test")
        }

    def mainnet(self, data_dir=None, progress=True):
        return self._mainnet

    def loaders(self, data_dir=None, batch_size=None):
        return {name: make_loader(ds, batch_size or 32) for name, ds in self._splits.items()}


@pytest.fixture()
def tiny_task(monkeypatch: pytest.MonkeyPatch) -> TinyTask:
    task = TinyTask()
    monkeypatch.setitem(TASKS, "tiny", task)
    return task


@pytest.mark.parametrize("command", [[], ["pretrain"], ["fit"], ["sweep"], ["predict"], ["report"], ["demo"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(cli.app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_fit_sweep_predict(tiny_task: TinyTask, tmp_path: Path) -> None:
    out = tmp_path / "side"
    result = runner.invoke(
        cli.app, ["fit", "--task", "tiny", "--tap", "layer1", "--out", str(out), "--epochs", "2", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "sidenet.safetensors").is_file() and (out / "sidenet_config.json").is_file()
    config = json.loads((out / "sidenet_config.json").read_text())
    assert config["tap"] == "layer1" and config["metadata"]["task"] == "tiny"

    plot = tmp_path / "curve.png"
    result = runner.invoke(cli.app, ["sweep", "--sidenet", str(out), "--split", "val", "--plot", str(plot), "-q"])
    assert result.exit_code == 0, result.output
    assert "MainNet alone" in result.output and "saved threshold" in result.output
    assert plot.stat().st_size > 1000
    saved = json.loads(plot.with_suffix(".json").read_text())
    assert saved["num_samples"] == 96
    # No format: a PNG, under the name said; a format matplotlib does not write: refused before the sweep.
    result = runner.invoke(cli.app, ["sweep", "--sidenet", str(out), "--plot", str(tmp_path / "bare"), "-q"])
    assert result.exit_code == 0 and (tmp_path / "bare.png").is_file() and f"{tmp_path / 'bare.png'}" in result.output
    result = runner.invoke(cli.app, ["sweep", "--sidenet", str(out), "--plot", str(tmp_path / "c.txt"), "-q"])
    assert result.exit_code == 2 and "not an image format matplotlib writes" in result.output
    assert "MainNet alone" not in result.output  # refused before sweeping

    images = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((40, 30), 40 * i, dtype=np.uint8)).save(path)
        images.append(str(path))
    result = runner.invoke(cli.app, ["predict", "--sidenet", str(out), "--threshold", "0", *images])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3 and all("answered by SideNet" in line for line in lines)


def test_predict_bad_image_and_missing_folder(tiny_task: TinyTask, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["sweep", "--sidenet", str(tmp_path / "nowhere"), "-q"])
    assert result.exit_code == 2
    assert "sidenet_config.json" in result.output

    out = tmp_path / "side"
    assert runner.invoke(cli.app, ["fit", "--task", "tiny", "--out", str(out), "--epochs", "1", "-q"]).exit_code == 0
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    result = runner.invoke(cli.app, ["predict", "--sidenet", str(out), str(bad)])
    assert result.exit_code == 2
    assert "cannot read image" in result.output


def test_fit_unknown_tap_lists_valid_taps(tiny_task: TinyTask, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["fit", "--task", "tiny", "--tap", "layer7", "--out", str(tmp_path), "-q"])
    assert result.exit_code == 2
    assert "valid taps" in result.output and "layer1.0" in result.output


def test_unknown_task(tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["fit", "--task", "nope", "--out", str(tmp_path), "-q"])
    assert result.exit_code == 2
    assert "known tasks" in result.output


def test_fit_on_a_prefix_of_the_training_data(tiny_task: TinyTask, tmp_path: Path) -> None:
    out = tmp_path / "side"
    args = ["fit", "--task", "tiny", "--out", str(out), "--epochs", "1", "-q"]
    assert runner.invoke(cli.app, [*args, "--max-train-samples", "10"]).exit_code == 0
    assert runner.invoke(cli.app, [*args, "--max-train-samples", "0"]).exit_code == 2


def test_fit_chooses_the_threshold_on_a_prefix_of_validation(
    tiny_task: TinyTask, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    swept: list[int] = []
    real_sweep = cli_fit.sweep
    monkeypatch.setattr(
        cli_fit,
        "sweep",
        lambda model, loader, **kw: (swept.append(len(loader.dataset)), real_sweep(model, loader, **kw))[1],
    )
    args = ["fit", "--task", "tiny", "--out", str(tmp_path / "side"), "--epochs", "1", "-q"]
    assert runner.invoke(cli.app, [*args, "--max-val-samples", "20"]).exit_code == 0
    assert runner.invoke(cli.app, [*args, "--max-val-samples", "0"]).exit_code == 2
    assert swept == [20]


def test_python_dash_m_sidenet() -> None:
    # There was no sidenet/__main__.py, so ``python -m sidenet`` failed.
    result = subprocess.run([sys.executable, "-m", "sidenet", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout and "fit" in result.stdout and "sweep" in result.stdout


def test_split_options_a_mainnet_does_not_take_are_a_clean_error(
    tiny_task: TinyTask, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even past the up-front checks (a task that cannot check its taps), options the splitter rejects
    with a TypeError come out as an error message, not a traceback."""
    monkeypatch.setattr(tiny_task, "check_tap", lambda tap, split_options=None: None)
    args = ["fit", "--task", "tiny", "--tap", "layer1", "--features", "mean", "--out", str(tmp_path), "-q"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 2, result.output
    assert "error: split options {'features': 'mean'} do not apply to this MainNet" in result.output


def test_version() -> None:
    import sidenet

    result = runner.invoke(cli.app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith(f"sidenet {sidenet.__version__} (torch ")
