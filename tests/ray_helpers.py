"""What the Ray tests share: one local Ray instance for the whole session (2 CPUs, loopback only, no
dashboard), an HTTP client on loopback, and a tiny routed model that Ray replicas and actors rebuild.

Ray starts once (about 4 s) and is shut down when the interpreter exits; a module that starts Serve
shuts Serve down when it is done. Where Ray cannot start, the tests are skipped saying why.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
from typing import Any

import numpy as np
import pytest
import torch

from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images, threshold_between

# Where the session's Ray exports its metrics in Prometheus format (set by start_ray).
METRICS_PORT: dict[str, int] = {}


def start_ray() -> Any:
    """The session's Ray (started on first use), or a skip with the reason Ray cannot start."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'sidenet[serve]')")
    if ray.is_initialized():
        return ray
    METRICS_PORT["port"] = free_port()
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            _metrics_export_port=METRICS_PORT["port"],
            _node_ip_address="127.0.0.1",
        )
    except Exception as exc:  # any failure to start is a reason to skip, reported as such
        pytest.skip(f"Ray cannot start on this machine: {type(exc).__name__}: {exc}")
    return ray


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_routed_model(quantile: float = 0.5) -> Any:
    """The tests' tiny routed model (built the same way in every process) with a threshold at which
    about ``quantile`` of :func:`sample_images` continue, strictly between two samples' scores."""
    import sidenet

    model = sidenet.attach(build_tiny_mainnet(), "layer1", input_shape=IMAGE_SHAPE, hidden=32, pool_size=2, seed=0)
    with torch.no_grad():
        scores = model.front_pass(sample_images(), "side").confidence
    model.threshold = threshold_between(scores, quantile)
    return model.eval()


def sample_images(n: int = 300) -> torch.Tensor:
    """The images the tests send (1x16x16, float: model inputs as they are)."""
    return make_images(n, seed=7)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _request(port: int, method: str, path: str, timeout: float, body: bytes | None = None, headers=None) -> tuple:
    """One HTTP request on loopback; (status, decoded JSON body, or the body as text when it is not JSON)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        payload = response.read()
        try:
            return response.status, json.loads(payload)
        except json.JSONDecodeError:
            return response.status, payload.decode(errors="replace")
    finally:
        connection.close()


def post(port: int, body: bytes, content_type: str | None, path: str = "/", timeout: float = 30.0) -> tuple[int, Any]:
    """POST on loopback; (status, decoded JSON body)."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    return _request(port, "POST", path, timeout, body, headers)


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, Any]:
    """GET on loopback; (status, decoded JSON body)."""
    return _request(port, "GET", path, timeout)
