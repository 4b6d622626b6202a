"""Wall-clock throughput of compared models, measured in one process with interleaved repeats
(A B A B ...), after a warm-up, so that drift of the machine hits every model alike."""

from __future__ import annotations

import collections
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from sidenet.loaders import iter_batches

__all__ = ["Timing", "count_operations", "input_batches", "measure_throughput", "latency_percentiles", "synchronize"]


@dataclass
class Timing:
    """Seconds per pass over the batches, one entry per repeat, and the samples in a pass."""

    seconds: list[float]
    samples: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def throughput(self) -> float:
        """Samples per second at the median pass time."""
        return self.samples / self.median

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples_per_pass": self.samples,
            "median_seconds": self.median,
            "min_seconds": min(self.seconds),
            "max_seconds": max(self.seconds),
            "repeats": len(self.seconds),
            "throughput": self.throughput,
            "throughput_spread": [self.samples / max(self.seconds), self.samples / min(self.seconds)],
        }


def input_batches(loader: Iterable, samples: int | None = None, batch_size: Callable[[Any], int] = len) -> list[Any]:
    """The model inputs of ``loader``'s first batches, labels dropped, gathered before timing so that
    loading and collation stay out of the timed passes of :func:`measure_throughput`.

    Args:
        loader: batches of ``(inputs, labels)`` or dicts with a ``labels`` key (text); see
            :func:`sidenet.loaders.iter_batches`.
        samples: stop after the batch that brings the count to at least this many samples; None
            gathers every batch. Batches are kept whole: the timed batch size is the loader's.
        batch_size: counts the samples of one input batch (``model.split.batch_size`` for dicts).
    """
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be at least 1 (or None for all), got {samples}")
    batches, count = [], 0
    for inputs, _ in iter_batches(loader):
        batches.append(inputs)
        count += batch_size(inputs)
        if samples is not None and count >= samples:
            break
    return batches


def synchronize() -> None:
    """Wait for queued accelerator work (CUDA), so that a timed region ends when its work does, not
    when its last kernel was launched; nothing on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@torch.inference_mode()
def measure_throughput(
    runners: dict[str, Callable[[Any], Any]],
    batches: Sequence[Any],
    repeats: int = 5,
    warmup: int = 1,
    batch_size: Callable[[Any], int] = len,
    finish: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, Timing]:
    """Time one pass of each runner over ``batches``, interleaved, ``repeats`` times after ``warmup``
    untimed passes; returns a :class:`Timing` per runner name. Each pass ends with :func:`synchronize`.

    ``finish`` maps runner names to a call made at the end of each of their passes, inside the timed
    region: for runners that hold work back across batches (:meth:`sidenet.serving.PooledRouter.flush`).
    """
    if repeats < 1 or not batches:
        raise ValueError("need at least one repeat and one batch")
    finish = dict(finish or {})
    if unknown := set(finish) - set(runners):
        raise ValueError(f"finish names runners that do not exist: {sorted(unknown)}")
    samples = sum(batch_size(b) for b in batches)

    def one_pass(name: str, run: Callable[[Any], Any]) -> None:
        for batch in batches:
            run(batch)
        if name in finish:
            finish[name]()
        synchronize()

    for _ in range(warmup):
        for name, run in runners.items():
            one_pass(name, run)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            started = time.perf_counter()
            one_pass(name, run)
            seconds[name].append(time.perf_counter() - started)
    return {name: Timing(values, samples) for name, values in seconds.items()}


@torch.inference_mode()
def latency_percentiles(
    run: Callable[[Any], Any], inputs: Sequence[Any], percentiles: Sequence[float] = (50, 95)
) -> dict[str, float]:
    """Per-call latency (seconds) of ``run`` on each input, as the given percentiles."""
    times = []
    for item in inputs:
        started = time.perf_counter()
        run(item)
        synchronize()
        times.append(time.perf_counter() - started)
    times.sort()
    return {f"p{p:g}": times[min(len(times) - 1, int(round(p / 100 * (len(times) - 1))))] for p in percentiles}


def count_operations(run: Callable[[], Any]) -> collections.Counter[str]:
    """The tensor operations ``run()`` dispatches, by name, under ``torch.no_grad``: the ATen calls that
    make tensors, views excluded (not those that only read metadata or a value, such as
    ``promote_types`` or ``.item()``'s ``_local_scalar_dense``).

    On a GPU each is a kernel launch, and at serving batch sizes in bfloat16 a launch costs about what
    the kernel does, so an eager routed batch's time follows its count: a machine-independent figure
    beside the wall clock (for example sidenet's eager routing against a minimal router)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counting(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.operations: collections.Counter[str] = collections.Counter()

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            result = func(*args, **(kwargs or {}))
            if not func.is_view and any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(result)):
                self.operations[func.overloadpacket.__name__] += 1
            return result

    with torch.no_grad(), Counting() as counting:
        run()
    return counting.operations
