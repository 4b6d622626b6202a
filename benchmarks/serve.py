"""Serving through an engine: the same Ray Serve deployment (``sidenet.integrations.ray_serve``) of the
MainNet alone and of the SideNet with per-sample routing pooled inside the replica, side by side, under
a bounded closed-loop load on loopback.

Each of ``--clients`` client threads sends one request (one Fashion-MNIST test image as PNG bytes, or
one SST-2 dev sentence as JSON), waits for the answer, and sends the next, until ``--requests`` are
answered; a phase of the MainNet deployment and one of the sidenet deployment alternate ``--repeats``
times (both deployments stay up, each one replica, same batching). Reported: throughput (median over
phases, [min–max]), client-side p50/p95/p99 latency (over every request of the phases), accuracy, exit
rate, and the live audit of the sidenet deployment (1% of the samples, tolerance: the threshold rule's
``max_disagreement``, or for a threshold chosen by accuracy the disagreement it has on the choosing data,
rounded up to a whole percent).

Thresholds as in benchmarks/serving.py: Fashion-MNIST at most 0.5 points lost on validation; SST-2 at
most 1% disagreement on one half of dev, served on the other half. The client, the HTTP proxy and the
replicas share the machine's cores: on 2 cores the engine's per-request work weighs as much as the model.

Run: ``python -m benchmarks.serve [--quick]`` after the calibration step (``python -m benchmarks run``
runs it in order). Writes ``serve.json`` into the results folder.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import socket
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from benchmarks.harness import (
    RULES,
    benchmark_parser,
    command,
    fitted_sidenet,
    machine,
    parse_options,
    run_and_write,
)
from sidenet import sweep
from sidenet.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, prefix_loader, split_loader
from sidenet.tasks import get_task

NAME = "serve"
WORKLOADS = ("fmnist", "sst2")
# Issue 15's targets: throughput of the sidenet deployment over the MainNet's, at equal or lower p95.
TARGETS = {"fmnist": 2.0, "sst2": 1.4}
QUICK = {"requests": 200, "repeats": 1, "limit": 1000}


def requests_for(name: str, dataset: Any, limit: int) -> tuple[list[bytes], str, list[int]]:
    """(bodies, content type, labels) of the first ``limit`` evaluation samples, one request each."""
    from PIL import Image

    bodies, labels = [], []
    for i in range(min(limit, len(dataset))):
        sample, label = dataset[i]
        if name == "sst2":
            bodies.append(json.dumps({"text": sample}).encode())
        else:  # the normalised image back to its uint8 pixels, sent as a PNG file
            pixels = torch.round((sample[0] * FASHION_MNIST_STD + FASHION_MNIST_MEAN) * 255).clamp(0, 255)
            buffer = io.BytesIO()
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(buffer, format="PNG")
            bodies.append(buffer.getvalue())
        labels.append(int(label))
    return bodies, ("application/json" if name == "sst2" else "image/png"), labels


def closed_loop(port: int, path: str, bodies: list[bytes], content_type: str, clients: int, total: int) -> dict:
    """``clients`` threads, each with one keep-alive connection and one request in flight, until ``total``
    requests are answered (request i sends ``bodies[i % len(bodies)]``). Returns seconds, latencies and
    the answers by request index."""
    counter, lock = iter(range(total)), threading.Lock()
    latencies: list[float] = []
    answers: dict[int, dict] = {}
    errors: list[str] = []

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            started = time.perf_counter()
            try:
                connection.request("POST", path, body=bodies[i % len(bodies)], headers={"Content-Type": content_type})
                response = connection.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                errors.append(repr(exc))
                continue
            elapsed = time.perf_counter() - started
            if response.status != 200:
                errors.append(f"{response.status}: {payload[:200]!r}")
                continue
            with lock:
                latencies.append(elapsed)
                answers[i] = json.loads(payload)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"seconds": seconds, "latencies": latencies, "answers": answers}


def summary(phases: list[dict], labels: list[int]) -> dict[str, Any]:
    """Throughput per phase (median, spread), latency percentiles over all phases, accuracy, exit rate."""
    rates = [len(p["answers"]) / p["seconds"] for p in phases]
    latencies = np.asarray([t for p in phases for t in p["latencies"]]) * 1000
    answered = [(i, a) for p in phases for i, a in p["answers"].items()]
    return {
        "throughput": statistics.median(rates),
        "throughput_spread": [min(rates), max(rates)],
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "accuracy": sum(a["label"] == labels[i % len(labels)] for i, a in answered) / len(answered),
        "exit_rate": sum(bool(a["exited"]) for _, a in answered) / len(answered),
        "mean_flops": sum(a["flops"] for _, a in answered) / len(answered),
        "requests": len(answered),
    }


def audit_tolerance(curve: Any, threshold: float, rule: dict[str, float]) -> float:
    """The disagreement rate the threshold was chosen for (see the module docstring)."""
    if "max_disagreement" in rule:
        return rule["max_disagreement"]
    return math.ceil(100 * curve.at(threshold)["disagreement"] - 1e-9) / 100


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(port: int, path: str) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def engine_only(inputs: Any, args: argparse.Namespace) -> Any:
    """A deployment that parses each request like the others and batches it the same way, but answers
    without a model: the engine's own ceiling on this machine (proxy, routing, batching, the client)."""
    from ray import serve

    @serve.deployment(
        num_replicas=args.replicas,
        ray_actor_options={"num_cpus": args.replica_cpus},
        max_ongoing_requests=args.max_batch_size * 8,
    )
    class EngineOnly:
        def __init__(self, inputs: Any) -> None:
            self.inputs = inputs

        @serve.batch(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000)
        async def answer(self, samples: list[Any]) -> list[dict[str, Any]]:
            return [{"label": 0, "class_name": "", "confidence": None, "exited": False, "flops": 0.0}] * len(samples)

        async def __call__(self, request: Any) -> dict[str, Any]:
            return await self.answer(self.inputs.parse(await request.body(), request.headers.get("content-type")))

    return EngineOnly.bind(inputs)


def run_workload(name: str, args: argparse.Namespace, port: int) -> dict[str, Any]:
    """Deploy the MainNet-only and the sidenet apps of one workload, load them in turn, tear them down."""
    from ray import serve

    from sidenet.integrations import ImageInputs, TextInputs
    from sidenet.integrations.ray_serve import ServeOptions, build_app

    task = get_task(name)
    data = args.sst2_data if name == "sst2" else None
    model = fitted_sidenet(task.mainnet(data), args.results_dir, name).eval()
    loaders = task.loaders(data)
    if name == "sst2":
        choose, evaluate = split_loader(loaders["test"])
        dataset = evaluate.dataset
    else:
        choose, dataset = loaders["val"], loaders["test"].dataset
    if args.limit:
        choose, dataset = prefix_loader(choose, args.limit), Subset(dataset, range(min(args.limit, len(dataset))))
    curve = sweep(model, choose, progress=False)
    rule = RULES[name]
    model.threshold = curve.threshold_for(**rule)
    model.set_reference(curve.record.confidence)  # for the deployment's shift check
    tolerance = audit_tolerance(curve, model.threshold, rule)
    if name == "sst2":
        inputs: Any = TextInputs(task.recipe.checkpoint, task.recipe.max_length, tuple(task.class_names))
    else:
        inputs = ImageInputs(
            tuple(task.input_shape), (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,), tuple(task.class_names)
        )
    bodies, content_type, labels = requests_for(name, dataset, args.limit or len(dataset))
    settings = {
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_ms / 1000,
        "max_wait": args.max_wait,
        "flush_after_s": args.flush_ms / 1000,
        "torch_threads": args.torch_threads,
    }
    apps = {
        "mainnet": ServeOptions(mode="main", audit_share=0.0, **settings),
        "sidenet": ServeOptions(mode="adaptive", audit_share=args.audit_share, tolerance=tolerance, **settings),
    }
    for label, options in apps.items():
        app = build_app(model, inputs, options, num_replicas=args.replicas, num_cpus=args.replica_cpus, name=label)
        serve.run(app, name=f"{name}-{label}", route_prefix=f"/{name}-{label}")
    labels_run = [*apps, "engine_only"]
    serve.run(engine_only(inputs, args), name=f"{name}-engine_only", route_prefix=f"/{name}-engine_only")
    phases: dict[str, list[dict]] = {label: [] for label in labels_run}
    for label in labels_run:  # warm-up: every batch size and code path once, untimed
        closed_loop(port, f"/{name}-{label}", bodies, content_type, args.clients, args.warmup)
    for repeat in range(args.repeats):
        for label in labels_run if repeat % 2 == 0 else reversed(labels_run):
            phase = closed_loop(port, f"/{name}-{label}", bodies, content_type, args.clients, args.requests)
            phases[label].append(phase)
            print(f"{name} {label} repeat {repeat}: {len(phase['answers']) / phase['seconds']:,.1f} req/s", flush=True)
    metrics = {label: get_json(port, f"/{name}-{label}/metrics") for label in apps}
    for label in labels_run:
        serve.delete(f"{name}-{label}")
    rows = {label: summary(phases[label], labels) for label in labels_run}
    main, side = rows["mainnet"], rows["sidenet"]
    ratio = side["throughput"] / main["throughput"]
    met = ratio >= TARGETS[name] and side["p95_ms"] <= main["p95_ms"]
    return {
        "workload": name,
        "threshold": model.threshold,
        "rule": rule,
        "requests_per_phase": args.requests,
        "distinct_requests": len(bodies),
        "throughput_ratio": ratio,
        "p95_ms": {"mainnet": main["p95_ms"], "sidenet": side["p95_ms"]},
        "rows": rows,
        "audit": metrics["sidenet"]["audit"],
        "shift": metrics["sidenet"]["shift"],
        "replica_metrics": {
            label: {k: v for k, v in m.items() if k not in ("audit", "shift")} for label, m in metrics.items()
        },
        "targets": {
            "throughput_ratio_at_equal_or_lower_p95": {
                "target": f">= {TARGETS[name]} with sidenet p95 <= MainNet p95",
                "value": ratio,
                "met": met,
            }
        },
    }


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """This step's options from ``argv`` (the command line when None)."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--only", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--limit", type=int, default=None, help="the first samples of each split only")
    parser.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    parser.add_argument("--requests", type=int, default=1500, help="requests answered per timed phase")
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests per deployment first")
    parser.add_argument("--repeats", type=int, default=3, help="timed phases per deployment, interleaved")
    parser.add_argument("--replicas", type=int, default=1, help="replicas per deployment")
    parser.add_argument("--replica-cpus", type=float, default=0.5, help="CPUs Ray reserves per replica (logical)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--max-batch-size", type=int, default=32, help="@serve.batch max_batch_size")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="@serve.batch batch_wait_timeout_s, ms")
    parser.add_argument("--max-wait", type=int, default=4, help="most later batches a continuing sample waits")
    parser.add_argument("--flush-ms", type=float, default=20.0, help="finish waiting samples after this long")
    parser.add_argument("--audit-share", type=float, default=0.01, help="share of samples audited")
    return parse_options(parser, argv, QUICK)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start a local Ray (2 CPUs, loopback), serve and load every workload of ``args.only``; the result."""
    import ray
    from ray import serve

    torch.manual_seed(0)
    results: dict[str, Any] = {"command": command(NAME, args), "machine": machine(), "settings": {}, "workloads": {}}
    results["settings"] = {
        k: getattr(args, k)
        for k in ("clients", "requests", "warmup", "repeats", "replicas", "replica_cpus", "torch_threads")
        + ("max_batch_size", "batch_wait_ms", "max_wait", "flush_ms", "audit_share")
    }
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name in args.only:
            results["workloads"][name] = run_workload(name, args, port)
    finally:
        serve.shutdown()
        ray.shutdown()
    results["rows"] = [
        {k: w[k] for k in ("workload", "throughput_ratio", "p95_ms")} for w in results["workloads"].values()
    ]
    results["quick"] = bool(args.quick)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    run_and_write(NAME, run, options(argv))


if __name__ == "__main__":
    main()
