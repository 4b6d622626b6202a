"""The Ray Serve deployment on a local Ray (2 CPUs, loopback): HTTP answers equal ``model(x)`` for a few
hundred concurrent requests, bad requests get a 4xx with a message and leave the replica serving,
metrics and health answer, and a replica killed mid-run is replaced with no request lost beyond those
in flight (the client retries them, as users do)."""

from __future__ import annotations

import io
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from ray_helpers import METRICS_PORT, free_port, get, npy_bytes, post, sample_images, start_ray, tiny_routed_model

APP = "tiny"


@pytest.fixture(scope="module")
def served() -> Any:
    """(port, the routed model, the images): the tiny model served by two replicas."""
    ray = start_ray()
    serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'sidenet[serve]')")
    from sidenet.integrations import ImageInputs
    from sidenet.integrations.ray_serve import ServeOptions, build_app

    port = free_port()
    model = tiny_routed_model()
    options = ServeOptions(max_batch_size=16, batch_wait_timeout_s=0.005, max_wait=3, audit_share=0.5, torch_threads=1)
    app = build_app(model, ImageInputs((1, 16, 16)), options, num_replicas=2, num_cpus=0.5, health_check_period_s=1.0)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name=APP, route_prefix="/")
    yield port, model, sample_images()
    serve.shutdown()
    assert ray.is_initialized()


def classify_all(port: int, images: torch.Tensor, clients: int = 16, retries: int = 0) -> tuple[list, int]:
    """POST every image (as .npy) from ``clients`` threads; returns the answers and the failed tries."""
    failures = [0]

    def one(i: int) -> Any:
        for _ in range(retries + 1):
            try:
                status, body = post(port, npy_bytes(images[i].numpy()), "application/x-npy", timeout=20)
            except OSError:
                status, body = 0, None
            if status == 200:
                return body
            failures[0] += 1
            time.sleep(0.2)
        raise AssertionError(f"request {i} failed {retries + 1} times (last status {status}: {body})")

    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one, range(len(images))))
    return answers, failures[0]


def assert_answers_equal_model(answers: list, model: Any, images: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(images)
    assert [a["label"] for a in answers] == expected.logits.argmax(dim=-1).tolist()
    assert [a["exited"] for a in answers] == expected.exited.tolist()
    np.testing.assert_allclose([a["confidence"] for a in answers], expected.confidence.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose([a["flops"] for a in answers], expected.flops.double().numpy(), rtol=1e-9)
    assert 0 < sum(a["exited"] for a in answers) < len(answers)  # both paths were taken


def test_a_compiled_replica_answers_as_the_model(served: Any) -> None:
    """A second app whose replica routes through compile_for_serving's stages (the eager backend: the
    buckets and stage plumbing without the compiler's minutes) answers as the model does."""
    from ray import serve

    from sidenet.integrations import ImageInputs
    from sidenet.integrations.ray_serve import ServeOptions, build_app

    port, model, images = served
    options = ServeOptions(max_batch_size=8, max_wait=2, audit_share=0.0, torch_threads=1, compile_backend="eager")
    serve.run(build_app(model, ImageInputs((1, 16, 16)), options, num_cpus=0.5), name="compiled", route_prefix="/c")
    try:
        status, health = get(port, "/c/health")
        assert status == 200 and health["compiled"] == {"front": "eager", "rest": "eager"}
        assert (health["device"], health["dtype"], health["channels_last"]) == ("cpu", "float32", False)
        answers = [post(port, npy_bytes(image.numpy()), "application/x-npy", path="/c")[1] for image in images[:48]]
        assert_answers_equal_model(answers, model, images[:48])
    finally:
        serve.delete("compiled")


def test_a_bfloat16_replica_answers_as_the_bfloat16_model(served: Any) -> None:
    """``ServeOptions(dtype="bfloat16")``: the replica casts its model (requests' batches follow it); its
    answers are the cast model's within bfloat16's rounding, and /health says the dtype."""
    import copy

    from ray import serve

    from sidenet.integrations import ImageInputs
    from sidenet.integrations.ray_serve import ServeOptions, build_app

    port, model, images = served
    options = ServeOptions(max_batch_size=8, max_wait=2, audit_share=0.0, torch_threads=1, dtype="bfloat16")
    serve.run(build_app(model, ImageInputs((1, 16, 16)), options, num_cpus=0.5), name="bf16", route_prefix="/b")
    try:
        status, health = get(port, "/b/health")
        assert status == 200 and health["dtype"] == "bfloat16"
        answers = [post(port, npy_bytes(image.numpy()), "application/x-npy", path="/b")[1] for image in images[:32]]
    finally:
        serve.delete("bf16")
    cast = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        want = cast(images[:32].to(torch.bfloat16))
    confidence = torch.tensor([a["confidence"] for a in answers])
    torch.testing.assert_close(confidence, want.confidence.float(), atol=5e-3, rtol=0)
    clear = (want.confidence.float() - cast.threshold).abs() > 5e-3  # the same exit outside rounding
    assert int(clear.sum()) >= 8
    assert torch.equal(torch.tensor([a["exited"] for a in answers])[clear], want.exited[clear])


def test_concurrent_http_answers_equal_the_model(served: Any) -> None:
    port, model, images = served
    answers, failures = classify_all(port, images)
    assert failures == 0
    assert_answers_equal_model(answers, model, images)
    assert all(a["class_name"] == str(a["label"]) for a in answers)


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (npy_bytes(np.zeros((3, 16, 16), dtype=np.float32)), "application/x-npy", 422, "wrong shape"),
        (b"\x89PNG\r\n\x1a\n not really a png", "image/png", 400, "not a readable image"),
        (b"", "image/png", 400, "empty body"),
        (b"\x00" * (2 << 20), "application/x-npy", 413, "larger than"),
        (b"hello", "text/plain", 415, "unsupported content type"),
        (b"hello", None, 415, "unsupported content type"),
        (b'{"text": "an image model"}', "application/json", 422, "JSON requests to an image model"),
        (b"{not json", "application/json", 400, "not valid JSON"),
        (npy_bytes(np.full((1, 16, 16), np.nan, dtype=np.float32)), "application/x-npy", 422, "NaN"),
    ],
)
def test_bad_requests_get_4xx_and_the_replica_keeps_serving(
    served: Any, body: bytes, content_type: str | None, status: int, message: str
) -> None:
    port, model, images = served
    got, answer = post(port, body, content_type)
    assert got == status, answer
    assert message in answer["error"]
    ok, good = post(port, npy_bytes(images[0].numpy()), "application/x-npy")
    assert ok == 200 and good["label"] == int(model(images[:1]).logits.argmax())


def test_png_and_json_requests_are_answered(served: Any) -> None:
    from PIL import Image

    port, model, _ = served
    pixels = ((np.arange(256).reshape(16, 16) * 7) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    status, answer = post(port, buffer.getvalue(), "image/png")
    assert status == 200
    expected = model(torch.from_numpy(pixels.astype(np.float32) / 255).reshape(1, 1, 16, 16))
    assert answer["label"] == int(expected.logits.argmax()) and answer["exited"] == bool(expected.exited[0])
    array = sample_images(1)[0]
    status, answer = post(port, json.dumps({"array": array.tolist()}).encode(), "application/json")
    assert status == 200 and answer["label"] == int(model(array[None]).logits.argmax())


def test_health_and_metrics(served: Any) -> None:
    port, _, _ = served
    status, health = get(port, "/health")
    assert status == 200 and health["status"] == "ok" and health["inputs"] == "image"
    classify_all(port, sample_images(40), clients=4)
    status, metrics = get(port, "/metrics")
    # One replica answers: its own figures (requests spread over two replicas).
    assert status == 200 and metrics["mode"] == "adaptive"
    assert metrics["answered"] <= metrics["requests"] and 0 <= metrics["exit_rate"] <= 1
    assert metrics["latency_ms"]["p50"] <= metrics["latency_ms"]["p95"]
    audit = metrics["audit"]
    assert 0 < audit["audited"] <= audit["samples_seen"] == metrics["answered"]
    assert audit["state"] in ("collecting", "ok", "flagged") and 0 <= audit["upper_bound"] <= 1
    assert metrics["shift"]["state"] == "no_reference"
    assert not math.isnan(metrics["rest_batch_mean"])


def test_a_killed_replica_is_replaced_and_no_request_is_lost(served: Any) -> None:
    import ray
    from ray import serve

    port, model, images = served
    actors = ray.util.list_named_actors(all_namespaces=True)
    replicas = [a["name"] for a in actors if f"SERVE_REPLICA::{APP}#" in a["name"]]
    assert len(replicas) == 2
    clients = 8
    with ThreadPoolExecutor(1) as killer:
        # Kill one replica while the requests run; requests in flight on it fail and are retried.
        killed = killer.submit(lambda: (time.sleep(0.5), ray.kill(ray.get_actor(replicas[0], namespace="serve"))))
        answers, failures = classify_all(port, images, clients=clients, retries=20)
        killed.result()
    assert_answers_equal_model(answers, model, images)
    # Every request is answered; only tries in flight on the killed replica fail (each client has one
    # in flight; a retry may meet the dead replica once more before the proxy learns it is gone).
    assert failures <= clients * 2, failures
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = serve.status().applications[APP].deployments["sidenet"]
        running = status.replica_states.get("RUNNING", 0)
        if running == 2 and status.status == "HEALTHY":
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"Serve did not restore two replicas: {status}")
    answers, failures = classify_all(port, images[:50], clients=4)
    assert failures == 0
    assert_answers_equal_model(answers, model, images[:50])


def test_metrics_are_exported_in_prometheus_format(served: Any) -> None:
    import http.client

    port, _, images = served
    classify_all(port, images[:20], clients=2)
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", METRICS_PORT["port"], timeout=5)
        try:
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        except OSError:
            text = ""
        finally:
            connection.close()
        if "sidenet_requests" in text and "sidenet_exits" in text and "sidenet_latency_ms_bucket" in text:
            break
        time.sleep(1.0)
    else:
        pytest.fail(f"no sidenet metrics exported by Ray within 60 s: {text[:500]}")
