"""The GPU benchmark's runners (``benchmarks/gpu.py``): thresholds at an exit share, the MainNet and the
minimal router as callables, passes over batches, and their device-synchronised timing and profiling."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import sidenet
from sidenet import AdaptiveModel

# -- thresholds ------------------------------------------------------------------------------------


def threshold_for_share(confidence: torch.Tensor, share: float) -> float:
    """A threshold at which about ``share`` of the samples exit (confidence >= threshold), midway between
    two distinct float32 confidences so that no sample lies on it: the gap nearest the quantile."""
    values = confidence.detach().float().cpu().flatten().sort().values
    n = len(values)
    if share <= 0.0 or n == 0:
        return sidenet.NEVER_EXIT
    cut = min(max(n - round(share * n), 0), n)  # samples at and above index ``cut`` exit
    if cut == 0:
        return float(values[0]) / 2
    gaps = [i for i in range(1, n) if float(values[i - 1]) < float(values[i])]
    for i in sorted(gaps, key=lambda i: abs(i - cut)):
        middle = (float(values[i - 1]) + float(values[i])) / 2
        # Compared in float32 by the exit rule: the middle must stay strictly inside the gap there.
        if float(values[i - 1]) < float(torch.tensor(middle, dtype=torch.float32)) < float(values[i]):
            return middle
    return sidenet.NEVER_EXIT


def at_threshold(model: AdaptiveModel, threshold: float) -> AdaptiveModel:
    """``model``'s split and SideNet (shared) at another threshold."""
    return AdaptiveModel(
        model.split, model.sidenet, threshold=threshold, temperature=model.temperature, policy=model.policy_kind
    ).eval()


# -- runners ---------------------------------------------------------------------------------------


def mainnet_call(mainnet: nn.Module, kind: str) -> Callable[[Any], torch.Tensor]:
    """The MainNet as a user calls it: ``net(images)`` or ``net(**batch).logits``."""
    if kind == "text":
        return lambda x: mainnet(**x).logits
    return mainnet


def minimal_router(model: AdaptiveModel) -> Callable[[Any], torch.Tensor]:
    """Per-sample routing with nothing but the public split API, as a reference for sidenet's overhead:
    trunk, SideNet, max-softmax, gather of the continuing samples, rest, scatter of their logits."""
    split, head = model.split, model.sidenet
    threshold, temperature = model.threshold, model.temperature

    def route(x: Any) -> torch.Tensor:
        state = split.trunk(x)
        logits = head(split.features(state)).float()
        confidence = torch.softmax(logits / temperature, dim=-1).amax(dim=-1)
        remaining = (confidence < threshold).nonzero().squeeze(1)
        if len(remaining):
            rest = split.rest(split.select(state, remaining))
            logits = logits.index_copy(0, remaining, rest.float())
        return logits

    return route


def per_shape(make: Callable[[Any], Callable[[Any], Any]], key: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A callable that builds (``make(x)``) one runner per input shape ``key(x)`` on first sight."""
    built: dict[Any, Callable[[Any], Any]] = {}

    def run(x: Any) -> Any:
        k = key(x)
        if k not in built:
            built[k] = make(x)
        return built[k](x)

    return run


def shape_key(x: Any) -> tuple:
    """What a graph is captured per: the input's shape (text: of its token ids)."""
    return tuple(x["input_ids"].shape) if isinstance(x, dict) else tuple(x.shape)


def loop(fn: Callable[[Any], Any], batches: list[Any]) -> Callable[[], None]:
    """One pass of ``fn`` over ``batches``."""

    def one_pass() -> None:
        for x in batches:
            fn(x)

    return one_pass


# -- timing ----------------------------------------------------------------------------------------


class Clock:
    """Seconds left of the run's budget."""

    def __init__(self, budget: float | None) -> None:
        self.started = time.perf_counter()
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - self.elapsed()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_pass(run: Callable[[], None], device: torch.device) -> float:
    """Wall seconds of one pass (compilation of every new shape included)."""
    synchronize(device)
    started = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - started


def time_passes(
    passes: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per pass of each runner: ``warmup`` untimed passes, then ``repeats`` interleaved timed
    ones (A B C A B C ...), each between two device synchronisations."""
    for _ in range(warmup):
        for run in passes.values():
            run()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, run in passes.items():
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            seconds[name].append(time.perf_counter() - started)
    return seconds


def profile_pass(run: Callable[[], None], device: torch.device, rows: int) -> dict[str, Any]:
    """The operations and kernels of one pass of ``run`` under ``torch.profiler``, the most expensive
    ``rows`` by their own device time (CPU time on a CPU): where a stage's time goes, for the question the
    stage timings leave open (why the served front of a ResNet-50 takes half the compiled MainNet's time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as profiler:
        run()
        synchronize(device)

    def own_us(event: Any) -> float:
        if not cuda:
            return float(event.self_cpu_time_total)
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))

    events = sorted(profiler.key_averages(), key=own_us, reverse=True)
    top = [{"name": e.key[:160], "calls": int(e.count), "own_ms": own_us(e) / 1000} for e in events[:rows]]
    return {"clock": "device" if cuda else "cpu", "own_ms_total": sum(map(own_us, events)) / 1000, "top": top}
