"""``sidenet classify`` without Ray: a folder of images or a parquet file in, a parquet file out, with
the same answers as the routed model; bad rows are reported in an ``error`` column, bad arguments
refused before anything is loaded. Also the request parsing shared with the Serve deployment."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images, threshold_between

pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (pip install 'sidenet[serve]')")

from sidenet import attach, save_sidenet  # noqa: E402 - after the skip
from sidenet.cli import app  # noqa: E402
from sidenet.integrations.inputs import BadInput, ImageInputs, TextInputs  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Any]:
    """(SideNet folder, the MainNet's function, the routed model) for the tiny 1x16x16 MainNet."""
    folder = tmp_path_factory.mktemp("classify")
    mainnet = build_tiny_mainnet()
    model = attach(mainnet, "layer1", input_shape=IMAGE_SHAPE, hidden=32, pool_size=2, seed=0)
    pictures = torch.from_numpy(np.stack([pixels(i) for i in range(40)]).astype(np.float32) / 255)[:, None]
    with torch.no_grad():
        model.threshold = threshold_between(model.front_pass(pictures, "side").confidence, 0.5)
    save_sidenet(model, folder / "sidenet")
    return folder / "sidenet", "helpers:build_tiny_mainnet", model.eval()


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(16, 16), dtype=np.uint8)


def png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels(seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(folder: Path, count: int) -> Path:
    """``count`` PNGs (``img00.png``, ...) of :func:`png` in ``folder``."""
    folder.mkdir()
    for i in range(count):
        (folder / f"img{i:02d}.png").write_bytes(png(i))
    return folder


def expected_for(model: Any, seeds: list[int]) -> Any:
    images = torch.from_numpy(np.stack([pixels(s) for s in seeds]).astype(np.float32) / 255)[:, None]
    with torch.no_grad():
        return model(images)


def test_a_folder_of_images_is_classified_like_the_model(saved: Any, tmp_path: Path) -> None:
    folder, mainnet, model = saved
    images = image_folder(tmp_path / "images", 40)
    out = tmp_path / "out" / "labels.parquet"
    argv = ["classify", "--input", str(images), "--output", str(out), "--sidenet", str(folder)]
    result = runner.invoke(app, [*argv, "--mainnet", mainnet, "--batch-size", "16", "--model-batch", "8"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pydict()
    assert table["path"] == [str(images / f"img{i:02d}.png") for i in range(40)]
    expected = expected_for(model, list(range(40)))
    assert table["label"] == expected.predictions.tolist()
    assert table["exited"] == expected.exited.tolist()
    assert 0 < sum(table["exited"]) < 40
    np.testing.assert_allclose(table["confidence"], expected.confidence.numpy(), atol=1e-5)
    np.testing.assert_allclose(table["flops"], expected.flops.double().numpy())
    assert set(table["error"]) == {""} and "image" not in table


def test_compiled_classification_writes_what_eager_routing_writes(saved: Any, tmp_path: Path) -> None:
    folder, mainnet, model = saved
    images = image_folder(tmp_path / "images", 40)
    argv = ["classify", "--input", str(images), "--sidenet", str(folder), "--mainnet", mainnet, "--model-batch", "8"]
    tables = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "eager"])):
        out = tmp_path / f"{name}.parquet"
        result = runner.invoke(app, [*argv, "--output", str(out), *extra])
        assert result.exit_code == 0, result.output
        tables[name] = pq.read_table(out).to_pydict()
    assert tables["compiled"]["label"] == tables["eager"]["label"]
    assert tables["compiled"]["exited"] == tables["eager"]["exited"] and 0 < sum(tables["eager"]["exited"]) < 40
    np.testing.assert_allclose(tables["compiled"]["confidence"], tables["eager"]["confidence"], atol=1e-6)
    np.testing.assert_allclose(tables["compiled"]["flops"], tables["eager"]["flops"])


def test_classification_in_bfloat16_answers_as_the_bfloat16_model(saved: Any, tmp_path: Path) -> None:
    """``--dtype bfloat16`` runs the MainNet and its SideNet in bfloat16 (the batches cast to it): the answers
    of the model cast so, within bfloat16's rounding (model batches of 8 here against one batch of 40 there),
    and not the float32 model's confidences."""
    import copy

    folder, mainnet, model = saved
    images = image_folder(tmp_path / "images", 40)
    out = tmp_path / "bf16.parquet"
    argv = ["classify", "--input", str(images), "--output", str(out), "--sidenet", str(folder), "--mainnet", mainnet]
    result = runner.invoke(app, [*argv, "--model-batch", "8", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pydict()
    cast = copy.deepcopy(model).to(torch.bfloat16)
    pictures = torch.from_numpy(np.stack([pixels(s) for s in range(40)]).astype(np.float32) / 255)[:, None]
    with torch.no_grad():
        want, full = cast(pictures.to(torch.bfloat16)), model(pictures)
    confidence = torch.tensor(table["confidence"])
    # This tiny model's confidences span 0.334-0.346; bfloat16 moves them by up to 3.3e-4 (measured).
    torch.testing.assert_close(confidence, want.confidence.float(), atol=2e-3, rtol=0)
    assert not torch.allclose(confidence, full.confidence, atol=1e-6, rtol=0)  # the float32 model's differ
    clear = (want.confidence.float() - cast.threshold).abs() > 2e-3
    assert torch.equal(torch.tensor(table["exited"])[clear], want.exited[clear]) and int(clear.sum()) >= 12
    top2 = want.logits.float().topk(2, dim=1).values
    sure = clear & (top2[:, 0] - top2[:, 1] > 0.05)  # the same exit, and no near tie between two classes
    assert torch.equal(torch.tensor(table["label"])[sure], want.predictions[sure]) and int(sure.sum()) >= 10


def test_a_parquet_file_with_bad_rows(saved: Any, tmp_path: Path) -> None:
    import pyarrow as pa

    folder, mainnet, model = saved
    cells = [png(0), b"not an image", png(1), b"", png(2)]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [10, 11, 12, 13, 14], "picture": cells}), source)
    out = tmp_path / "out.parquet"
    argv = ["classify", "--input", str(source), "--output", str(out), "--sidenet", str(folder)]
    result = runner.invoke(app, [*argv, "--mainnet", mainnet, "--column", "picture"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pydict()
    assert table["id"] == [10, 11, 12, 13, 14]
    expected = expected_for(model, [0, 1, 2]).predictions.tolist()
    assert [table["label"][i] for i in (0, 2, 4)] == expected
    assert table["label"][1] == table["label"][3] == -1
    assert "not a readable image" in table["error"][1] and "empty" in table["error"][3]
    assert "5 rows" in result.output and "2 failed (the first: the body is not a readable image" in result.output
    # Every row bad: refused (status 2), the first error named; the output written for the errors column.
    pq.write_table(pa.table({"picture": [b"not an image", b"nor this"]}), source)
    result = runner.invoke(app, [*argv, "--mainnet", mainnet, "--column", "picture"])
    assert result.exit_code == 2 and "no row of" in result.output and "not a readable image" in result.output
    assert pq.read_table(out).column("error").to_pylist()[1].startswith("the body is not a readable image")
    # The answers written over their own inputs: refused before anything is read.
    result = runner.invoke(app, [*argv[:4], str(source), *argv[5:], "--mainnet", mainnet, "--column", "picture"])
    assert result.exit_code == 2 and "is the input file" in result.output
    # A column not there: named, with the option that chooses one.
    result = runner.invoke(app, [*argv, "--mainnet", mainnet, "--column", "image"])
    assert result.exit_code == 2 and "no column 'image' in the dataset; columns: picture (name the one" in result.output


def test_pixels_stored_as_nested_lists_are_pictures_and_flat_ones_are_refused() -> None:
    """A parquet column of uint8 pixels row by row (``list<list<uint8>>``) holds pictures, not normalised
    model inputs; a flat row of pixels, which lost the picture's height and width, is refused."""
    import pyarrow as pa

    inputs = ImageInputs(IMAGE_SHAPE)
    column = pa.array([pixels(3).tolist()], type=pa.list_(pa.list_(pa.uint8()))).to_numpy(zero_copy_only=False)
    torch.testing.assert_close(inputs.from_cell(column[0]), inputs.decode_image(png(3)))
    with pytest.raises(BadInput, match=r"shape \(H, W\) or \(H, W, C\), got shape \[256\]"):
        inputs.from_cell(pixels(3).reshape(-1))
    with pytest.raises(BadInput, match="rows differ in length"):
        inputs.from_cell(np.array([np.zeros(16, np.uint8), np.zeros(15, np.uint8)], dtype=object))


def test_sixteen_bit_grey_pictures_are_scaled_not_clipped(saved: Any, tmp_path: Path) -> None:
    """A 16-bit PNG of a picture answers as its 8-bit original (Pillow's own conversion clips it to white)."""
    from PIL import Image

    _, _, model = saved
    inputs = ImageInputs(IMAGE_SHAPE)
    wide = io.BytesIO()
    Image.fromarray(pixels(3).astype(np.uint16) * 257).save(wide, format="PNG")  # 0-255 -> 0-65535
    assert Image.open(io.BytesIO(wide.getvalue())).mode.startswith("I")
    torch.testing.assert_close(inputs.decode_image(wide.getvalue()), inputs.decode_image(png(3)))
    from sidenet.tasks import get_task

    (tmp_path / "wide.png").write_bytes(wide.getvalue())
    (tmp_path / "narrow.png").write_bytes(png(3))
    task = get_task("fmnist")
    torch.testing.assert_close(
        task.read_inputs([str(tmp_path / "wide.png")]), task.read_inputs([str(tmp_path / "narrow.png")])
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--output", "out.csv"], "must be a .parquet file"),
        (["--task", "nope"], "unknown task"),
        (["--model-batch", "0"], "must be >= 1"),
        (["--mode", "fast"], "--mode must be adaptive or main"),
        (["--compile", "tensorrt"], "--compile must be one of auto, eager, inductor, cuda_graph, inductor_cuda_graph"),
        (["--dtype", "int8"], "dtype must be one of ('float32', 'bfloat16', 'float16')"),
        (["--device", "nowhere"], "device 'nowhere' is not a torch device"),
        (["--gpus", "1"], "--gpus places Ray actors: give --ray, or --device cuda"),
        (["--gpus", "-1", "--ray"], "--gpus >= 0"),
        (["--device", "cuda", "--ray"], "--device cuda with --ray: give each actor a GPU with --gpus"),
    ],
)
def test_bad_arguments_are_refused_before_loading(saved: Any, tmp_path: Path, extra: list[str], message: str) -> None:
    folder, _, _ = saved
    argv = ["classify", "--input", str(tmp_path), "--output", str(tmp_path / "o.parquet"), "--sidenet", str(folder)]
    result = runner.invoke(app, [*argv, *extra])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_cuda_device_is_refused_where_there_is_none(saved: Any, tmp_path: Path) -> None:
    folder, _, _ = saved
    argv = ["classify", "--input", str(tmp_path), "--output", str(tmp_path / "o.parquet"), "--sidenet", str(folder)]
    result = runner.invoke(app, [*argv, "--device", "cuda"])
    assert result.exit_code == 2 and "--device cuda: no CUDA device on this machine" in result.output


def test_a_missing_sidenet_is_refused(tmp_path: Path) -> None:
    argv = ["classify", "--input", str(tmp_path), "--output", str(tmp_path / "o.parquet"), "--sidenet", str(tmp_path)]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and "no saved SideNet" in result.output


def test_image_requests_are_parsed_or_refused_with_a_status() -> None:
    inputs = ImageInputs((1, 16, 16), (0.5,), (0.25,))
    sample = inputs.parse(png(3), "image/png")
    torch.testing.assert_close(sample, (torch.from_numpy(pixels(3)).float()[None] / 255 - 0.5) / 0.25)
    array = make_images(1)[0]
    torch.testing.assert_close(inputs.parse(json.dumps({"array": array.tolist()}).encode(), "application/json"), array)
    torch.testing.assert_close(inputs.from_cell(pixels(3)), sample)
    for body, kind, status in [
        (b"garbage", "image/jpeg", 400),
        (b"{}", "application/json", 422),
        (b"x", "text/csv", 415),
        (json.dumps({"array": [[1.0, 2.0]]}).encode(), "application/json", 422),
        (json.dumps({"array": "ab"}).encode(), "application/json", 422),
    ]:
        with pytest.raises(BadInput) as caught:
            inputs.parse(body, kind)
        assert caught.value.status == status


def test_text_requests_are_parsed_or_refused_with_a_status() -> None:
    inputs = TextInputs("all-MiniLM-L6-v2", max_chars=20)
    assert inputs.parse(b'{"text": "a fine film"}', "application/json; charset=utf-8") == "a fine film"
    assert inputs.parse(b"dull", "text/plain") == "dull"
    assert inputs.from_cell(b"witty") == "witty"
    for body, kind, status in [
        (b'{"text": ""}', "application/json", 422),
        (b'{"text": 3}', "application/json", 422),
        (b'{"txt": "x"}', "application/json", 422),
        (b'{"text": "' + b"x" * 30 + b'"}', "application/json", 413),
        (b"\xff\xfe", "text/plain", 400),
        (b"x", "image/png", 415),
    ]:
        with pytest.raises(BadInput) as caught:
            inputs.parse(body, kind)
        assert caught.value.status == status


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give --sidenet FOLDER (and the flags) or --config FILE"),
        (["--sidenet", "nowhere"], "no saved SideNet in nowhere"),
        (["--config", "nowhere.yaml"], "no config file"),
        (["--replicas", "0"], "--replicas and --max-batch-size must be >= 1"),
    ],
)
def test_serve_refuses_bad_arguments_before_starting_ray(extra: list[str], message: str) -> None:
    result = runner.invoke(app, ["serve", *extra])
    assert result.exit_code == 2 and message in result.output


def test_serve_refuses_a_busy_or_impossible_port_before_starting_ray() -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:  # a port some other server listens on
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["serve", "--sidenet", "nowhere", "--port", str(port)])
    assert result.exit_code == 2 and f"--port {port}: cannot listen there" in result.output
    result = runner.invoke(app, ["serve", "--sidenet", "nowhere", "--port", "99999"])
    assert result.exit_code == 2 and "--port must lie in 1-65535, got 99999" in result.output


def test_serve_refuses_bad_options_and_configs(saved: Any, tmp_path: Path) -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'sidenet[serve]')")
    folder, mainnet, _ = saved
    result = runner.invoke(app, ["serve", "--sidenet", str(folder), "--mainnet", mainnet, "--max-wait", "-1"])
    assert result.exit_code == 2 and "max_wait must be >= 0" in result.output
    result = runner.invoke(app, ["serve", "--sidenet", str(folder), "--mainnet", mainnet, "--compile", "tensorrt"])
    assert result.exit_code == 2 and "compile_backend must be one of" in result.output
    result = runner.invoke(app, ["serve", "--sidenet", str(folder), "--mainnet", mainnet, "--dtype", "half"])
    assert result.exit_code == 2 and "dtype must be one of" in result.output
    config = tmp_path / "serve.yaml"
    config.write_text(
        "applications:\n  - import_path: sidenet.integrations.ray_serve:app_builder\n"
        f"    args: {{sidenet: {folder}, mainnet: {mainnet}, max_batch: 3}}\n"
    )
    result = runner.invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == 2 and "unknown args: ['max_batch']" in result.output


def test_the_audit_tolerance_comes_from_the_threshold_choice(saved: Any, tmp_path: Path) -> None:
    from sidenet.integrations import SidenetSource

    folder, _, model = saved
    assert SidenetSource(str(folder)).tolerance() == 0.01  # nothing recorded: the default
    choices = [({"max_disagreement": 0.02, "disagreement": 0.015}, 0.02), ({"disagreement": 0.042}, 0.05)]
    for choice, expected in choices:
        save_sidenet(model, tmp_path / "s", metadata={"threshold_choice": choice})
        assert SidenetSource(str(tmp_path / "s")).tolerance() == expected


def test_a_mainnet_built_by_a_function_with_safetensors_weights(saved: Any, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder, factory, model = saved
    weights = tmp_path / "mainnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.split.mainnet.state_dict().items()}, weights)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        (images / f"img{i:02d}.png").write_bytes(png(i))
    out = tmp_path / "labels.parquet"
    argv = ["classify", "--input", str(images), "--output", str(out), "--sidenet", str(folder), "--mainnet", factory]
    result = runner.invoke(app, [*argv, "--mainnet-weights", str(weights)])
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).to_pydict()["label"] == expected_for(model, list(range(12))).predictions.tolist()
    for bad, message in (
        (["--mainnet", "build_tiny_mainnet"], "MODULE:FUNCTION"),
        (["--mainnet-weights", str(weights)], "needs --mainnet"),
    ):
        base = ["classify", "--input", str(images), "--output", str(out), "--sidenet", str(folder)]
        result = runner.invoke(app, [*base, *bad])
        assert result.exit_code == 2 and message in result.output


def test_actors_on_the_cpu_retain_freed_memory_unless_told_not_to(saved: Any) -> None:
    from sidenet.integrations import SidenetSource
    from sidenet.integrations.ray_data import RoutedClassifier

    folder, factory, _ = saved
    source = SidenetSource(str(folder), mainnet=factory)
    kept = RoutedClassifier(source, model_batch=8).cpu_memory
    assert kept.applied or "not glibc" in kept.reason
    assert RoutedClassifier(source, model_batch=8, retain_cpu_memory=False).cpu_memory.reason == (
        "retain_cpu_memory=False"
    )


def test_actors_and_replicas_place_their_model_where_told(saved: Any) -> None:
    """``dtype`` casts the MainNet and its SideNet together; a bad device or dtype is refused before the
    model is loaded (by ``RoutedClassifier`` and by ``ServeOptions``, which a Serve replica reads)."""
    from sidenet.integrations import SidenetSource
    from sidenet.integrations.options import ServeOptions, placed
    from sidenet.integrations.ray_data import RoutedClassifier

    folder, factory, model = saved
    source = SidenetSource(str(folder), mainnet=factory)
    cast = RoutedClassifier(source, model_batch=8, dtype="bfloat16").model
    assert {p.dtype for p in cast.parameters() if p.is_floating_point()} == {torch.bfloat16}
    assert {p.dtype for p in cast.sidenet.parameters()} == {torch.bfloat16}
    assert placed(model, None, None) is model
    for bad in ({"dtype": "int8"}, {"device": "nowhere"}):
        with pytest.raises(ValueError, match="dtype must be one of|is not a torch device"):
            RoutedClassifier(SidenetSource(str(folder / "absent"), mainnet=factory), **bad)
        with pytest.raises(ValueError, match="dtype must be one of|is not a torch device"):
            ServeOptions(**bad)


def _channels_last(model: torch.nn.Module) -> bool:
    convolutions = [p for p in model.parameters() if p.dim() == 4]
    return bool(convolutions) and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)


def test_classification_with_channels_last_answers_as_the_model(saved: Any, tmp_path: Path) -> None:
    """``--channels-last`` lays the MainNet's convolutions out NHWC: the same answers (the convolutions
    sum in another order: confidences within 1e-5), the actor's model so laid out, text refused."""
    from sidenet.integrations import SidenetSource
    from sidenet.integrations.ray_data import RoutedClassifier
    from sidenet.placement import placement_of

    folder, mainnet, model = saved
    images = image_folder(tmp_path / "images", 40)
    tables = {}
    for name, extra in (("contiguous", []), ("channels_last", ["--channels-last"])):
        out = tmp_path / f"{name}.parquet"
        argv = [
            "classify",
            "--input",
            str(images),
            "--output",
            str(out),
            "--sidenet",
            str(folder),
            "--mainnet",
            mainnet,
        ]
        result = runner.invoke(app, [*argv, "--model-batch", "8", *extra])
        assert result.exit_code == 0, result.output
        tables[name] = pq.read_table(out).to_pydict()
    confidence = torch.tensor(tables["contiguous"]["confidence"])
    torch.testing.assert_close(torch.tensor(tables["channels_last"]["confidence"]), confidence, atol=1e-5, rtol=0)
    clear = (confidence - model.threshold).abs() > 1e-4
    exited = {name: torch.tensor(table["exited"])[clear] for name, table in tables.items()}
    assert torch.equal(exited["channels_last"], exited["contiguous"]) and int(clear.sum()) >= 30
    laid_out = RoutedClassifier(SidenetSource(str(folder), mainnet=mainnet), model_batch=8, channels_last=True).model
    assert _channels_last(laid_out.split.mainnet) and not _channels_last(model.split.mainnet)
    assert placement_of(laid_out)["channels_last"] and not placement_of(model)["channels_last"]


def test_channels_last_is_refused_for_a_text_mainnet() -> None:
    from helpers import tiny_bert
    from sidenet import attach
    from sidenet.placement import placed

    model = attach(tiny_bert(), 1)
    with pytest.raises(ValueError, match="lays out convolutions: this model has none"):
        placed(model, None, None, channels_last=True)


def test_channels_last_by_default_only_on_cuda_and_for_convolutions() -> None:
    from helpers import build_tiny_mainnet, tiny_bert
    from sidenet import attach
    from sidenet.placement import placed

    image = attach(build_tiny_mainnet(), "layer1", input_shape=(1, 16, 16), hidden=8, pool_size=2)
    assert not _channels_last(placed(image, None, None, channels_last=None))  # on the CPU: as it is
    text = attach(tiny_bert(), 1)
    assert placed(text, None, None, channels_last=None) is text  # no convolutions: nothing to lay out
    if torch.cuda.is_available():
        assert _channels_last(placed(image, "cuda", "bfloat16", channels_last=None))
        assert not _channels_last(placed(attach(build_tiny_mainnet(), "layer1", input_shape=(1, 16, 16)), "cuda", None))
