"""Ray Data batch inference on a local Ray (2 CPUs): ``classify_dataset`` on an actor pool gives the
routed model's answers row by row (pooled across each actor's model batches), and ``sidenet classify
--ray`` writes the same parquet file as the run without Ray."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ray_helpers import start_ray, tiny_routed_model

pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (pip install 'sidenet[serve]')")


def png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(16, 16), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def decoded(seeds: list[int]) -> torch.Tensor:
    pictures = np.stack([np.random.default_rng(s).integers(0, 256, size=(16, 16), dtype=np.uint8) for s in seeds])
    return torch.from_numpy(pictures.astype(np.float32) / 255)[:, None]


@pytest.fixture(scope="module")
def ray_and_model() -> tuple[Any, Any]:
    ray = start_ray()
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'sidenet[serve]')")
    model = tiny_routed_model()
    with torch.no_grad():  # the threshold halfway through these pictures' scores
        from helpers import threshold_between

        model.threshold = threshold_between(model.front_pass(decoded(list(range(80))), "side").confidence, 0.5)
    return ray, model


def test_classify_dataset_equals_the_model_row_by_row(ray_and_model: Any) -> None:
    import ray.data

    from sidenet.integrations import ImageInputs, classify_dataset

    _, model = ray_and_model
    rows = [{"id": i, "image": png(i)} for i in range(80)]
    dataset = ray.data.from_items(rows, override_num_blocks=4)
    out = classify_dataset(dataset, model, ImageInputs((1, 16, 16)), concurrency=2, batch_size=20, model_batch=8)
    got = sorted(out.take_all(), key=lambda row: row["id"])
    with torch.no_grad():
        expected = model(decoded(list(range(80))))
    assert [row["id"] for row in got] == list(range(80))
    assert [int(row["label"]) for row in got] == expected.predictions.tolist()
    assert [bool(row["exited"]) for row in got] == expected.exited.tolist()
    assert 0 < sum(bool(row["exited"]) for row in got) < 80
    np.testing.assert_allclose([row["confidence"] for row in got], expected.confidence.numpy(), atol=1e-5)
    np.testing.assert_allclose([row["flops"] for row in got], expected.flops.double().numpy())
    assert all(row["error"] == "" and "image" not in row for row in got)


def test_classify_with_ray_writes_what_the_local_run_writes(ray_and_model: Any, tmp_path: Path) -> None:
    import pyarrow as pa

    from sidenet import save_sidenet
    from sidenet.cli import app

    _, model = ray_and_model
    save_sidenet(model, tmp_path / "sidenet")
    import helpers  # the MainNet's function, named by its file: Ray's actors import it from there

    factory = f"{helpers.__file__}:build_tiny_mainnet"
    pq.write_table(pa.table({"id": list(range(50)), "image": [png(i) for i in range(50)]}), tmp_path / "in.parquet")
    runner = CliRunner()
    common = ["classify", "--input", str(tmp_path / "in.parquet"), "--sidenet", str(tmp_path / "sidenet")]
    common += ["--mainnet", factory, "--batch-size", "16", "--model-batch", "8"]
    local = runner.invoke(app, [*common, "--output", str(tmp_path / "local.parquet")])
    assert local.exit_code == 0, local.output
    remote = runner.invoke(app, [*common, "--output", str(tmp_path / "ray.parquet"), "--ray", "--concurrency", "1"])
    assert remote.exit_code == 0, remote.output
    a, b = pq.read_table(tmp_path / "local.parquet").to_pydict(), pq.read_table(tmp_path / "ray.parquet").to_pydict()
    assert a["id"] == b["id"] == list(range(50))
    assert a["label"] == b["label"] and a["exited"] == b["exited"]
    np.testing.assert_allclose(a["confidence"], b["confidence"], atol=1e-5)
    assert ray_and_model[0].is_initialized()  # the command left the caller's Ray running
