"""``--device`` and ``--dtype`` on fit, sweep, predict, report and demo, and the loading they rest on
(:mod:`sidenet.placement`): a SideNet fitted on a bfloat16 MainNet is saved in bfloat16 and loads, by
the commands and by serving's ``SidenetSource``, onto its task's float32 MainNet cast likewise."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.test_cli import TinyTask
from typer.testing import CliRunner

from sidenet import attach, cli, load_sidenet, save_sidenet
from sidenet.errors import MainNetMismatchError
from sidenet.integrations.inputs import SidenetSource
from sidenet.placement import check_placement, fitted_dtype, load_placed
from sidenet.tasks import TASKS

runner = CliRunner()
NO_CUDA = not torch.cuda.is_available()


class FreshTinyTask(TinyTask):
    """The tiny task, its MainNet built anew for every command as a real task's is (loaded from its
    cache), so that a command casting its MainNet does not cast the next command's."""

    def mainnet(self, data_dir=None, progress=True):
        return copy.deepcopy(self._mainnet)


@pytest.fixture()
def fresh_task(monkeypatch: pytest.MonkeyPatch) -> FreshTinyTask:
    task = FreshTinyTask()
    monkeypatch.setitem(TASKS, "tiny", task)
    return task


def _fit(out: Path, *extra: str) -> None:
    args = ["fit", "--task", "tiny", "--tap", "layer1", "--out", str(out), "--epochs", "2", "--hidden", "16", "-q"]
    result = runner.invoke(cli.app, [*args, *extra])
    assert result.exit_code == 0, result.output


@pytest.fixture()
def bf16_folder(fresh_task: FreshTinyTask, tmp_path: Path) -> Path:
    out = tmp_path / "side-bf16"
    _fit(out, "--dtype", "bfloat16")
    return out


def test_fit_in_bfloat16_saves_a_bfloat16_sidenet(bf16_folder: Path, fresh_task: FreshTinyTask) -> None:
    assert fitted_dtype(bf16_folder) == torch.bfloat16
    # Fitted on the cast MainNet: its fingerprint is the cast one's, so the float32 MainNet is refused...
    with pytest.raises(MainNetMismatchError, match="cast"):
        load_sidenet(fresh_task.mainnet(), bf16_folder)
    # ...and the commands cast it first.
    model = load_placed(fresh_task.mainnet(), bf16_folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_sweep_runs_in_the_fitted_dtype_or_the_one_asked(bf16_folder: Path, tmp_path: Path) -> None:
    for extra, name in (([], "fitted"), (["--dtype", "float32"], "float32")):
        plot = tmp_path / f"curve_{name}.png"
        args = ["sweep", "--sidenet", str(bf16_folder), "--split", "val", "--plot", str(plot), "-q", *extra]
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 0, result.output
        assert "MainNet alone" in result.output
        assert json.loads(plot.with_suffix(".json").read_text())["num_samples"] == 96


def test_predict_in_bfloat16(fresh_task: FreshTinyTask, tmp_path: Path) -> None:
    out = tmp_path / "side"
    _fit(out)  # float32
    assert fitted_dtype(out) == torch.float32
    images = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (28, 28), dtype=np.uint8)).save(path)
        images.append(str(path))
    result = runner.invoke(cli.app, ["predict", *images, "--sidenet", str(out), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 3 and all("answered by" in line for line in lines)


def test_report_in_bfloat16(bf16_folder: Path, tmp_path: Path) -> None:
    args = ["report", "--sidenet", str(bf16_folder), "--out", str(tmp_path / "rep"), "--no-timing", "-q"]
    result = runner.invoke(cli.app, [*args, "--max-samples", "64", "--bins", "5"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rep" / "report.html").is_file()


def test_serving_source_loads_a_bfloat16_fitted_sidenet(bf16_folder: Path) -> None:
    # serve and classify load through SidenetSource: before, the float32 MainNet was refused.
    model = SidenetSource(sidenet=str(bf16_folder)).load()
    assert next(model.sidenet.parameters()).dtype == torch.bfloat16
    output = model(torch.randn(4, 1, 28, 28, dtype=torch.bfloat16))
    assert output.confidence.dtype == torch.float32 and output.predictions.shape == (4,)


BAD_OPTIONS = [
    (["--dtype", "float64"], "--dtype"),
    (["--dtype", "bf16"], "--dtype"),
    (["--device", "gpu0"], "--device"),
    *([(["--device", "cuda"], "no CUDA device")] if NO_CUDA else []),
]


@pytest.mark.parametrize("command", ["fit", "sweep", "predict", "report", "demo"])
@pytest.mark.parametrize(("extra", "message"), BAD_OPTIONS)
def test_bad_placement_is_refused_before_any_work(
    fresh_task: FreshTinyTask, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, extra, message: str
) -> None:
    def no_mainnet(*args, **kwargs):
        raise AssertionError("the MainNet was loaded before the options were checked")

    monkeypatch.setattr(fresh_task, "mainnet", no_mainnet)
    folder = tmp_path / "side"
    model = attach(TinyTask().mainnet(), "layer1", input_shape=(1, 28, 28), hidden=8, pool_size=2)
    save_sidenet(model, folder, metadata={"task": "tiny"})
    args = {
        "fit": ["fit", "--task", "tiny", "--tap", "layer1", "--out", str(folder)],
        "sweep": ["sweep", "--sidenet", str(folder)],
        "predict": ["predict", "x.png", "--sidenet", str(folder)],
        "report": ["report", "--sidenet", str(folder)],
        "demo": ["demo", "--out", str(tmp_path / "demo")],
    }[command]
    result = runner.invoke(cli.app, [*args, *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_check_placement_here_knows_this_machines_cuda_devices() -> None:
    check_placement("cuda", "bfloat16", here=True)
    with pytest.raises(ValueError, match="CUDA device"):
        check_placement(f"cuda:{torch.cuda.device_count()}", None, here=True)


def test_check_placement_without_here_leaves_the_device_to_where_it_runs() -> None:
    check_placement("cuda:3", "float16")  # a Ray actor's device: checked on the actor
    if NO_CUDA:
        with pytest.raises(ValueError, match="no CUDA device"):
            check_placement("cuda:3", None, here=True)
    with pytest.raises(ValueError, match="not a torch device"):
        check_placement("tpu-ish", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fitted_dtype_reads_the_saved_weights(tmp_path: Path, dtype: torch.dtype) -> None:
    mainnet = TinyTask().mainnet().to(dtype)
    save_sidenet(attach(mainnet, "layer1", input_shape=(1, 28, 28), hidden=8, pool_size=2), tmp_path / "s")
    assert fitted_dtype(tmp_path / "s") == dtype
    assert fitted_dtype(tmp_path / "missing") is None


def test_load_placed_leaves_a_mainnet_in_the_fitted_dtype_as_it_is(tmp_path: Path) -> None:
    mainnet = copy.deepcopy(TinyTask().mainnet())
    save_sidenet(attach(mainnet, "layer1", input_shape=(1, 28, 28), hidden=8, pool_size=2), tmp_path / "s")
    weight = next(mainnet.parameters())
    model = load_placed(mainnet, tmp_path / "s")
    assert next(model.split.mainnet.parameters()) is weight  # not cast, not copied
    model = load_placed(mainnet, tmp_path / "s", dtype="float16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_report_with_channels_last(bf16_folder: Path, tmp_path: Path) -> None:
    args = ["report", "--sidenet", str(bf16_folder), "--out", str(tmp_path / "rep"), "-q", "--channels-last"]
    result = runner.invoke(cli.app, [*args, "--max-samples", "64", "--bins", "5", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["timing"]["samples"] == 64


def test_channels_last_is_refused_for_a_text_task_before_loading(tmp_path: Path) -> None:
    # The sst2 task reads text: refused from the saved config's task name, before its MainNet is loaded.
    folder = tmp_path / "side"
    model = attach(TinyTask().mainnet(), "layer1", input_shape=(1, 28, 28), hidden=8, pool_size=2)
    save_sidenet(model, folder, metadata={"task": "sst2"})
    result = runner.invoke(cli.app, ["report", "--sidenet", str(folder), "--channels-last"])
    assert result.exit_code == 2 and "the sst2 MainNet has none" in result.output


def test_fit_with_channels_last_saves_the_same_kind_of_sidenet(fresh_task: FreshTinyTask, tmp_path: Path) -> None:
    # The layout changes neither the fingerprint nor the weights' format: it loads onto the plain MainNet.
    _fit(tmp_path / "cl", "--channels-last")
    model = load_sidenet(fresh_task.mainnet(), tmp_path / "cl")
    assert fitted_dtype(tmp_path / "cl") == torch.float32 and model.num_taps == 1
    result = runner.invoke(cli.app, ["fit", "--task", "sst2", "--channels-last", "--out", str(tmp_path / "text")])
    assert result.exit_code == 2 and "the sst2 MainNet has none" in result.output
