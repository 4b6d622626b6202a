"""``sidenet fit --taps``: a cascade fitted, chosen on validation and saved by the CLI, then read back by
``sweep`` and ``predict``; ``report`` reads it (tests/test_report_cascade.py); bad ``--taps`` fail before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.test_cli import TinyTask, tiny_task  # noqa: F401 (the fixture)
from typer.testing import CliRunner

from sidenet import PartSeconds, cli, load_sidenet
from sidenet.models.cifar_resnet import cifar_resnet
from sidenet.splits import TapError, candidate_taps, split_mainnet

runner = CliRunner()


def test_candidate_taps_are_one_per_depth_shallowest_first() -> None:
    net = cifar_resnet(8, num_classes=10, in_channels=1)
    taps = candidate_taps(split_mainnet(net, "layer1"))
    assert taps[0] == "stem" and len(taps) == 4  # stem and ResNet-8's three blocks, no aliases twice
    depths = [split_mainnet(net, tap).tap_depth() for tap in taps]
    assert depths == sorted(set(depths))
    assert candidate_taps(split_mainnet(torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(4))), 1)) == [
        1,
        2,
        3,
    ]


def test_candidate_taps_refuse_a_split_that_cannot_hold_a_cascade() -> None:
    from sidenet import CallableSplit

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with pytest.raises(TapError, match="give the taps yourself"):
        candidate_taps(CallableSplit(trunk=net[:1], rest=net[1:], mainnet=net))


def test_fit_taps_auto_saves_the_chosen_cascade(tiny_task: TinyTask, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "cascade"
    # A generous drop so that the random SideNets of the tiny task are worth keeping.
    args = ["fit", "--task", "tiny", "--taps", "auto", "--out", str(out), "--epochs", "2", "--max-drop", "0.5", "-q"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "sidenet_config.json").read_text())
    choice = config["metadata"]["threshold_choice"]
    assert choice["candidate_taps"] == ["stem", "layer1", "layer2", "layer3"]
    assert set(choice["taps"]) <= set(choice["candidate_taps"]) and choice["taps"]
    assert len(choice["thresholds"]) == len(choice["taps"]) == len(choice["temperatures"])
    assert choice["accuracy_drop"] <= 0.5 + 1e-9
    model = load_sidenet(tiny_task.mainnet(), out)
    assert [str(tap) for tap in model.taps] == choice["taps"]
    assert list(model.thresholds) == pytest.approx(choice["thresholds"])
    assert (out / "cascade.json").is_file() == (len(choice["taps"]) > 1)

    result = runner.invoke(cli.app, ["sweep", "--sidenet", str(out), "--split", "val", "-q"])
    assert result.exit_code == 0, result.output
    assert "saved threshold" in result.output and "MainNet alone" in result.output

    image = tmp_path / "img.png"
    Image.fromarray(np.full((28, 28), 90, dtype=np.uint8)).save(image)
    result = runner.invoke(cli.app, ["predict", "--sidenet", str(out), "--threshold", "0", str(image)])
    assert result.exit_code == 0, result.output
    assert "answered by SideNet" in result.output


def test_fit_taps_priced_in_time(tiny_task: TinyTask, tmp_path: Path) -> None:  # noqa: F811
    """``--cost time``: every part timed on a validation batch and the taps chosen for the least time; the
    saved choice says so and keeps the timing (each part's seconds and share of the MainNet's)."""
    out = tmp_path / "timed"
    args = ["fit", "--task", "tiny", "--taps", "stem,layer2", "--out", str(out), "--epochs", "2", "--max-drop", "0.5"]
    result = runner.invoke(cli.app, [*args, "--cost", "time", "-q"])
    assert result.exit_code == 0, result.output
    assert "time " in result.output and "of the MainNet's" in result.output
    assert "Where the time goes (each part alone, eager" in result.output  # what the choice was priced by
    choice = json.loads((out / "sidenet_config.json").read_text())["metadata"]["threshold_choice"]
    assert choice["cost"] == "time" and choice["taps"]
    timing = choice["part_seconds"]
    assert len(timing["segments"]) == 3 and len(timing["sides"]) == 2 and min(timing["segments"]) > 0
    assert sum(timing["shares"]["segments"]) == pytest.approx(1.0) and timing["device"] == "cpu"
    assert 0 < choice["relative_compute"] < 1.5  # a share of the MainNet's measured time
    assert PartSeconds.from_dict(timing).to_dict() == timing  # the saved timing reads back whole
    # Each part also timed on fewer rows, and the chosen cascade's batches forecast from those calls.
    assert timing["rows"][0] == 1 and timing["rows"][-1] == timing["batch_size"]
    assert len(timing["route_calls"]) == 2 and len(timing["segment_calls"][0]) == len(timing["rows"])
    forecast = choice["time_forecast"]
    assert forecast["batch_size"] == timing["batch_size"] and 0 < forecast["time_fraction"] < 3
    assert f"Forecast per routed batch of {timing['batch_size']}" in result.output
    # Priced in time, the point's compute is in seconds (named so) and its FLOPs fraction kept beside it.
    assert "mean_flops" not in choice and 0 < choice["mean_seconds"] < 1 and 0 < choice["flops_fraction"] <= 1.5
    assert f"FLOPs {choice['flops_fraction']:.3f}" in result.output
    # The tiny task's validation split is small: the choice says so.
    assert choice["validation_samples"] < 200 and "WARNING: chosen on only" in result.output
    # --serve-batch: the parts timed, and batches forecast, at the batch served.
    served = tmp_path / "served"
    options = [*args[:5], "--out", str(served), *args[7:], "--cost", "time", "--serve-batch", "8", "-q"]
    result = runner.invoke(cli.app, options)
    assert result.exit_code == 0, result.output
    choice = json.loads((served / "sidenet_config.json").read_text())["metadata"]["threshold_choice"]
    assert choice["part_seconds"]["batch_size"] == 8 == choice["time_forecast"]["batch_size"]
    assert choice["part_seconds"]["rows"] == [1, 2, 4, 8]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--taps", "auto,layer1"], "auto stands alone"),
        (["--taps", "stem,stem"], "names a tap twice"),
        (["--taps", "stem,,layer1"], "comma-separated"),
        (["--taps", "stem,layer9"], "valid taps"),
        (["--taps", "stem,layer1", "--tap", "layer1"], "not both"),
        (["--taps", "stem,layer1", "--cost", "watts"], "--cost must be 'flops' or 'time'"),
        (["--cost", "time"], "give --taps"),
    ],
)
def test_bad_taps_fail_before_any_work(tiny_task: TinyTask, tmp_path: Path, extra: list[str], message: str) -> None:  # noqa: F811
    result = runner.invoke(cli.app, ["fit", "--task", "tiny", "--out", str(tmp_path / "x"), *extra, "-q"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x").exists()
