"""A compiled serving mode: the adaptive model's stages compiled or captured at fixed shapes, with
the routed batch's first host wait hidden behind queued work.

At serving speeds on a GPU, an eager adaptive model loses its saving to the host: every kernel is a
launch, and the one read it must make (how many samples continue) drains the queue of launched work,
so the GPU idles while the host gathers the continuing samples and launches the rest. Here:

- **front** (trunk, SideNet, exit score, exit mask, the order that puts continuing samples first, and
  their count) is one stage, compiled by ``torch.compile`` and its kernels captured as a CUDA graph per
  served batch shape (``inductor_cuda_graph``, the default on CUDA: fused kernels with no launch cost,
  as ``torch.compile(mode="reduce-overhead")`` gives a whole MainNet), its eager kernels captured
  (``cuda_graph``; also where compiled ones fail to capture), or compiled only (``inductor``, the CPU's);
- a cascade's **steps** (``step-1``, ...: the segment to the next tap, its SideNet, score, mask, order
  and count) and the **rest** run at a few row counts (``rest_buckets``): the continuing rows are padded
  up to the next bucket with rows of the same batch (marked as padding, so never counted; their answers
  are dropped) and their answers scattered back; text is padded to length buckets
  (``length_buckets``), its attention mask keeping padding inert;
- :meth:`CompiledAdaptiveModel.stream` queues the front of batch t+1 before reading batch t's count,
  which on a GPU arrives through pinned memory and an event, so the read waits for work already done.
  A cascade's later taps each read their count when reached, as eager routing does.

On CUDA a batch of a size not warmed up is padded with its own rows to the next warmed batch size (the
padding marked, never continuing); a larger one, a new bucket or a new score (kind, temperature) is
captured or compiled when first seen; a threshold is an input of the stages. On the CPU each compiled
stage is kept only where it measures faster than eager at warm-up (:attr:`CompiledAdaptiveModel.stage_backends`
says which). Answers equal ``model(x)`` within float rounding (the README says what that means for exits
near the threshold).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils._pytree import tree_leaves

import sidenet.compiled_stages as stages
from sidenet.compiled_stages import (
    GRAPH_BACKENDS,
    Stage,
    bucket_for,
    bucketed_sizes,
    front_fn,
    padded_text,
    step_fn,
)
from sidenet.compiled_warmup import StageWarmUp
from sidenet.cuda_graphs import CudaGraphStage, capture_cuda_graph
from sidenet.outputs import AdaptiveOutput, FrontPass, state_rows
from sidenet.policy import ExitPolicy
from sidenet.routing import AdaptiveModel
from sidenet.serving import PooledRouter
from sidenet.splits import select_samples

__all__ = ["CompiledAdaptiveModel", "CudaGraphStage", "capture_cuda_graph", "compile_for_serving"]  # graphs re-exported

Backend = Literal["auto", "eager", "inductor", "cuda_graph", "inductor_cuda_graph"]


@dataclass
class _CompiledFront(FrontPass):
    """A front pass whose continuing samples are already ordered and counted on the device."""

    order: torch.Tensor
    counts: torch.Tensor  # on the host (pinned on CUDA); valid once ``ready`` has completed
    ready: Any


class CompiledAdaptiveModel(StageWarmUp):
    """An :class:`~sidenet.AdaptiveModel` served with compiled or captured stages (see the module
    docstring); build it with :func:`compile_for_serving`. Adaptive routing only.

    Attributes:
        model: the adaptive model (one SideNet or a cascade); its exit rules, input checks, monitor and
            FLOPs ledger are used as they are (a new score kind or temperature makes new graphs or a
            recompilation; a new threshold is an input).
        backend: ``eager``, ``inductor``, ``cuda_graph`` or ``inductor_cuda_graph`` (``auto`` resolved).
        stage_backends: what each stage runs on, e.g. ``{"front": "inductor", "rest": "eager"}`` on a
            CPU where compiling the rest did not measure faster; a cascade adds ``step-1``, ... (the
            segment to each later tap with its SideNet); ``cuda_graph`` for a stage whose compiled kernels
            could not be captured (it warned and captured its eager kernels).
        rest_buckets: row counts the later stages run at (``None``: the count of continuing samples).
        length_buckets: lengths text batches are padded to (``None``: their own).
        rest_shapes: ``dynamic`` (the rest and steps compiled once for every row count) or ``static``
            (once per row bucket).
        batch_sizes: the batch sizes warmed up. With ``pad_batches`` (default on CUDA), a batch of
            another size is padded with its own rows up to the smallest of them that holds it (marked as
            padding: never continuing, answers dropped), so that it replays a graph captured ahead;
            larger batches are captured at their own size when first seen.
        compile_seconds: wall time of the warm-up (compiling, capturing, first runs) and later captures.
    """

    # Output tensors of a captured stage are overwritten by its next replay: outputs handed on are copies.
    def __init__(
        self,
        model: AdaptiveModel,
        backend: str,
        rest_buckets: Sequence[int] | None = None,
        length_buckets: Sequence[int] | None = None,
        rest_shapes: str = "dynamic",
        batch_sizes: Sequence[int] = (),
        autotune: bool = False,
    ) -> None:
        self.model = model.eval()
        self.autotune = autotune
        self.batch_sizes = tuple(sorted({int(b) for b in batch_sizes}))
        self.pad_batches = backend in GRAPH_BACKENDS
        self.rest_shapes = rest_shapes
        self.backend = backend
        self.rest_buckets = None if rest_buckets is None else tuple(sorted({int(b) for b in rest_buckets}))
        self.length_buckets = None if length_buckets is None else tuple(sorted({int(b) for b in length_buckets}))
        # Stages per (name, the rule's score: kind, temperature); the threshold is an input (see _threshold).
        self._stages: dict[tuple[str, tuple[str, float] | None], Stage] = {}
        self._kept: dict[str, str] = {}  # the backend kept per stage name at warm-up (CPU)
        self._thresholds: dict[tuple[float, torch.device], torch.Tensor] = {}
        self._valid: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._warmup_seconds = 0.0

    # -- settings and reports --------------------------------------------------------------------
    @property
    def stage_backends(self) -> dict[str, str]:
        policies = self.model.policies
        names = ["front", *(f"step-{part}" for part in range(1, len(policies)))]
        backends = {name: self._stage(name, rule).backend for name, rule in zip(names, policies, strict=True)}
        return {**backends, "rest": self._stage("rest", None).backend}

    @property
    def compile_seconds(self) -> float:
        return self._warmup_seconds + sum(stage.capture_seconds for stage in self._stages.values())

    @property
    def reuses_outputs(self) -> bool:
        """True where stage outputs are static tensors that the next replay overwrites (CUDA graphs)."""
        return self.backend in GRAPH_BACKENDS

    def _stage(self, name: str, rule: ExitPolicy | None) -> Stage:
        """The stage ``front``, ``step-K`` or ``rest`` for exit rule ``rule``'s score, built when first asked
        for (its inputs end with the threshold: see :meth:`_threshold`)."""
        key = (name, None if rule is None else (rule.kind, rule.temperature))  # the score, not the threshold
        if key not in self._stages:
            if name == "rest":
                fn = self.model.splits[-1].rest
            else:
                parts = self.model.splits, self.model.sidenets
                fn = front_fn(*parts, rule) if name == "front" else step_fn(*parts, rule, int(name[5:]))
            # The front runs in two alternating copies (stream() reads batch t after queueing t+1) at the
            # served batch sizes; the others at many row counts (compiled dynamic in them).
            front = name == "front"
            rows = "fixed" if front else self.rest_shapes
            backend = self._kept.get(name, self.backend)
            self._stages[key] = Stage(fn, backend, 2 if front else 1, name, rows, autotune=self.autotune)
        return self._stages[key]

    def _valid_rows(self, size: int, n: int, device: torch.device) -> torch.Tensor:
        """The mask of ``size`` rows whose first ``n`` are samples (the rest padding: of a batch to a served
        size, of continuing samples to a row bucket), made once per pair: no operation per batch."""
        key = (size, n, device)
        if key not in self._valid:
            self._valid[key] = torch.arange(size, device=device) < n
        return self._valid[key]

    def _threshold(self, rule: ExitPolicy, device: torch.device) -> torch.Tensor:
        """``rule``'s threshold as the 0-d float32 tensor the stages compare scores with (as
        :meth:`ExitPolicy.exits` compares the float32 scores with a Python float), made once per value:
        ``torch.full`` on the device, no copy from the host."""
        key = (rule.threshold, device)
        if key not in self._thresholds:
            if len(self._thresholds) >= 64:  # a sweep over many values: keep the cache small
                self._thresholds.clear()
            self._thresholds[key] = torch.full((), rule.threshold, dtype=torch.float32, device=device)
        return self._thresholds[key]

    # -- routing ---------------------------------------------------------------------------------
    @torch.no_grad()
    def front_pass(self, x: Any, mode: str = "adaptive") -> _CompiledFront:
        """Trunk and SideNet on ``x`` with the continuing samples ordered and counted, the count on its
        way to the host (not yet read); like :meth:`AdaptiveModel.front_pass` (adaptive mode only)."""
        if mode != "adaptive":
            raise ValueError(f"the compiled serving mode routes adaptively only, got mode={mode!r}")
        model = self.model
        model.admit(x)
        x = padded_text(x, self.length_buckets)
        profile = model.flop_profile(x)
        rule = model.policies[0]  # read once: another thread may install a new rule meanwhile
        device, n = model.split.input_device(x), model.split.batch_size(x)
        size = next((b for b in self.batch_sizes if b >= n), n) if self.pad_batches else n
        if size != n:  # up to a served size with the batch's own rows (state and order keep them)
            x = select_samples(x, torch.arange(size, device=device) % n)
        inputs = (x, self._valid_rows(size, n, device), self._threshold(rule, device))
        state, side_logits, confidence, exited, order, counts = self._stage("front", rule)(inputs)
        if size != n:  # the samples' answers; the state keeps every row for the gathers by ``order``
            side_logits, confidence, exited = side_logits[:n], confidence[:n], exited[:n]
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
        return front.order[: read[0]], bucketed_sizes(read[1:], front.state, self.length_buckets)

    @torch.no_grad()
    def rest(self, state: Any, rows: int | None = None) -> torch.Tensor:
        """Logits of the rest of the MainNet (after the last tap) on the first ``rows`` samples of
        ``state`` (all by default), run at the next row bucket with the state's own rows as padding."""
        n = state_rows(state)
        rows = n if rows is None else rows
        state = self._at_bucket(state, rows, self.model.splits[-1])
        return self._stage("rest", None)(state)[:rows].clone()

    def _at_bucket(self, state: Any, rows: int, split: Any) -> Any:
        """``state`` (whose first ``rows`` rows are samples) cut or padded with its own rows to the smallest
        row bucket that holds ``rows``, past its own rows too (a pooled rest); unbucketed past the largest."""
        n = state_rows(state)
        target = bucket_for(rows, self.rest_buckets, max(n, rows, *(self.rest_buckets or ())))
        if target == n:
            return state
        return split.select_sized(state, torch.arange(target, device=tree_leaves(state)[0].device) % n, ())

    @torch.no_grad()
    def continue_from(
        self, state: Any, profile: Any, mode: str = "adaptive", part: int = 1, rows: int | None = None
    ) -> AdaptiveOutput:
        """Answers for the first ``rows`` samples of ``state`` (all by default), which continue past
        SideNet ``part - 1`` (see :meth:`AdaptiveModel.continue_from`): the later SideNets' steps and the
        rest of the MainNet, each at a row bucket, with one host wait per later tap reached."""
        if mode != "adaptive":
            raise ValueError(f"the compiled serving mode routes adaptively only, got mode={mode!r}")
        model = self.model
        rows = state_rows(state) if rows is None else rows
        if part == model.num_taps:  # past the last SideNet
            return model.mainnet_answers(self.rest(state, rows), state, profile)
        state = self._at_bucket(state, rows, model.splits[part - 1])
        cost = model.flop_ledger.step(part, state, profile)
        valid = self._valid_rows(state_rows(state), rows, tree_leaves(state)[0].device)
        stage, inputs = self._step(part, state, valid)
        later, logits, confidence, exited, order, counts = stage(inputs)
        logits, confidence, exited = logits[:rows].clone(), confidence[:rows].clone(), exited[:rows].clone()
        output = AdaptiveOutput.at_tap(logits, exited, confidence, cost, part, model.num_taps)
        read = counts.tolist()  # this tap's one host wait
        order = order.clone() if self.reuses_outputs else order
        sizes = bucketed_sizes(read[1:], later, self.length_buckets)
        return self._go_on(output, later, order, read[0], sizes, profile, part)

    def _go_on(
        self, output: AdaptiveOutput, state: Any, order: torch.Tensor, count: int, sizes: tuple, profile: Any, part: int
    ) -> AdaptiveOutput:
        """``output`` (answers at SideNet ``part``) completed for the ``count`` samples that go on, the
        first of ``order`` (the state's rows, those that go on first): gathered from ``state`` (unless
        all go on) up to their row bucket, the rows after them in ``order`` padding it."""
        model = self.model
        if count == 0:
            output.answered_by_rest_count = 0
            return output
        # All go on: their state as it is (eager routing cuts nothing either); else gathered up to the bucket.
        rows = None if count == len(output.exited) else order[:count]
        if rows is not None:
            bucket = bucket_for(count, self.rest_buckets, state_rows(state))
            state = model.splits[part].select_sized(state, order[:bucket], sizes)
        if part + 1 == model.num_taps:  # past the last SideNet: the rest of the MainNet answers
            cost = model.flop_ledger.rest(state, None, profile, part=part)
            return output.answered_by_rest(rows, self.rest(state, count), cost)
        later = self.continue_from(state, profile, part=part + 1, rows=count)
        # A later SideNet ran: its score is the latest these samples got.
        return output.completed(rows, later, rescored=True)

    def finish(self, front: _CompiledFront) -> AdaptiveOutput:
        """The answers of a batch whose :meth:`front_pass` has run (the later stages on its continuing samples)."""
        remaining, sizes = self.continuing(front)
        output = front.answers(self.model.num_taps)
        return self._go_on(output, front.state, front.order, len(remaining), sizes, front.profile, 0)

    @torch.no_grad()
    def __call__(self, x: Any) -> AdaptiveOutput:
        """Classify a batch, as ``model(x)`` does (recorded in the model's monitor)."""
        return self._finish_recorded(self.front_pass(x))

    def stream(self, batches: Iterable[Any]) -> Iterator[AdaptiveOutput]:
        """Classify batches in order, each front queued before the previous batch's count is read, so
        that the host's wait overlaps the GPU's work on the next batch (a cascade's later taps wait as
        :meth:`__call__` does). Yields one output per batch."""
        pending: _CompiledFront | None = None
        for x in batches:
            with torch.no_grad():
                front = self.front_pass(x)
                if pending is not None:
                    yield self._finish_recorded(pending)
            pending = front
        if pending is not None:
            with torch.no_grad():
                yield self._finish_recorded(pending)

    def _finish_recorded(self, front: _CompiledFront) -> AdaptiveOutput:
        output = self.finish(front)
        self.model.record_batch(output, front.confidence)
        return output

    def pooled_router(self, rest_batch: int | None = None, max_wait: int = 4) -> PooledRouter:
        """A :class:`~sidenet.serving.PooledRouter` over this model's compiled stages."""
        return PooledRouter(self.model, rest_batch=rest_batch, max_wait=max_wait, stages=self)

    def _step(self, part: int, state: Any, valid: torch.Tensor | None = None) -> tuple[Stage, tuple]:
        """The stage of step ``part`` and its inputs for ``state``, whose rows ``valid`` (default all) are samples."""
        rule = self.model.policies[part]
        if valid is None:
            valid = self._valid_rows(state_rows(state), state_rows(state), tree_leaves(state)[0].device)
        return self._stage(f"step-{part}", rule), (state, valid, self._threshold(rule, valid.device))


def compile_for_serving(
    model: AdaptiveModel,
    example: Any,
    *,
    batch_sizes: Sequence[int] | None = None,
    rest_buckets: Sequence[int] | None = None,
    length_buckets: Sequence[int] | None = None,
    backend: Backend = "auto",
    rest_shapes: Literal["dynamic", "static"] = "dynamic",
    autotune: bool = False,
) -> CompiledAdaptiveModel:
    """Serve ``model`` with compiled or captured stages; returns a callable with ``model(x)``'s answers.

    Args:
        model: the adaptive model, one SideNet or a cascade (its thresholds and exit rules are read on
            every call).
        example: an input batch like the served ones (its device picks the backend; its batch size is
            served when ``batch_sizes`` is not given).
        batch_sizes: the batch sizes to compile or capture ahead; on CUDA a smaller batch of another size is
            padded to the next of them, a larger one captured when first seen (on the CPU: compiled when
            first seen).
        rest_buckets: the row counts the rest (and a cascade's steps) run at. Default on CUDA: powers
            of two from 2 (not 1: a compiled stage specialises on one row) up to the largest batch
            size, and that size; on the CPU none (the exact count).
        length_buckets: the lengths text batches are padded to. Default on CUDA:
            ``DEFAULT_LENGTH_BUCKETS``; on the CPU none.
        backend: ``auto`` (``inductor_cuda_graph`` on CUDA, ``inductor`` on the CPU), ``eager`` (the
            buckets only), ``inductor`` (``torch.compile``; on the CPU kept per stage where it measures
            faster), or, on CUDA, ``cuda_graph`` or ``inductor_cuda_graph`` (see the module docstring).
        rest_shapes: ``dynamic``: the compiled rest (and steps) one graph for all row buckets; ``static``:
            one per bucket (text: per row and length bucket), its convolutions laid out channels-last where
            inductor prefers (not for dynamic shapes). Needs ``rest_buckets``. For convolutional MainNets.
        autotune: compile the stages as ``torch.compile(mode="max-autotune")`` would (inductor times its
            candidate kernels for each shape and keeps the fastest; its own CUDA graphs left to the graph
            backends): minutes of compiling on a GPU, for the last few percent. Needs a compiling backend.

    Example::

        served = sidenet.compile_for_serving(model, next(iter(loader))[0])
        for output in served.stream(batches):
            ...
    """
    if not isinstance(model, AdaptiveModel):
        raise ValueError(f"compile_for_serving takes a sidenet.AdaptiveModel, got {type(model).__name__}")
    model.check_input(example)
    cuda = model.split.input_device(example).type == "cuda"
    sizes = sorted({int(b) for b in batch_sizes or [model.split.batch_size(example)]})
    backend, rest_buckets, length_buckets = stages.serving_settings(
        cuda, isinstance(example, Mapping), sizes, backend, rest_buckets, length_buckets, rest_shapes
    )
    if autotune and backend not in stages.COMPILING_BACKENDS:
        raise ValueError(f"autotune=True tunes torch.compile's kernels: backend={backend!r} compiles none")
    served = CompiledAdaptiveModel(model, backend, rest_buckets, length_buckets, rest_shapes, sizes, autotune)
    # Largest first: Dynamo compiles the front's first size with static shapes and later ones dynamic,
    # so the full batches (most of the traffic under load) keep the static graph.
    served.warm_up(example, sizes[::-1])
    return served
