"""Wall-clock throughput of compared models, measured in one process with interleaved repeats
(A B A B ..., or rotated: A B, B A, ...), after a warm-up, so that drift of the machine hits every model alike."""

from __future__ import annotations

import collections
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from sidenet.loaders import iter_batches

if TYPE_CHECKING:
    from sidenet.part_costs import PartSeconds
    from sidenet.routing import AdaptiveModel

__all__ = [
    "Timing",
    "RoutedTiming",
    "count_operations",
    "input_batches",
    "measure_throughput",
    "time_routed",
    "latency_percentiles",
    "synchronize",
]


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

    def time_ratios(self, other: Timing) -> list[float]:
        """Per repeat, this runner's seconds per sample over ``other``'s, the two passes paired by repeat
        (timed in one :func:`measure_throughput` session, each repeat's passes run one after the other).
        Their median compares two close runners more steadily than the ratio of their medians: a drift of
        the machine's speed between repeats moves both passes of a pair alike. Raises ``ValueError`` for
        timings of different repeat counts."""
        if len(self.seconds) != len(other.seconds):
            raise ValueError(f"pairs need equal repeats: {len(self.seconds)} against {len(other.seconds)}")
        return [(a / self.samples) / (b / other.samples) for a, b in zip(self.seconds, other.seconds, strict=True)]

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
    progress: bool = False,
    rotate: bool = False,
) -> dict[str, Timing]:
    """Time one pass of each runner over ``batches``, interleaved, ``repeats`` times after ``warmup``
    untimed passes; returns a :class:`Timing` per runner name. Each pass ends with :func:`synchronize`.

    ``rotate``: each repeat starts one runner later (A B C, B C A, C A B, ...), so that no runner always
    runs first or after the same other one (what a pass leaves behind, in caches and in the allocator,
    falls on every runner alike); by default every repeat runs them in the given order.

    ``finish`` maps runner names to a call made at the end of each of their passes, inside the timed
    region: for runners that hold work back across batches (:meth:`sidenet.serving.PooledRouter.flush`).
    ``progress``: a bar over the passes, updated between them (outside the timed regions).
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

    bar = tqdm(total=(warmup + repeats) * len(runners), desc="Timing", disable=not progress, leave=False)
    for _ in range(warmup):
        for name, run in runners.items():
            one_pass(name, run)
            bar.update()
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for repeat in range(repeats):
        shift = repeat % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            run = runners[name]
            started = time.perf_counter()
            one_pass(name, run)
            seconds[name].append(time.perf_counter() - started)
            bar.update()
    bar.close()
    return {name: Timing(values, samples) for name, values in seconds.items()}


@dataclass(kw_only=True)
class RoutedTiming:
    """Throughput of a routed model at named points (thresholds, threshold vectors) and of its MainNet
    alone, timed interleaved on the same batches by :func:`time_routed`.

    Speed-ups are over the best MainNet alone: the faster of the eager MainNet and, when the model was
    timed as served (``served`` not ``"eager"``), the MainNet compiled alone (``mainnet_compiled``).
    ``compile_seconds``: the compilation of the served model and of the MainNet alone, untimed.
    ``parts``: where the time goes, each part of the model timed alone (:func:`sidenet.measure_part_seconds`),
    where the caller measured it. ``forecasts``: each point's time per routed batch over the MainNet's, as
    forecast from those parts (:func:`sidenet.forecast_batch_time`), where the caller set it beside what
    was measured (eager routing, parts timed eager).
    """

    samples: int
    batches: int
    mainnet: Timing
    points: dict[Any, Timing]
    mainnet_compiled: Timing | None = None
    served: str = "eager"
    compile_seconds: float | None = None
    parts: PartSeconds | None = None
    forecasts: dict[Any, float] | None = None

    @property
    def baseline(self) -> str:
        """``mainnet`` or ``mainnet_compiled``: the faster MainNet alone, the unit of the speed-ups."""
        compiled = self.mainnet_compiled
        faster = compiled is not None and compiled.throughput > self.mainnet.throughput
        return "mainnet_compiled" if faster else "mainnet"

    @property
    def baseline_timing(self) -> Timing:
        return self.mainnet if self.baseline == "mainnet" else self.mainnet_compiled  # type: ignore[return-value]

    def speedup(self, point: Any) -> float:
        """Throughput at ``point`` over the best MainNet alone."""
        return self.points[point].throughput / self.baseline_timing.throughput

    def forecast_speedup(self, point: Any) -> float | None:
        """The speed-up over the MainNet alone forecast at ``point`` from the parts' timing; None where none was."""
        fraction = (self.forecasts or {}).get(point)
        return None if fraction is None else 1.0 / fraction

    def speed(self, point: Any) -> str:
        """Throughput and speed-up at ``point`` for a table cell, with the forecast beside where there is one."""
        forecast = self.forecast_speedup(point)
        beside = "" if forecast is None else f"; forecast {forecast:.2f}x"
        return f"{self.points[point].throughput:,.0f} ({self.speedup(point):.2f}x{beside})"

    def describe(self) -> str:
        """One sentence: how the model ran and what the speed-ups are over, with the MainNet's figures."""
        parts = "" if self.parts is None else f" {self.parts.describe()}"
        if self.forecasts:
            parts += (
                " Beside each measured speed-up, the one forecast per routed batch from those parts, timed on 1 to "
                f"{self.parts.batch_size if self.parts else 'all'} rows with the routing step at each tap "
                "(sidenet.forecast_batch_time)."
            )
        eager = f"eager {self.mainnet.throughput:,.0f} samples/s"
        if self.mainnet_compiled is None:
            return (
                f"Speed-ups are of eager routing over the eager MainNet alone ({self.mainnet.throughput:,.0f} "
                f"samples/s); {self.samples} samples in {self.batches} batches, median of "
                f"{len(self.mainnet.seconds)} interleaved passes.{parts}"
            )
        compiled = f"torch.compile {self.mainnet_compiled.throughput:,.0f} samples/s"
        best = "torch.compile" if self.baseline == "mainnet_compiled" else "eager"
        return (
            f"Speed-ups are of the model as served by {self.served} over the best MainNet alone ({best}; {eager}, "
            f"{compiled}); "
            f"{self.samples} samples in {self.batches} batches, median of {len(self.mainnet.seconds)} interleaved "
            f"passes after {self.compile_seconds:.1f} s of compiling.{parts}"
        )

    def baseline_dict(self) -> dict[str, Any]:
        """The MainNet alone and how the model ran, for the JSON of a report."""
        return {
            "mainnet": self.mainnet.to_dict(),
            "mainnet_compiled": None if self.mainnet_compiled is None else self.mainnet_compiled.to_dict(),
            "baseline": self.baseline,
            "served": self.served,
            "compile_seconds": self.compile_seconds,
            "parts": None if self.parts is None else self.parts.to_dict(),
            "forecasts": None
            if self.forecasts is None
            else {key if isinstance(key, str) else repr(key): value for key, value in self.forecasts.items()},
        }


def time_routed(
    model: AdaptiveModel,
    batches: Sequence[Any],
    points: Mapping[Any, Callable[[], Any]],
    repeats: int = 3,
    compile_backend: str | None = None,
    progress: bool = False,
) -> RoutedTiming:
    """Time ``model`` at each of ``points`` (a key and a call that puts the model's exit rules there,
    made before every batch: the runners interleave) and its MainNet alone, over ``batches`` (on the
    MainNet's device and dtype); the model's exit rules are put back afterwards.

    ``compile_backend`` None times eager routing against the eager MainNet. A backend of
    :func:`sidenet.compile_for_serving` (``auto``: compiled kernels in CUDA graphs on a GPU,
    ``torch.compile`` on the CPU) times the model as served that way, and the MainNet alone also compiled
    (``torch.compile``, mode ``reduce-overhead`` on CUDA: kernels in CUDA graphs), so that the speed-ups
    are over the best MainNet alone a user could run; both are compiled before the timed passes.
    ``progress``: bars over the compilation and the timed passes.
    """
    if not batches or not points:
        raise ValueError("time_routed needs at least one batch and one point")
    split = model.split
    saved = model.policies
    runners: dict[str, Callable[[Any], Any]] = {"mainnet": lambda x: model(x, mode="main").logits}
    served, seconds = model, None
    if compile_backend is not None:
        served, seconds = _compiled(model, batches, compile_backend, runners, progress)
    for key, put in points.items():
        runners[repr(key)] = _at_point(served, put)
    # On an accelerator a pass has ended only when its queued work has: wait for it inside the timing.
    device = next(model.sidenet.parameters()).device
    finish = {} if device.type == "cpu" else dict.fromkeys(runners, lambda: torch.accelerator.synchronize(device))
    try:
        timings = measure_throughput(
            runners, batches, repeats=repeats, batch_size=split.batch_size, finish=finish, progress=progress
        )
    finally:
        model.policies = saved
    return RoutedTiming(
        samples=sum(split.batch_size(batch) for batch in batches),
        batches=len(batches),
        mainnet=timings["mainnet"],
        mainnet_compiled=timings.get("mainnet_compiled"),
        points={key: timings[repr(key)] for key in points},
        served="eager" if compile_backend is None else f"compile_for_serving (backend {compile_backend})",
        compile_seconds=seconds,
    )


def _at_point(model: Callable[[Any], Any], put: Callable[[], Any]) -> Callable[[Any], Any]:
    def run(x: Any) -> Any:
        put()
        return model(x).logits

    return run


def _compiled(
    model: AdaptiveModel,
    batches: Sequence[Any],
    backend: str,
    runners: dict[str, Callable[[Any], Any]],
    progress: bool = False,
) -> tuple[Callable[[Any], Any], float]:
    """The model served by ``compile_for_serving`` at the batches' sizes, the MainNet compiled alone added
    to ``runners`` (``mainnet_compiled``), both compiled on ``batches`` (every shape they hold), and the
    seconds that took."""
    # The serving layer, imported only when the model is to be timed as served.
    from sidenet.compiled import compile_for_serving
    from sidenet.compiled_stages import padded_text

    split = model.split
    started = time.perf_counter()
    desc = "Compiling (served model, MainNet alone)"
    bar = tqdm(total=len(batches) + 1, desc=desc, disable=not progress, leave=False)
    sizes = sorted({split.batch_size(batch) for batch in batches})
    served = compile_for_serving(model, batches[0], batch_sizes=sizes, backend=backend)  # type: ignore[arg-type]
    bar.update()
    cuda = split.input_device(batches[0]).type == "cuda"
    compiled = torch.compile(split.mainnet_logits, mode="reduce-overhead" if cuda else None)
    buckets = served.length_buckets

    def alone(x: Any) -> torch.Tensor:
        # Text padded to the served model's length buckets (on CUDA; none on the CPU), as gpu.py pads it for
        # the compiled MainNet: a graph per bucket, not one per length the batches happen to have.
        return compiled(padded_text(x, buckets))

    runners["mainnet_compiled"] = alone
    with torch.inference_mode():  # the mode of the timed passes: no recompilation there
        for batch in batches:  # every shape the timed passes meet
            served(batch)
            alone(batch)
            bar.update()
        synchronize()
    bar.close()
    return served, time.perf_counter() - started


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
