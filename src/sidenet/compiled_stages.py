"""The pieces the compiled serving mode (:mod:`sidenet.compiled`) builds its stages from: the stage
functions (the front, a cascade's steps), a :class:`Stage` that runs one eagerly, compiled by
``torch.compile`` or replayed from CUDA graphs captured per input shape; the bucket a row count or a
length is padded to; and the short timing that decides, on the CPU, whether a compiled stage is kept."""

from __future__ import annotations

import functools
import itertools
import statistics
import time
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map

from sidenet.cuda_graphs import CudaGraphStage, shape_key
from sidenet.head import SideNet
from sidenet.policy import ExitPolicy
from sidenet.routing import continuing_first
from sidenet.splits import MainNetSplit

__all__ = ["GRAPH_BACKENDS", "ROW_SHAPES", "Stage", "bucket_for", "bucketed_sizes", "front_fn", "median_seconds"]
__all__ += ["AUTOTUNE_MODE", "BACKENDS", "COMPILING_BACKENDS", "DEFAULT_LENGTH_BUCKETS", "default_row_buckets"]
__all__ += ["padded_text", "serving_settings", "step_fn"]


def front_fn(splits: Sequence[MainNetSplit], sidenets: Sequence[SideNet], rule: ExitPolicy) -> Callable[[Any], tuple]:
    """The front stage of a model of ``splits`` and ``sidenets`` under ``rule``'s score: on ``(x, valid,
    threshold)``, trunk, first SideNet, exit score and mask, continuing samples first and their count
    (as :meth:`AdaptiveModel.front_pass` and :func:`continuing_first`, the threshold a 0-d tensor). Rows
    not ``valid`` pad the batch to a served size: they count as exited, so that they sort last and are
    not counted."""
    split, sidenet = splits[0], sidenets[0]

    def front(inputs: tuple[Any, torch.Tensor, torch.Tensor]) -> tuple:
        x, valid, threshold = inputs
        state = split.trunk(x)
        side_logits = sidenet(split.features(state))
        confidence = rule.confidence(side_logits)
        exited = confidence >= threshold  # rule.exits, the threshold an input
        order, counts = continuing_first(split, state, exited | ~valid)
        return state, side_logits, confidence, exited, order, counts

    return front


def step_fn(
    splits: Sequence[MainNetSplit], sidenets: Sequence[SideNet], rule: ExitPolicy, part: int
) -> Callable[[Any], tuple]:
    """A cascade's step to tap ``part`` under ``rule``'s score: on ``(state, valid, threshold)``, the
    segment from tap ``part - 1``, SideNet ``part``, exit score and mask, continuing samples first and
    their count. Rows not ``valid`` pad the state to its bucket: they count as exited, so that they sort
    last and are not counted."""
    before, split, sidenet = splits[part - 1], splits[part], sidenets[part]

    def step(inputs: tuple[Any, torch.Tensor, torch.Tensor]) -> tuple:
        state, valid, threshold = inputs
        state = before.advance(state, split)
        side_logits = sidenet(split.features(state))
        confidence = rule.confidence(side_logits)
        exited = confidence >= threshold  # rule.exits, the threshold an input
        order, counts = continuing_first(split, state, exited | ~valid)
        return state, side_logits, confidence, exited, order, counts

    return step


_STAGES = itertools.count()
# The backends whose stages replay CUDA graphs: their outputs are static tensors that the next replay
# overwrites. ``inductor_cuda_graph`` captures the kernels ``torch.compile`` generated (what its
# ``reduce-overhead`` mode does for a whole model), ``cuda_graph`` the eager ones.
GRAPH_BACKENDS = ("cuda_graph", "inductor_cuda_graph")
# The backends whose stages run torch.compile's kernels (so autotune applies to them).
COMPILING_BACKENDS = ("inductor", "inductor_cuda_graph")
ROW_SHAPES = ("fixed", "dynamic", "static")
BACKENDS = ("auto", "eager", "inductor", *GRAPH_BACKENDS)
DEFAULT_LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)
# torch.compile's mode for autotuned stages: max-autotune without its own CUDA graphs (the graph backends
# capture the stages themselves; a cudagraph tree inside a capture would fail).
AUTOTUNE_MODE = "max-autotune-no-cudagraphs"


def default_row_buckets(largest: int) -> list[int]:
    """The row buckets of the rest on CUDA by default: powers of two from 2 (not 1: a compiled stage
    specialises on one row) up to ``largest``, and ``largest`` itself."""
    return sorted({2**k for k in range(1, largest.bit_length()) if 2**k <= largest} | {largest})


def serving_settings(
    cuda: bool,
    text: bool,
    sizes: Sequence[int],
    backend: str,
    rest_buckets: Sequence[int] | None,
    length_buckets: Sequence[int] | None,
    rest_shapes: str,
) -> tuple[str, Sequence[int] | None, Sequence[int] | None]:
    """:func:`~sidenet.compiled.compile_for_serving`'s arguments checked and its defaults filled in for
    served batch ``sizes`` (sorted) on CUDA or the CPU: the backend, the row buckets and length buckets."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "inductor_cuda_graph" if cuda else "inductor"
    if backend in GRAPH_BACKENDS and not cuda:
        raise ValueError(f"backend={backend!r} needs the model and the example on a CUDA device")
    if sizes[0] < 1:
        raise ValueError(f"batch sizes must be positive, got {list(sizes)}")
    if rest_buckets is None and cuda:
        rest_buckets = sorted(set(default_row_buckets(sizes[-1])) | set(sizes))
    if length_buckets is None and cuda and text:
        length_buckets = DEFAULT_LENGTH_BUCKETS
    if rest_shapes not in ("dynamic", "static"):
        raise ValueError(f"rest_shapes must be 'dynamic' or 'static', got {rest_shapes!r}")
    if rest_shapes == "static" and not rest_buckets:
        # Without buckets every count of continuing samples would be a compilation of its own.
        raise ValueError(
            "rest_shapes='static' compiles a graph per row bucket: give rest_buckets (none by default on the CPU)"
        )
    return backend, rest_buckets, length_buckets


def own_code(fn: Callable[[Any], Any], name: str) -> Callable[[Any], Any]:
    """``fn`` called through a function whose code object is its own, named ``name``.

    Dynamo keeps compiled graphs, and counts recompilations against its limit (8), per code object. The
    stages built from one source (each later tap's step is the same closure over other modules; two served
    models' fronts; ``split.rest`` of several splits) would share one cache, and each module or shape one
    of them sees would be a recompilation: a cascade of four taps passed the limit and ran partly eager."""

    def call(x: Any) -> Any:
        return fn(x)

    code = call.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, call.__globals__, name, None, call.__closure__)


def bucket_for(value: int, buckets: Sequence[int] | None, ceiling: int) -> int:
    """The smallest bucket that holds ``value`` and is at most ``ceiling`` (``value`` itself without
    buckets, ``ceiling`` when no bucket fits)."""
    fitting = [b for b in buckets or () if value <= b <= ceiling]
    return min(fitting) if fitting else (ceiling if buckets else value)


def padded_text(x: Any, length_buckets: Sequence[int] | None) -> Any:
    """A text batch as a dict of its tensors in sorted key order (a captured graph copies inputs by
    position), padded with masked-out zeros to its length bucket; other inputs unchanged."""
    if not isinstance(x, Mapping):
        return x
    x = {key: x[key] for key in sorted(x) if isinstance(x[key], torch.Tensor) and key != "labels"}
    if not length_buckets:
        return x
    length = int(x["input_ids"].shape[1])
    target = bucket_for(length, length_buckets, max(length, max(length_buckets)))
    if target == length:
        return x
    return {key: F.pad(value, (0, target - length)) if value.ndim == 2 else value for key, value in x.items()}


def bucketed_sizes(read: Sequence[int], state: Any, length_buckets: Sequence[int] | None) -> tuple[int, ...]:
    """The selection sizes read with a count of continuing samples (see
    :meth:`~sidenet.splits.MainNetSplit.selection_sizes`), text's kept length rounded up to its bucket
    (at most the state's own length)."""
    sizes = tuple(read)
    if sizes and length_buckets:
        length = int(tree_leaves(state)[0].shape[1])
        sizes = (bucket_for(sizes[0], length_buckets, length), *sizes[1:])
    return sizes


def median_seconds(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one untimed call (a warm-up check, not a
    benchmark: see :func:`sidenet.timing.measure_throughput` for those)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rows_dynamic(compiled: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``compiled`` with the first dimension of its inputs marked dynamic before each call.

    A stage that runs at several row counts (the rest, a cascade's steps) is then compiled once for all of
    them, not first for the count it met first and again once Dynamo sees a second (its automatic dynamic
    shapes): on a GPU each compilation of a ResNet-50's rest costs tens of seconds of a server's start.
    One row stays static (Dynamo specialises sizes 0 and 1): the default row buckets start at two.

    The marks go on aliases (``detach``: the same storage, another tensor object), not on the caller's
    tensors: a mark stays on its tensor, and a state can hold the input's own tensors (text's attention
    mask when every sample continues), which the front stage, compiled at fixed batch sizes, must then
    refuse as marked dynamic but specialised."""

    def marked(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor) or not leaf.ndim or leaf.shape[0] < 2:
            return leaf
        alias = leaf.detach()
        torch._dynamo.mark_dynamic(alias, 0)
        return alias

    @functools.wraps(compiled)
    def call(x: Any) -> Any:
        return compiled(tree_map(marked, x))

    return call


def _per_shape(fn: Callable[[Any], Any], name: str, mode: str | None = None) -> Callable[[Any], Any]:
    """``fn`` compiled once per input shape, each shape its own static graph (``dynamic=False``, its own code
    object: no shape counts against another's recompilation limit).

    For a rest with convolutions on CUDA: inductor lays out a graph's convolutions channels-last only
    where their shapes are static (it skips that for symbolic shapes, pytorch/pytorch#102670), so one
    graph for all row counts runs them in the slower layout. The cost is one compilation per row bucket
    at start-up."""
    compiled: dict[tuple, Callable[[Any], Any]] = {}

    @functools.wraps(fn)
    def call(x: Any) -> Any:
        key = shape_key(x)
        if key not in compiled:
            compiled[key] = torch.compile(own_code(fn, f"{name}_{len(compiled)}"), dynamic=False, mode=mode)
        return compiled[key](x)

    call.compiled_shapes = compiled  # type: ignore[attr-defined]  # for tests and reports
    return call


class Stage:
    """One stage (a function of one argument: a tensor or a nesting of tensors) run eagerly, compiled by
    ``torch.compile``, or replayed from CUDA graphs captured per input shape (of the eager kernels, or of
    the compiled ones), in ``copies`` alternating copies so that the outputs of one call survive the
    next (see :meth:`~sidenet.compiled.CompiledAdaptiveModel.stream`).

    ``rows`` says how a compiled stage treats its first dimension: ``fixed`` (the front: compiled at the
    batch sizes it meets, Dynamo's default), ``dynamic`` (one graph for every row count) or ``static``
    (one graph per row count, see :func:`_per_shape`). ``autotune``: inductor benchmarks its kernel choices
    (``mode="max-autotune-no-cudagraphs"``: CUDA graphs, where wanted, are this class's own captures)."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        backend: str,
        copies: int = 1,
        name: str = "stage",
        rows: str = "fixed",
        autotune: bool = False,
    ) -> None:
        if rows not in ROW_SHAPES:
            raise ValueError(f"rows must be one of {ROW_SHAPES}, got {rows!r}")
        self.fn = fn
        self.backend = backend
        self.copies = copies
        self.name = name
        self.rows = rows
        self._turn = 0
        self._graphs: dict[tuple, CudaGraphStage] = {}
        self._compiled: Callable[[Any], Any] | None = None
        if backend in COMPILING_BACKENDS:
            code_name = f"sidenet_{name}_{next(_STAGES)}"
            mode = AUTOTUNE_MODE if autotune else None
            if rows == "static":
                self._compiled = _per_shape(fn, code_name, mode)
            else:
                compiled = torch.compile(own_code(fn, code_name), mode=mode)
                self._compiled = _rows_dynamic(compiled) if rows == "dynamic" else compiled
        self.capture_seconds = 0.0

    def __call__(self, x: Any) -> Any:
        if self.backend in GRAPH_BACKENDS:
            self._turn = (self._turn + 1) % self.copies
            key = (self._turn, shape_key(x))
            if key not in self._graphs:
                start = time.perf_counter()
                self._graphs[key] = self._capture(x)
                self.capture_seconds += time.perf_counter() - start
            return self._graphs[key](x)
        if self.backend == "inductor" and self._compiled is not None:
            return self._compiled(x)
        return self.fn(x)

    def _capture(self, x: Any) -> CudaGraphStage:
        """A CUDA graph of this stage at ``x``'s shapes: of the compiled kernels where the backend says so
        and they can be captured (compiled during the capture's warm-up runs), else of the eager ones."""
        if self.backend == "inductor_cuda_graph" and self._compiled is not None:
            try:
                return CudaGraphStage(self._compiled, x)
            except Exception as exc:  # e.g. a compiled op that synchronises: the eager kernels still capture
                warnings.warn(
                    f"sidenet: the compiled kernels of stage {self.name!r} could not be captured in a CUDA graph "
                    f"({type(exc).__name__}: {str(exc)[:200]}); it captures its eager kernels from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.backend = "cuda_graph"
        return CudaGraphStage(self.fn, x)

    def keep_if_faster(self, x: Any) -> str:
        """On the CPU: fall back to eager unless the compiled form measures faster on ``x``; returns the
        backend kept."""
        if self.backend == "inductor":
            compiled = median_seconds(lambda: self(x))
            if median_seconds(lambda: self.fn(x)) <= compiled:
                self.backend = "eager"
        return self.backend
