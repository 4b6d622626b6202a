"""A compiled serving mode: the adaptive model's two stages compiled or captured at fixed shapes, with
the routed batch's one host wait hidden behind queued work.

At serving speeds on a GPU, an eager adaptive model loses its saving to the host: every kernel is a
launch, and the one read it must make (how many samples continue) drains the queue of launched work,
so the GPU idles while the host gathers the continuing samples and launches the rest. Here:

- **front** (trunk, SideNet, exit score, exit mask, the order that puts continuing samples first, and
  their count) is one stage, captured as a CUDA graph per served batch shape (``cuda_graph``) or
  compiled by ``torch.compile`` (``inductor``);
- **rest** runs at a few row counts (``rest_buckets``): the continuing rows are padded up to the next
  bucket with rows of the same batch (whose answers are dropped) and their answers scattered back;
  text is padded to length buckets (``length_buckets``), its attention mask keeping padding inert;
- :meth:`CompiledAdaptiveModel.stream` queues the front of batch t+1 before reading batch t's count,
  which on a GPU arrives through pinned memory and an event, so the read waits for work already done.

A new shape (batch size, bucket, rule) is captured or compiled when first seen. On the CPU the same
stages are compiled with ``torch.compile`` and each is kept only where it measures faster than eager
at warm-up (:attr:`CompiledAdaptiveModel.stage_backends` says which). Answers equal ``model(x)``
within float rounding; see the README for what that means for exits near the threshold.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from sidenet.cuda_graphs import CudaGraphStage, capture_cuda_graph, shape_key
from sidenet.errors import SidenetError
from sidenet.outputs import AdaptiveOutput, FrontPass
from sidenet.policy import ExitPolicy
from sidenet.routing import AdaptiveModel, continuing_first
from sidenet.serving import PooledRouter

__all__ = ["CompiledAdaptiveModel", "CudaGraphStage", "capture_cuda_graph", "compile_for_serving"]  # graphs re-exported

Backend = Literal["auto", "eager", "inductor", "cuda_graph"]
BACKENDS = ("auto", "eager", "inductor", "cuda_graph")
DEFAULT_LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)


def _bucket(value: int, buckets: Sequence[int] | None, ceiling: int) -> int:
    """The smallest bucket that holds ``value`` and is at most ``ceiling`` (``value`` itself without
    buckets, ``ceiling`` when no bucket fits)."""
    fitting = [b for b in buckets or () if value <= b <= ceiling]
    return min(fitting) if fitting else (ceiling if buckets else value)


def _median_seconds(fn: Callable[[], Any], repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Stage:
    """One stage run eagerly, compiled by ``torch.compile``, or replayed from CUDA graphs captured per
    input shape (in ``copies`` alternating copies: see :meth:`CompiledAdaptiveModel.stream`)."""

    def __init__(self, fn: Callable[[Any], Any], backend: str, copies: int = 1) -> None:
        self.fn = fn
        self.backend = backend
        self.copies = copies
        self._turn = 0
        self._graphs: dict[tuple, CudaGraphStage] = {}
        self._compiled = torch.compile(fn) if backend == "inductor" else None
        self.capture_seconds = 0.0

    def set_backend(self, backend: str) -> None:
        self.backend = backend

    def __call__(self, x: Any) -> Any:
        if self.backend == "cuda_graph":
            self._turn = (self._turn + 1) % self.copies
            key = (self._turn, shape_key(x))
            if key not in self._graphs:
                start = time.perf_counter()
                self._graphs[key] = CudaGraphStage(self.fn, x)
                self.capture_seconds += time.perf_counter() - start
            return self._graphs[key](x)
        if self.backend == "inductor" and self._compiled is not None:
            return self._compiled(x)
        return self.fn(x)


@dataclass
class _CompiledFront(FrontPass):
    """A front pass whose continuing samples are already ordered and counted on the device."""

    order: torch.Tensor
    counts: torch.Tensor  # on the host (pinned on CUDA); valid once ``ready`` has completed
    ready: Any


class CompiledAdaptiveModel:
    """An :class:`~sidenet.AdaptiveModel` served with compiled or captured stages (see the module
    docstring); build it with :func:`compile_for_serving`. Adaptive routing only.

    Attributes:
        model: the adaptive model; its exit rule, input checks, monitor and FLOPs ledger are used as
            they are (a new threshold makes new front graphs or a recompilation).
        backend: ``eager``, ``inductor`` or ``cuda_graph``, resolved from the one asked for.
        stage_backends: what each stage runs on, e.g. ``{"front": "inductor", "rest": "eager"}`` on a
            CPU where compiling the rest did not measure faster.
        rest_buckets: row counts the rest runs at (``None``: the count of continuing samples itself).
        length_buckets: lengths text batches are padded to (``None``: their own).
        compile_seconds: wall time of the warm-up (compiling, capturing, first runs) and of captures
            of shapes first seen later.
    """

    # Output tensors of a captured stage are overwritten by its next replay: outputs handed on are copies.
    def __init__(
        self,
        model: AdaptiveModel,
        backend: str,
        rest_buckets: Sequence[int] | None = None,
        length_buckets: Sequence[int] | None = None,
    ) -> None:
        self.model = model.eval()
        self.backend = backend
        self.rest_buckets = None if rest_buckets is None else tuple(sorted({int(b) for b in rest_buckets}))
        self.length_buckets = None if length_buckets is None else tuple(sorted({int(b) for b in length_buckets}))
        self._fronts: dict[ExitPolicy, _Stage] = {}
        # The front runs in two alternating copies: stream() reads batch t after queueing batch t+1.
        self._front_copies = 2
        self._rest = _Stage(model.split.rest, backend)
        self._warmup_seconds = 0.0

    # -- settings and reports --------------------------------------------------------------------
    @property
    def stage_backends(self) -> dict[str, str]:
        front = self._front_stage(self.model.policy)
        return {"front": front.backend, "rest": self._rest.backend}

    @property
    def compile_seconds(self) -> float:
        captures = sum(stage.capture_seconds for stage in (*self._fronts.values(), self._rest))
        return self._warmup_seconds + captures

    @property
    def reuses_outputs(self) -> bool:
        """True where stage outputs are static tensors that the next replay overwrites (CUDA graphs)."""
        return self.backend == "cuda_graph"

    def _front_stage(self, rule: ExitPolicy) -> _Stage:
        # One stage per exit rule: the rule is part of the compiled or captured computation.
        if rule not in self._fronts:
            backend = next(iter(self._fronts.values())).backend if self._fronts else self.backend
            self._fronts[rule] = _Stage(self._front_fn(rule), backend, self._front_copies)
        return self._fronts[rule]

    def _front_fn(self, rule: ExitPolicy) -> Callable[[Any], tuple]:
        split, sidenet = self.model.split, self.model.sidenet

        def front(x: Any) -> tuple:
            """Trunk, SideNet, exit score and mask, continuing samples first, and their count."""
            state = split.trunk(x)
            side_logits = sidenet(split.features(state))
            confidence = rule.confidence(side_logits)
            exited = rule.exits(confidence)
            order, counts = continuing_first(split, state, exited)
            return state, side_logits, confidence, exited, order, counts

        return front

    # -- inputs ----------------------------------------------------------------------------------
    def _padded(self, x: Any) -> Any:
        """A text batch as a dict of its tensors in sorted key order (a captured graph copies inputs by
        position), padded with masked-out zeros to its length bucket; other inputs unchanged."""
        if not isinstance(x, Mapping):
            return x
        x = {key: x[key] for key in sorted(x) if isinstance(x[key], torch.Tensor) and key != "labels"}
        if not self.length_buckets:
            return x
        length = int(x["input_ids"].shape[1])
        target = _bucket(length, self.length_buckets, max(length, self.length_buckets[-1]))
        if target == length:
            return x
        return {key: F.pad(value, (0, target - length)) if value.ndim == 2 else value for key, value in x.items()}

    # -- routing ---------------------------------------------------------------------------------
    @torch.no_grad()
    def front_pass(self, x: Any, mode: str = "adaptive") -> _CompiledFront:
        """Trunk and SideNet on ``x`` with the continuing samples ordered and counted, the count on its
        way to the host (not yet read); like :meth:`AdaptiveModel.front_pass` (adaptive mode only)."""
        if mode != "adaptive":
            raise ValueError(f"the compiled serving mode routes adaptively only, got mode={mode!r}")
        model = self.model
        model.check_input(x)
        model.split.ensure_eval()
        x = self._padded(x)
        profile = model.flop_profile(x)
        state, side_logits, confidence, exited, order, counts = self._front_stage(model.policy)(x)
        if self.reuses_outputs:  # handed on past the next replay
            side_logits, confidence, exited, order = (t.clone() for t in (side_logits, confidence, exited, order))
        ready = None
        if counts.device.type == "cuda":
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            counts = host
        return _CompiledFront(state, side_logits, confidence, exited, profile, order, counts, ready)

    def continuing(self, front: _CompiledFront) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The continuing samples of a front pass of :meth:`front_pass` and the sizes to cut their state
        at (text: the kept length, rounded up to its bucket): the one host wait, on an event recorded
        after the count."""
        if front.ready is not None:
            front.ready.synchronize()
        read = front.counts.tolist()
        sizes = tuple(read[1:])
        if sizes and self.length_buckets:
            length = int(tree_leaves(front.state)[0].shape[1])
            sizes = (_bucket(sizes[0], self.length_buckets, length), *sizes[1:])
        return front.order[: read[0]], sizes

    @torch.no_grad()
    def rest(self, state: Any, rows: int | None = None) -> torch.Tensor:
        """Logits of the rest of the MainNet on the first ``rows`` samples of ``state`` (all by
        default), run at the next row bucket with the state's own rows (repeated) as padding."""
        split = self.model.split
        n = int(tree_leaves(state)[0].shape[0])
        rows = n if rows is None else rows
        target = _bucket(rows, self.rest_buckets, max(n, rows))
        if target != n:
            index = torch.arange(target, device=tree_leaves(state)[0].device) % n
            state = split.select_sized(state, index, ())
        return self._rest(state)[:rows].clone()

    def finish(self, front: _CompiledFront) -> AdaptiveOutput:
        """The answers of a batch whose :meth:`front_pass` has run: the rest on its continuing samples."""
        model = self.model
        remaining, sizes = self.continuing(front)
        n, count = len(front.exited), len(remaining)
        logits, rest_cost = front.side_logits, 0.0
        if count:
            # Rows of the batch itself pad the continuing ones up to the bucket; their answers are dropped.
            rows = _bucket(count, self.rest_buckets, n)
            selected = model.split.select_sized(front.state, front.order[:rows], sizes)
            rest_logits = self.rest(selected, count)
            rest_cost = model.rest_flops(selected, None, front.profile)
            dtype = torch.promote_types(logits.dtype, rest_logits.dtype)
            logits = logits.to(dtype).index_copy(0, remaining, rest_logits.to(dtype))
        stage = torch.where(front.exited, 0, 1)  # one SideNet: 0 where it answered, 1 for the MainNet
        return AdaptiveOutput(logits, front.exited, front.confidence, front.flops_with_rest(rest_cost), stage)

    @torch.no_grad()
    def __call__(self, x: Any) -> AdaptiveOutput:
        """Classify a batch, as ``model(x)`` does (recorded in the model's monitor)."""
        front = self.front_pass(x)
        self.model.monitor.record(front.exited, front.confidence)
        return self.finish(front)

    def stream(self, batches: Iterable[Any]) -> Iterator[AdaptiveOutput]:
        """Classify batches in order, each front queued before the previous batch's count is read, so
        that the host's wait overlaps the GPU's work on the next batch. Yields one output per batch."""
        pending: _CompiledFront | None = None
        for x in batches:
            with torch.no_grad():
                front = self.front_pass(x)
                self.model.monitor.record(front.exited, front.confidence)
                if pending is not None:
                    yield self.finish(pending)
            pending = front
        if pending is not None:
            with torch.no_grad():
                yield self.finish(pending)

    def pooled_router(self, rest_batch: int | None = None, max_wait: int = 4) -> PooledRouter:
        """A :class:`~sidenet.serving.PooledRouter` over this model's compiled stages."""
        return PooledRouter(self.model, rest_batch=rest_batch, max_wait=max_wait, stages=self)

    # -- warm-up ---------------------------------------------------------------------------------
    def warm_up(self, example: Any, batch_sizes: Sequence[int]) -> None:
        """Compile or capture the stages for every batch size and rest bucket up to it; on the CPU,
        keep each compiled stage only where it measures faster than eager."""
        start = time.perf_counter()
        split = self.model.split
        n = split.batch_size(example)
        for size in batch_sizes:
            index = torch.arange(size, device=split.input_device(example)) % n
            if isinstance(example, Mapping):
                batch = {k: v[index] for k, v in example.items() if isinstance(v, torch.Tensor) and v.ndim}
            else:
                batch = example[index]
            front = self.front_pass(batch)
            self.finish(front)
            state = front.state
            for rows in sorted({_bucket(r, self.rest_buckets, size) for r in (self.rest_buckets or (size,))}):
                if rows <= size:
                    self.rest(split.select_sized(state, torch.arange(rows, device=index.device), ()))
        if self.backend == "inductor":
            self._keep_faster(example)
        self._warmup_seconds += time.perf_counter() - start

    def _keep_faster(self, example: Any) -> None:
        """On the CPU, fall back to eager for a stage whose compiled form is not faster."""
        x = self._padded(example)
        stage = self._front_stage(self.model.policy)
        state = stage.fn(x)[0]
        for name, runner, argument in (("front", stage, x), ("rest", self._rest, state)):
            compiled = _median_seconds(lambda r=runner, a=argument: r(a))
            eager = _median_seconds(lambda r=runner, a=argument: r.fn(a))
            if eager <= compiled:
                runner.set_backend("eager")
                if name == "front":
                    for other in self._fronts.values():
                        other.set_backend("eager")


def compile_for_serving(
    model: AdaptiveModel,
    example: Any,
    *,
    batch_sizes: Sequence[int] | None = None,
    rest_buckets: Sequence[int] | None = None,
    length_buckets: Sequence[int] | None = None,
    backend: Backend = "auto",
) -> CompiledAdaptiveModel:
    """Serve ``model`` with compiled or captured stages; returns a callable with ``model(x)``'s answers.

    Args:
        model: the adaptive model (its threshold and policy are read on every call).
        example: an input batch like the served ones (its device picks the backend; its batch size is
            served when ``batch_sizes`` is not given).
        batch_sizes: the batch sizes to compile or capture ahead (others are, when first seen).
        rest_buckets: the row counts the rest runs at. Default on CUDA: powers of two up to the largest
            batch size, and that size; on the CPU none (the exact count: padding would cost compute).
        length_buckets: the lengths text batches are padded to. Default on CUDA:
            ``DEFAULT_LENGTH_BUCKETS``; on the CPU none.
        backend: ``auto`` (``cuda_graph`` on CUDA, ``inductor`` on the CPU), ``eager`` (the buckets
            only), ``inductor`` (``torch.compile``; on the CPU kept per stage where it measures faster)
            or ``cuda_graph``.

    Example::

        served = sidenet.compile_for_serving(model, next(iter(loader))[0])
        for output in served.stream(batches):
            ...
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(model, AdaptiveModel):
        raise ValueError(f"compile_for_serving takes a sidenet.AdaptiveModel, got {type(model).__name__}")
    if model.num_taps > 1:
        raise SidenetError(
            f"compile_for_serving serves one SideNet; this model is a cascade of {model.num_taps} "
            "(not compiled yet): serve it eagerly, model(x) or sidenet.PooledRouter(model)"
        )
    model.check_input(example)
    cuda = model.split.input_device(example).type == "cuda"
    if backend == "auto":
        backend = "cuda_graph" if cuda else "inductor"
    if backend == "cuda_graph" and not cuda:
        raise ValueError("backend='cuda_graph' needs the model and the example on a CUDA device")
    sizes = sorted({int(b) for b in batch_sizes or [model.split.batch_size(example)]})
    if sizes[0] < 1:
        raise ValueError(f"batch sizes must be positive, got {batch_sizes}")
    if rest_buckets is None and cuda:
        rest_buckets = sorted({2**k for k in range(sizes[-1].bit_length()) if 2**k <= sizes[-1]} | set(sizes))
    if length_buckets is None and cuda and isinstance(example, Mapping):
        length_buckets = DEFAULT_LENGTH_BUCKETS
    served = CompiledAdaptiveModel(model, backend, rest_buckets, length_buckets)
    served.warm_up(example, sizes)
    return served
