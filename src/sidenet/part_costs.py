"""What each part of a routed MainNet costs in time where it runs, and tap choices priced by that time.

The tap and threshold choices (:func:`~sidenet.cascade_choice.choose_taps`, the curves' ``relative_compute``)
weigh compute in FLOPs. Time does not follow FLOPs evenly through a network: early layers move more bytes
per FLOP (large activations, few channels), so on a GPU the first stage of a ResNet-50 took 50-54% of the
compiled MainNet's time for 19% of its FLOPs (BENCHMARKS.md, GPU section), and on a 2-core CPU the trunk and
SideNet of the Fashion-MNIST ResNet-20 take 18% of its time for 13% of its FLOPs (BENCHMARKS.md). A choice made in FLOPs
then overrates early taps. Here each part (every MainNet segment between taps, every SideNet) is timed on
a batch as the model runs it (:func:`measure_part_seconds`), and :func:`time_weighted` prices a
:class:`~sidenet.cascade_record.CascadeRecord` by those times, so that the same choices minimise time:

    seconds = sidenet.measure_part_seconds(cascade, batch)          # on the serving device, dtype, batch
    choice = sidenet.choose_taps(sidenet.time_weighted(record, seconds), max_accuracy_drop=0.5)

Parts are timed as the eager model runs them (each part alone, device-synchronised; on CUDA each replayed
from its own CUDA graph), not compiled. With ``rows`` they are also timed on fewer samples, and so is
routing's own work (:mod:`sidenet.routing_steps`: at each tap, and once per batch), for
:func:`sidenet.forecast_batch_time`. A sample's share of a part's time follows its share of the part's FLOPs
(text: its length).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sidenet.cascade_record import CascadeRecord, part_flops, states_at_taps
from sidenet.routing_steps import batch_step, routing_step
from sidenet.splits.base import select_samples
from sidenet.timing import measure_throughput

if TYPE_CHECKING:
    from sidenet.routing import AdaptiveModel

__all__ = ["PartSeconds", "batch_row_counts", "measure_part_seconds", "time_weighted"]


@dataclass(frozen=True)
class PartSeconds:
    """Seconds per sample of each part of a (cascade) model, measured on one batch (or the mean of several).

    Attributes:
        segments: K + 1 MainNet segments, as :class:`~sidenet.cascade_record.CascadeRecord` orders them
            (input -> tap 0, tap k-1 -> tap k, last tap -> logits).
        sides: K SideNets (features and head; the exit score is not timed).
        batch_size, device, dtype: the batch the parts were timed on, and where.
        repeats: timed runs of each part (the median is kept).
        taps: the K taps' names, for :meth:`describe`.
        graphs: each part was replayed from a CUDA graph of its own (no launch cost per kernel), not eager.
        segment_flops, side_flops: the same parts' FLOPs per sample on that batch (the model's counter), to
            set the time beside.
        rows: the row counts each part was also timed at (ascending, the batch's own last; empty: the
            batch alone), with ``segment_calls``/``side_calls`` the seconds of one call of each part at each
            of them: a routed batch runs its later parts on its continuing rows only, and a call on few rows
            costs more than their share of a full batch (:func:`sidenet.forecast_batch_time` reads them).
            ``route_calls``: per tap, one routing step on that many rows (the SideNet's scores, the tap's
            answers, the count of continuing rows read, half of the rows gathered, their FLOPs looked up
            and their answers filed back): what routing adds between the parts; never in a CUDA graph (it
            reads the count from the device). ``batch_calls``: once per batch of that many rows, routing's
            work before and after the taps (the input checks, the eval-mode check, the FLOPs profile
            looked up, the batch counted in a monitor).
        batches: how many batches of ``batch_size`` the seconds are the mean of (:meth:`mean`).
    """

    segments: tuple[float, ...]
    sides: tuple[float, ...]
    batch_size: int
    device: str
    dtype: str
    repeats: int
    taps: tuple[str, ...] = ()
    segment_flops: tuple[float, ...] = ()
    side_flops: tuple[float, ...] = ()
    graphs: bool = False
    rows: tuple[int, ...] = ()
    segment_calls: tuple[tuple[float, ...], ...] = ()
    side_calls: tuple[tuple[float, ...], ...] = ()
    route_calls: tuple[tuple[float, ...], ...] = ()
    batch_calls: tuple[float, ...] = ()
    batches: int = 1

    @classmethod
    def mean(cls, timings: Sequence[PartSeconds]) -> PartSeconds:
        """One timing from several of one model on different batches of one size: every part's seconds (per
        sample, per call, per routing step) and FLOPs averaged, ``batches`` counting the batches. A forecast
        from it prices the mean batch: text batches differ in length, and the timing of one batch of SST-2
        set a cascade's forecast anywhere from 2.24x to 2.57x (BENCHMARKS.md, "Cascade of SideNets"). Raises
        ``ValueError`` for no timings, or timings of other taps, batch sizes, row counts, devices, dtypes or
        capture (graphs)."""
        if not timings:
            raise ValueError("no timings to average")
        first, keys = timings[0], ("taps", "batch_size", "rows", "device", "dtype", "graphs")
        for other in timings[1:]:
            differ = [key for key in keys if getattr(other, key) != getattr(first, key)]
            routing = ("route_calls", "batch_calls")
            differ += [key for key in routing if bool(getattr(other, key)) != bool(getattr(first, key))]
            if differ:
                raise ValueError(
                    f"the timings differ in {', '.join(differ)}: average timings of one model on batches of one size"
                )

        def averaged(name: str) -> tuple:
            mean = np.mean([np.asarray(getattr(t, name), dtype=np.float64) for t in timings], axis=0)
            return tuple(map(tuple, mean.tolist())) if mean.ndim == 2 else tuple(mean.tolist())

        names = ("segments", "sides", "segment_flops", "side_flops", "segment_calls", "side_calls")
        names += ("route_calls", "batch_calls")
        return replace(first, **{name: averaged(name) for name in names}, batches=sum(t.batches for t in timings))

    @property
    def mainnet(self) -> float:
        """Seconds per sample of the MainNet alone (its segments)."""
        return sum(self.segments)

    def shares(self) -> dict[str, list[float]]:
        """Each part's time as a share of the MainNet's."""
        return {
            "segments": [s / self.mainnet for s in self.segments],
            "sides": [s / self.mainnet for s in self.sides],
        }

    def flops_shares(self) -> dict[str, list[float]] | None:
        """Each part's FLOPs as a share of the MainNet's (None where they were not counted)."""
        if not self.segment_flops:
            return None
        total = sum(self.segment_flops)
        return {"segments": [f / total for f in self.segment_flops], "sides": [f / total for f in self.side_flops]}

    def describe(self) -> str:
        """One sentence: each part's share of the MainNet's time, beside its share of the FLOPs."""
        names = [f"to `{self.taps[0]}`" if self.taps else "trunk"]
        names += [f"`{a}` to `{b}`" for a, b in zip(self.taps, self.taps[1:], strict=False)]
        names.append("the rest")
        flops = self.flops_shares()
        shares = self.shares()

        def share(kind: str, k: int) -> str:
            counted = f" ({100 * flops[kind][k]:.1f}%)" if flops else ""
            return f"{100 * shares[kind][k]:.1f}%{counted}"

        segments = ", ".join(f"{name} {share('segments', k)}" for k, name in enumerate(names))
        sides = ", ".join(share("sides", k) for k in range(len(self.sides)))
        of = " (of its FLOPs)" if flops else ""
        sidenets = "the SideNets" if len(self.sides) > 1 else "the SideNet"
        batches = "one batch" if self.batches == 1 else f"{self.batches} batches"
        return (
            f"Where the time goes (each part alone, {'in a CUDA graph' if self.graphs else 'eager'}, on {batches} "
            f"of {self.batch_size} on {self.device} in "
            f"{self.dtype}), as a share of the MainNet's time{of}: {segments}; {sidenets} {sides}."
        )

    def call_seconds(self, kind: str, index: int, rows: np.ndarray) -> np.ndarray:
        """Seconds of one call of part ``index`` of ``kind`` (``"segments"``, ``"sides"``, ``"routes"``, or
        ``"batches"`` with index 0: routing's once-per-batch work) on each of ``rows`` rows: linear between the
        row counts it was timed at (beyond the largest, along its last step; 0 rows cost nothing). Timed on
        the batch alone, a call costs its rows' share of that batch, and routing nothing."""
        rows = np.asarray(rows, dtype=np.float64)
        calls = {
            "segments": self.segment_calls,
            "sides": self.side_calls,
            "routes": self.route_calls,
            "batches": (self.batch_calls,) if self.batch_calls else (),
        }.get(kind)
        if calls is None:
            raise ValueError(f"kind is 'segments', 'sides', 'routes' or 'batches', got {kind!r}")
        if kind == "batches" and index != 0:
            raise ValueError(f"routing's once-per-batch work is one call: index 0, got {index}")
        if kind in ("routes", "batches") and not calls:  # not timed: routing costs nothing in the per-sample price
            return np.zeros(np.shape(rows))
        if calls:
            counts, seconds = np.asarray(self.rows, dtype=np.float64), np.asarray(calls[index], dtype=np.float64)
        else:  # the batch alone: a call costs its rows' share of it (the per-sample price)
            per_sample = (self.segments if kind == "segments" else self.sides)[index]
            counts, seconds = np.array([0.0, self.batch_size]), np.array([0.0, per_sample * self.batch_size])
        inside = np.interp(rows, counts, seconds)
        if len(counts) > 1:  # np.interp holds the last value: continue along the last step instead
            slope = (seconds[-1] - seconds[-2]) / (counts[-1] - counts[-2])
            inside = np.where(rows > counts[-1], seconds[-1] + slope * (rows - counts[-1]), inside)
        return np.where(rows > 0, inside, 0.0)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> PartSeconds:
        """The timing :meth:`to_dict` wrote (e.g. in a saved SideNet's threshold choice)."""
        tuples = ("segments", "sides", "taps", "segment_flops", "side_flops", "rows", "batch_calls")
        nested = ("segment_calls", "side_calls", "route_calls")
        fields = {name: saved[name] for name in cls.__dataclass_fields__ if name in saved}
        return cls(
            **{
                name: tuple(map(tuple, value)) if name in nested else tuple(value) if name in tuples else value
                for name, value in fields.items()
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "segments": list(self.segments),
            "sides": list(self.sides),
            "batch_size": self.batch_size,
            "device": self.device,
            "dtype": self.dtype,
            "repeats": self.repeats,
            "taps": list(self.taps),
            "segment_flops": list(self.segment_flops),
            "side_flops": list(self.side_flops),
            "graphs": self.graphs,
            "rows": list(self.rows),
            "segment_calls": [list(calls) for calls in self.segment_calls],
            "side_calls": [list(calls) for calls in self.side_calls],
            "route_calls": [list(calls) for calls in self.route_calls],
            "batch_calls": list(self.batch_calls),
            "batches": self.batches,
            "shares": self.shares(),
            "flops_shares": self.flops_shares(),
        }


@torch.no_grad()
def measure_part_seconds(
    model: AdaptiveModel,
    inputs: Any,
    repeats: int = 7,
    graphs: bool | None = None,
    rows: Sequence[int] | None = None,
) -> PartSeconds:
    """Time each part of ``model`` (one SideNet or a cascade) on the batch ``inputs``, as ``model(inputs)``
    takes it, on the model's device and dtype: every MainNet segment between taps and every SideNet, each
    run alone ``repeats`` times after a warm-up run. Time the batch size and precision you serve at: the
    shares change with both.

    ``rows``: also time every part on the first ``m`` samples of the batch for each ``m`` given (at most
    the batch's size; the batch itself is always timed), as a routed batch runs its later parts on its
    continuing samples only; :func:`forecast_batch_time` reads those calls. :func:`batch_row_counts` gives
    powers of two up to the batch. Default: the batch alone.

    ``graphs``: replay each part from a CUDA graph captured on these inputs (default: on a CUDA device).
    Eager, a part's time on a GPU is mostly the host launching its kernels (a ResNet-50 in bfloat16 at batch
    64: 8.0 ms eager, 3.4 ms compiled in CUDA graphs; issue 13), which counts kernels, not work; captured,
    it is its kernels' time, as the compiled serving mode runs it (without inductor's fusion). A part that
    cannot be captured is timed eager, with a warning. Raises ``ValueError`` for inputs the model refuses,
    ``repeats < 1``, ``graphs=True`` off CUDA, or row counts outside [1, batch size]."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    model.check_input(inputs)
    cuda = model.split.input_device(inputs).type == "cuda"
    if graphs and not cuda:
        raise ValueError("graphs=True replays each part from a CUDA graph: it needs the model and inputs on CUDA")
    graphs = cuda if graphs is None else graphs
    splits = model.splits
    n = splits[0].batch_size(inputs)
    if any(isinstance(m, bool) or int(m) != m for m in rows or ()):
        raise ValueError(f"row counts must be whole numbers, got {list(rows or ())}")
    counts = sorted({*(int(m) for m in rows or ()), n})
    if counts[0] < 1 or counts[-1] > n:
        raise ValueError(f"row counts must lie in [1, {n}] (the batch's size), got {sorted(rows or ())}")
    for split in splits:
        split.ensure_eval()
    full = states_at_taps(model, splits[0].trunk(inputs))
    segment_flops, side_flops = part_flops(model, inputs, full)
    k, on_rows = len(splits), len(counts) > 1  # on_rows: timed on fewer rows too, routing steps included
    runners: dict[tuple[int, int], Callable[[Any], Any]] = {}
    for m in counts:
        # The first m samples: the trunk on their inputs, later parts on their states as routing selects
        # them (text: padding cut to the longest of them).
        head = torch.arange(m, device=splits[0].input_device(inputs))
        x = inputs if m == n else select_samples(inputs, head)
        states = full if m == n else states_at_taps(model, splits[0].select(full[0], head))
        # Each part a function of its input and that input: the batch, or the state at a tap.
        parts: list[tuple[Callable[[Any], Any], Any]] = [(splits[0].trunk, x)]
        parts += [(lambda s, j=j: splits[j - 1].advance(s, splits[j]), states[j - 1]) for j in range(1, k)]
        parts += [(splits[-1].rest, states[-1])]
        parts += [(lambda s, j=j: model.side_logits(s, j), states[j]) for j in range(k)]
        if graphs:
            parts = [(_captured(fn, arg), arg) for fn, arg in parts]
        if on_rows:  # routing's own work, where a forecast of routed batches needs it: never captured (it
            profile = model.flop_profile(x)  # reads the count), between the parts and once per batch
            parts += [routing_step(model, j, states[j], profile) for j in range(k)]
            parts.append(batch_step(model, x, states[0]))
        runners |= {(m, i): (lambda _, fn=fn, arg=arg: fn(arg)) for i, (fn, arg) in enumerate(parts)}
    # Interleaved rounds (A B C A B C ...: drift of the machine's speed falls on every part alike), each run
    # synchronised; one "batch" per run, since each part brings its own input.
    named = {f"{m}:{i}": run for (m, i), run in runners.items()}
    timed = measure_throughput(named, [None], repeats=repeats, batch_size=lambda _: 1)
    parts_timed = 3 * k + 2 if on_rows else 2 * k + 1
    calls = [[timed[f"{m}:{i}"].median for m in counts] for i in range(parts_timed)]  # per part, per row count
    segments, sides, routes = calls[: k + 1], calls[k + 1 : 2 * k + 1], calls[2 * k + 1 : 3 * k + 1]
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    return PartSeconds(
        segments=tuple(s[-1] / n for s in segments),
        sides=tuple(s[-1] / n for s in sides),
        batch_size=n,
        device=str(splits[0].input_device(inputs)),
        dtype=str(reference.dtype).removeprefix("torch.") if reference is not None else "unknown",
        repeats=repeats,
        taps=tuple(str(tap) for tap in model.taps),
        segment_flops=tuple(segment_flops),
        side_flops=tuple(side_flops),
        graphs=bool(graphs),
        rows=tuple(counts) if on_rows else (),
        segment_calls=tuple(map(tuple, segments)) if on_rows else (),
        side_calls=tuple(map(tuple, sides)) if on_rows else (),
        route_calls=tuple(map(tuple, routes)),
        batch_calls=tuple(calls[-1]) if on_rows else (),
    )


def batch_row_counts(batch_size: int) -> list[int]:
    """1, 2, 4, ... below ``batch_size``, then ``batch_size``: the row counts to time parts at
    (:func:`measure_part_seconds`'s ``rows``) for a forecast of routed batches of that size."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    return [*(2**e for e in range(batch_size.bit_length()) if 2**e < batch_size), batch_size]


def _captured(fn: Callable[[Any], Any], example: Any) -> Callable[[Any], Any]:
    """``fn`` replayed from a CUDA graph captured on ``example``; ``fn`` itself where capture fails."""
    # The serving layer's graphs, imported only where a part is captured (on CUDA).
    from sidenet.cuda_graphs import capture_cuda_graph

    try:
        return capture_cuda_graph(fn, example)
    except Exception as exc:  # e.g. an operation that synchronises: the part is still timed, eager
        warnings.warn(
            f"sidenet: a part could not be captured in a CUDA graph ({type(exc).__name__}: {str(exc)[:200]}); "
            "it is timed eager",
            RuntimeWarning,
            stacklevel=3,
        )
        return fn


def _priced(flops: np.ndarray, seconds: tuple[float, ...]) -> np.ndarray:
    """Per-sample seconds of each column of ``flops`` (N, P): the column's measured seconds per sample,
    spread over the samples in proportion to their FLOPs there (even where the column counts none)."""
    measured = np.asarray(seconds, dtype=np.float64)
    mean = flops.mean(axis=0)
    counted = mean > 0
    cost = np.broadcast_to(measured, flops.shape).copy()
    cost[:, counted] = flops[:, counted] * (measured[counted] / mean[counted])
    return cost


def time_weighted(record: CascadeRecord, seconds: PartSeconds) -> CascadeRecord:
    """``record`` priced in time: its ``segment_flops`` and ``side_flops`` replaced by seconds per sample
    from ``seconds`` (:func:`measure_part_seconds` on the same taps), so that the curves and choices that
    read it (:class:`~sidenet.cascade_curve.CascadeCurve`, :func:`~sidenet.cascade_choice.choose_taps`)
    minimise time: ``relative_compute`` is then a share of the MainNet's measured time. Its FLOPs columns
    hold seconds from then on; keep the original record for FLOPs."""
    k = record.confidence.shape[1]
    if len(seconds.segments) != k + 1 or len(seconds.sides) != k:
        raise ValueError(
            f"the record has {k} SideNet(s) and {k + 1} segments; the timing has {len(seconds.sides)} and "
            f"{len(seconds.segments)}: time the model whose taps the record scored"
        )
    if min(seconds.segments + seconds.sides) < 0:
        raise ValueError("part seconds must not be negative")
    return replace(
        record,
        segment_flops=_priced(record.segment_flops, seconds.segments),
        side_flops=_priced(record.side_flops, seconds.sides),
    )
