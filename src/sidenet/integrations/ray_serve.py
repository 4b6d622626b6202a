"""A Ray Serve application that classifies with per-sample routing (install ``sidenet[serve]``).

Requests (one image or one sentence each, see :mod:`sidenet.integrations.inputs`) are batched by
``@serve.batch``; each batch is routed sample by sample by a :class:`sidenet.serving.PooledRouter`
inside the replica, so that the samples that continue wait, within bounds, for those of the next
batches and run the rest of the MainNet together. The batch handler holds Serve's batching slot only
while the model runs (so the next batch fills meanwhile, as with any batched model) and hands each
request a future; a request whose sample continues awaits it outside the slot. Its batch is answered
when its last sample is: after at most ``max_wait`` later batches, or ``flush_after_s`` seconds after
the last batch when no later one comes. The model runs on one worker thread per replica, so the event
loop keeps taking requests while it computes.

Endpoints: ``POST /`` classifies (answers ``label``, ``class_name``, ``confidence``, ``exited``,
``flops``; bad requests get a 4xx status and ``{"error": message}``), ``GET /health``, ``GET /metrics``
(JSON: requests, exit rate, p50/p95 latency, rest batch, shift check, live audit). The same figures are
exported as Ray metrics (Prometheus format, ``sidenet_*``) by Ray's metrics agent.

Use :func:`build_app` from Python (compose it into your own Serve apps, or ``serve.run`` it), or
``import_path: sidenet.integrations.ray_serve:app_builder`` with ``args`` in a Serve config file
(``serve run config.yaml``), or ``sidenet serve`` on the command line. The same application runs on a
Ray cluster unchanged: replicas and their CPUs/GPUs are deployment options.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from typing import Any

import numpy as np
import torch

try:
    from ray import serve
    from ray.serve import metrics as serve_metrics
    from starlette.requests import Request
    from starlette.responses import JSONResponse
except ImportError as exc:  # pragma: no cover - the optional extra is missing
    raise ImportError("sidenet's Ray Serve deployment needs Ray Serve: pip install 'sidenet[serve]'") from exc

from sidenet.audit import LiveAudit
from sidenet.host_memory import retain_for_cpu_model
from sidenet.integrations.inputs import BadInput, ImageInputs, SidenetSource, TextInputs, answers, compiled_on_neutral
from sidenet.integrations.options import ServeOptions, placed
from sidenet.placement import placement_of
from sidenet.serving import PooledRouter
from sidenet.training import to_mainnet

__all__ = ["ServeOptions", "SidenetDeployment", "build_app", "app_builder"]

LATENCY_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


ModelSpec = SidenetSource | torch.nn.Module | Callable[[], Any]


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None: JSON has no NaN (figures not measured yet are None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _build_model(spec: ModelSpec) -> Any:
    if isinstance(spec, SidenetSource):
        return spec.load()
    if isinstance(spec, torch.nn.Module):
        return spec.eval()
    return spec().eval()


class SidenetDeployment:
    """One replica: a routed model, its router, its audit and its metrics (see the module docstring).

    Args:
        model: a :class:`SidenetSource`, an :class:`sidenet.AdaptiveModel` (each replica unpickles
            its own copy) or a function that builds one in the replica.
        inputs: how requests become samples (:class:`ImageInputs` or :class:`TextInputs`).
        options: batching, routing and audit settings.
    """

    def __init__(self, model: ModelSpec, inputs: ImageInputs | TextInputs, options: ServeOptions) -> None:
        if options.torch_threads:
            torch.set_num_threads(options.torch_threads)
        self.options = options
        self.inputs = inputs
        self.model = _build_model(model)
        self.model = placed(self.model, options.device, options.dtype, options.channels_last)
        self.cpu_memory = retain_for_cpu_model(self.model, options.retain_cpu_memory)
        tolerance = options.tolerance
        if tolerance is None:
            tolerance = model.tolerance() if isinstance(model, SidenetSource) else 0.01
        # Each replica draws its own audited samples: one seed for all would audit the same positions
        # of every replica's stream.
        seed = secrets.randbits(31)
        self.audit = LiveAudit(options.audit_share, tolerance, seed=seed) if options.audit_share > 0 else None
        backend = options.compile_backend if options.mode == "adaptive" else None
        self.compiled = compiled_on_neutral(self.model, inputs, options.max_batch_size, backend)
        self.router = PooledRouter(
            self.model,
            rest_batch=options.rest_batch or options.max_batch_size,
            max_wait=options.max_wait,
            stages=self.compiled,
            audit=self.audit,
        )
        self._classify.set_max_batch_size(options.max_batch_size)
        self._classify.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        # One thread runs the model: the router is not thread-safe, and the event loop stays free.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidenet-model")
        self._futures: dict[int, asyncio.Future] = {}
        self._next_batch = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        self._latencies: deque[float] = deque(maxlen=4096)
        self._counts = {"requests": 0, "answered": 0, "bad_requests": 0, "exited": 0, "batches": 0}
        self._rest = {"runs": 0, "samples": 0}
        self._failures = 0
        self._last_gauges = 0.0
        self._metrics = {
            "requests": serve_metrics.Counter("sidenet_requests", "Classification requests received"),
            "bad_requests": serve_metrics.Counter("sidenet_bad_requests", "Requests refused with a 4xx status"),
            "exits": serve_metrics.Counter("sidenet_exits", "Samples answered by the SideNet"),
            "latency": serve_metrics.Histogram(
                "sidenet_latency_ms", "Replica latency of a classification", boundaries=LATENCY_BUCKETS_MS
            ),
            "exit_rate": serve_metrics.Gauge("sidenet_exit_rate", "Share of answered samples that exited"),
            "p50": serve_metrics.Gauge("sidenet_latency_p50_ms", "Median replica latency (recent requests)"),
            "p95": serve_metrics.Gauge("sidenet_latency_p95_ms", "95th percentile replica latency (recent requests)"),
            "rest_batch": serve_metrics.Gauge("sidenet_rest_batch_mean", "Continuing samples per run of the rest"),
            "shift": serve_metrics.Gauge("sidenet_shift_state", "Shift check: 0 ok, 1 shifted, -1 not available"),
            "audit_bound": serve_metrics.Gauge("sidenet_audit_upper_bound", "Audit's upper bound on disagreement"),
            "audit_flagged": serve_metrics.Gauge("sidenet_audit_flagged", "1 when the audit bound exceeds tolerance"),
        }

    # -- HTTP ------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> JSONResponse:
        """Route by method and path: POST classifies, GET /health and GET /metrics report."""
        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if request.method == "GET" and path in ("health", "metrics"):
            return JSONResponse(_json_safe(self.health() if path == "health" else self.metrics()))
        if request.method != "POST":
            return self._refuse(BadInput(405, "POST one sample to classify it; GET /health or /metrics"))
        started = time.perf_counter()
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.options.max_request_bytes:
            return self._refuse(BadInput(413, f"the body is larger than {self.options.max_request_bytes} bytes"))
        body = await request.body()
        try:
            if not body:
                raise BadInput(400, "empty body: send one image or one sentence")
            if len(body) > self.options.max_request_bytes:
                raise BadInput(413, f"the body is larger than {self.options.max_request_bytes} bytes")
            sample = self.inputs.parse(body, request.headers.get("content-type"))
        except BadInput as bad:
            return self._refuse(bad)
        self._counts["requests"] += 1
        batch_answers, position = await self._classify(sample)
        answer = (await batch_answers)[position]
        elapsed = 1000 * (time.perf_counter() - started)
        self._latencies.append(elapsed)
        self._metrics["latency"].observe(elapsed)
        return JSONResponse(answer)

    def _refuse(self, bad: BadInput) -> JSONResponse:
        self._counts["bad_requests"] += 1
        self._metrics["bad_requests"].inc()
        return JSONResponse({"error": bad.message}, status_code=bad.status)

    # -- batching and routing --------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _classify(self, samples: list[Any]) -> list[tuple[asyncio.Future, int]]:
        """Route one batch; each request gets (the future of its batch's answers, its place in the batch)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._metrics["requests"].inc(len(samples))  # per batch: a Ray metric costs per call, not per count
        try:
            self._settle(await loop.run_in_executor(self._executor, self._submit, samples, future))
        except Exception:
            self._failures += 1
            raise
        self._failures = 0
        self._arm_flush(loop)
        self._update_gauges()
        return [(future, position) for position in range(len(samples))]

    def _arm_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the rest on what waits once ``flush_after_s`` pass without a new batch (restarted by each)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self.router.pending:
            self._flush_timer = loop.call_later(
                self.options.flush_after_s, lambda: asyncio.ensure_future(self._flush_now(loop))
            )

    async def _flush_now(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush_timer = None
        try:
            self._settle(await loop.run_in_executor(self._executor, self._flush))
        except Exception as exc:  # the waiting requests fail with it rather than hang
            self._failures += 1
            for future in self._futures.values():
                if not future.done():
                    future.set_exception(exc)
            self._futures.clear()

    def _submit(self, samples: list[Any], future: asyncio.Future) -> list[tuple[asyncio.Future, Any]]:
        """(model thread) Route one batch; returns the (future, output) of every batch it answered."""
        batch = to_mainnet(self.model.split, self.inputs.collate(samples))
        if self.options.mode == "main":
            return [(future, self.model(batch, mode="main"))]
        batch_id = self._next_batch
        self._next_batch += 1
        self._futures[batch_id] = future
        before = self.router.pending
        exited_before = self.model.samples_exited
        try:
            answered = self.router.submit(batch)
        except Exception:
            self._futures.pop(batch_id, None)
            raise
        continuing = len(samples) - (self.model.samples_exited - exited_before)
        self._note_rest(before + continuing - self.router.pending)
        return [(self._futures.pop(done.batch_id), done.output) for done in answered]

    def _flush(self) -> list[tuple[asyncio.Future, Any]]:
        """(model thread) Run the rest on every waiting sample."""
        before = self.router.pending
        answered = self.router.flush()
        self._note_rest(before)
        return [(self._futures.pop(done.batch_id), done.output) for done in answered]

    def _note_rest(self, finished: int) -> None:
        if finished > 0:
            self._rest["runs"] += max(1, math.ceil(finished / (self.router.rest_batch or finished)))
            self._rest["samples"] += finished

    def _settle(self, answered: list[tuple[asyncio.Future, Any]]) -> None:
        """(event loop) Hand each answered batch its answers."""
        for future, output in answered:
            exits = int(output.exited.sum())
            self._counts["answered"] += len(output.exited)
            self._counts["exited"] += exits
            self._counts["batches"] += 1
            if exits:
                self._metrics["exits"].inc(exits)
            if not future.done():
                future.set_result(answers(output, self.inputs.class_names))

    # -- health and metrics ----------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve's health check: a replica whose model failed three batches in a row is replaced."""
        if self._failures >= 3:
            raise RuntimeError(f"the model failed {self._failures} batches in a row")

    def health(self) -> dict[str, Any]:
        """Liveness and what is served."""
        return {
            "status": "ok",
            "mode": self.options.mode,
            "inputs": self.inputs.kind,
            "threshold": float(self.model.thresholds[0]),
            "thresholds": [float(value) for value in self.model.thresholds],
            "taps": [str(tap) for tap in self.model.taps],
            "pending": self.router.pending,
            "compiled": None if self.compiled is None else self.compiled.stage_backends,
            **placement_of(self.model),
        }

    def _shift(self) -> dict[str, Any]:
        if self.model.reference_confidence is None:
            return {"state": "no_reference"}
        report = self.model.shift_check()
        state = "collecting" if report.p_value != report.p_value else ("shifted" if report.shifted else "ok")
        return {"state": state, **report.to_dict()}

    def metrics(self) -> dict[str, Any]:
        """Every figure of this replica (also exported as Ray metrics, see :meth:`_update_gauges`)."""
        latencies = np.asarray(self._latencies, dtype=np.float64)
        answered = self._counts["answered"]
        p50, p95 = np.percentile(latencies, [50, 95]).tolist() if latencies.size else [math.nan, math.nan]
        return {
            **self._counts,
            "mode": self.options.mode,
            "exit_rate": self._counts["exited"] / answered if answered else math.nan,
            "latency_ms": {"p50": p50, "p95": p95, "window": int(latencies.size)},
            "rest_batch_mean": self._rest["samples"] / self._rest["runs"] if self._rest["runs"] else math.nan,
            "rest_runs": self._rest["runs"],
            "shift": self._shift() if self.options.mode == "adaptive" else {"state": "not_routed"},
            "audit": self.audit.to_dict() if self.audit is not None and self.options.mode == "adaptive" else None,
            "options": asdict(self.options),
        }

    def _update_gauges(self, every_s: float = 2.0) -> None:
        """Refresh the Ray gauges at most every ``every_s`` seconds (the shift check and the audit's
        bound cost a little; counters are updated per request)."""
        now = time.monotonic()
        if now - self._last_gauges < every_s:
            return
        self._last_gauges = now
        figures = self.metrics()
        gauges = self._metrics
        for key, value in (
            ("exit_rate", figures["exit_rate"]),
            ("p50", figures["latency_ms"]["p50"]),
            ("p95", figures["latency_ms"]["p95"]),
            ("rest_batch", figures["rest_batch_mean"]),
        ):
            if value == value:
                gauges[key].set(value)
        gauges["shift"].set({"ok": 0, "shifted": 1}.get(figures["shift"]["state"], -1))
        if figures["audit"] is not None:
            gauges["audit_bound"].set(figures["audit"]["upper_bound"])
            gauges["audit_flagged"].set(int(figures["audit"]["flagged"]))


def build_app(
    model: ModelSpec,
    inputs: ImageInputs | TextInputs,
    options: ServeOptions | None = None,
    *,
    num_replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    name: str = "sidenet",
    health_check_period_s: float = 5.0,
) -> serve.Application:
    """The Serve application of a routed model: bind it, ``serve.run`` it or compose it into your own.

    ``num_replicas``, ``num_cpus`` and ``num_gpus`` (per replica) place it on a machine or a cluster.
    """
    options = options or ServeOptions()
    deployment = serve.deployment(
        SidenetDeployment,
        name=name,
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # Requests whose samples wait in the pool are ongoing too: room for max_wait + 2 full batches.
        max_ongoing_requests=options.max_batch_size * (options.max_wait + 2),
        health_check_period_s=health_check_period_s,
    )
    return deployment.bind(model, inputs, options)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Application builder for Serve config files (``import_path:
    sidenet.integrations.ray_serve:app_builder``). ``args``: ``sidenet`` (folder, required), ``task``,
    ``mainnet`` (``MODULE:FUNCTION``), ``mainnet_weights``, ``threshold``, ``num_replicas``, ``num_cpus``,
    ``num_gpus`` and any field of :class:`ServeOptions`."""
    args = dict(args)
    unknown = (
        set(args)
        - {f.name for f in fields(ServeOptions)}
        - {
            "sidenet",
            "task",
            "mainnet",
            "mainnet_weights",
            "threshold",
            "num_replicas",
            "num_cpus",
            "num_gpus",
        }
    )
    if "sidenet" not in args or unknown:
        raise ValueError(f"app_builder needs args.sidenet (a SideNet folder); unknown args: {sorted(unknown)}")
    source = SidenetSource(
        args.pop("sidenet"),
        args.pop("task", None),
        args.pop("mainnet", None),
        args.pop("threshold", None),
        args.pop("mainnet_weights", None),
    )
    placement = {key: args.pop(key) for key in ("num_replicas", "num_cpus", "num_gpus") if key in args}
    return build_app(source, source.inputs(), ServeOptions(**args), **placement)
