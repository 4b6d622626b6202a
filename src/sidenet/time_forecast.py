"""What a routed model's batches will cost in time, forecast from each part's measured calls.

Priced per sample (:func:`sidenet.time_weighted`), a part costs each sample that reaches it its share of
the part's time on a full batch. A routed batch does not run that way: its later parts (deeper segments,
later SideNets, the rest of the MainNet) run once per batch on the few rows still going, and a call on few
rows costs far more than their share of a full batch (fixed costs per call: kernel launches, Python, weights
read once whatever the rows), so a batch of which a few samples continue pays several times what the
per-sample price says for them. :func:`forecast_batch_time` prices whole batches instead: batches drawn
from a record's samples, each part charged one call on the rows that reach it, at its time measured on
that many rows (:func:`sidenet.measure_part_seconds` with ``rows``).

Routing's own work is charged as timed (:mod:`sidenet.routing_steps`): at each tap (scores, the count read,
the gather, the answers filed back) on the rows reaching it, with half of them going on (``route_calls``),
and once per batch (input checks, the monitor: ``batch_calls``). What it leaves out: the lengths of text
beyond those of the timed batches: a text part's time depends on which rows a batch holds (its padding is cut
to the longest of them), so text is timed on several batches and priced at their mean
(:func:`measure_part_seconds_over`, :func:`timing_batch_count`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from sidenet.cascade_curve import exit_stages
from sidenet.cascade_record import CascadeRecord, checked_columns
from sidenet.part_costs import PartSeconds, batch_row_counts, measure_part_seconds
from sidenet.splits.base import MainNetSplit

if TYPE_CHECKING:
    from sidenet.routing import AdaptiveModel

__all__ = ["batch_time_rank", "forecast_batch_time", "measure_part_seconds_over", "timed_parts", "timing_batch_count"]

# Batches to time a text model's parts on: one batch's lengths set an SST-2 cascade's forecast anywhere from
# 2.24x to 2.57x over eight batches of 32, where routing measured 2.31x; their mean of four said 2.38x
# (BENCHMARKS.md, "Cascade of SideNets").
TEXT_TIMING_BATCHES = 4


def forecast_batch_time(
    record: CascadeRecord | np.ndarray,
    seconds: PartSeconds,
    thresholds: Sequence[float],
    *,
    columns: Sequence[int] | None = None,
    batch_size: int | None = None,
    draws: int = 16,
    seed: int = 0,
) -> float:
    """The routed model's time per batch as a fraction of the MainNet's, at ``thresholds``.

    Args:
        record: the candidates' record (:func:`sidenet.collect_cascade`; only its scores are read), or those
            scores alone: (N, K), or (N,) for one SideNet.
        seconds: those candidates' parts timed (:func:`sidenet.measure_part_seconds`), best with ``rows``
            (:func:`sidenet.batch_row_counts`); timed on the batch alone, a call costs its rows' share of
            that batch and the forecast is the per-sample price.
        thresholds: one per kept SideNet.
        columns: the kept SideNets (sorted indices into the record's; default all): a sub-cascade runs the
            segments between its taps as one, timed as the sum of theirs.
        batch_size: the served batch (default: the timed one; capped at the record's samples).
        draws, seed: ``draws`` random orders of the record's samples, each cut into full batches; the
            forecast is their mean time per batch.

    Each batch pays the trunk and the first SideNet on all its rows; every later part once on the rows that
    reach it (none: nothing); routing's work at each tap it reaches, and once per batch, as timed (none where
    the timing has no ``rows``). The MainNet alone pays its segments on the full batch. Raises ``ValueError``
    for a timing of other taps than the record's, bad columns or thresholds, or ``batch_size < 1``.
    """
    scores = record.confidence if isinstance(record, CascadeRecord) else np.asarray(record, dtype=np.float64)
    scores = scores.reshape(len(scores), -1)
    k = scores.shape[1]
    if len(seconds.segments) != k + 1 or len(seconds.sides) != k:
        raise ValueError(
            f"the record has {k} SideNet(s); the timing has {len(seconds.sides)}: time the model whose taps the "
            "record scored"
        )
    cols = list(range(k)) if columns is None else checked_columns(columns, k)
    stages = exit_stages(scores[:, cols], thresholds)  # validates the thresholds
    n = len(scores)
    if n == 0:
        raise ValueError("no samples to forecast on")
    batch = seconds.batch_size if batch_size is None else int(batch_size)
    if batch < 1 or draws < 1:
        raise ValueError(f"batch_size and draws must be positive, got {batch} and {draws}")
    batch = min(batch, n)
    # Which original segments each part of the sub-cascade runs: up to its first tap, between its taps, after.
    bounds = [0, *(c + 1 for c in cols), k + 1]
    runs = [range(bounds[i], bounds[i + 1]) for i in range(len(cols) + 1)]

    def segment(i: int, rows: np.ndarray) -> np.ndarray:
        return sum((seconds.call_seconds("segments", j, rows) for j in runs[i]), np.zeros(len(rows)))

    # Rows reaching each part, per batch: part i >= 1 (segment i, SideNet i) runs on the rows that did not
    # exit before it, i.e. whose exit stage is at least i.
    rng = np.random.default_rng(seed)
    per_batch = n // batch
    orders = np.stack([rng.permutation(n)[: per_batch * batch] for _ in range(draws)]).reshape(-1, batch)
    batch_stages = stages[orders]
    reach = np.stack([(batch_stages >= i).sum(axis=1) for i in range(len(cols) + 1)], axis=1)  # (batches, k'+1)
    routed = sum(segment(i, reach[:, i]) for i in range(len(cols) + 1))
    routed = routed + sum(seconds.call_seconds("sides", c, reach[:, i]) for i, c in enumerate(cols))
    # Routing at each kept tap, on the rows that reach it (timed at the original tap: same state, same rule).
    routed = routed + sum(seconds.call_seconds("routes", c, reach[:, i]) for i, c in enumerate(cols))
    routed = routed + seconds.call_seconds("batches", 0, reach[:, 0])  # once per batch, on all its rows
    full = np.array([batch], dtype=np.float64)
    mainnet = sum(float(seconds.call_seconds("segments", j, full)[0]) for j in range(k + 1))
    if not mainnet > 0:
        raise ValueError("the MainNet's timed segments sum to no time: nothing to compare with")
    return float(np.mean(routed) / mainnet)


def batch_time_rank(seconds: PartSeconds) -> Callable[[tuple[int, ...], CascadeRecord, Sequence[float]], float]:
    """:func:`forecast_batch_time` from ``seconds`` as :func:`~sidenet.cascade_choice.choose_taps`'s ``rank``:
    subsets of taps compared by what their routed batches will cost."""

    def rank(columns: tuple[int, ...], record: CascadeRecord, thresholds: Sequence[float]) -> float:
        return forecast_batch_time(record, seconds, thresholds, columns=columns)

    return rank


def timing_batch_count(model: AdaptiveModel) -> int:
    """How many batches to time ``model``'s parts on: several (:data:`TEXT_TIMING_BATCHES`) where a part's time
    depends on which samples a batch holds, not only on how many (text: padding cut to the longest of the
    rows selected, :meth:`~sidenet.MainNetSplit.selection_sizes`), else one (images of one size)."""
    by_content = any(type(split).selection_sizes is not MainNetSplit.selection_sizes for split in model.splits)
    return TEXT_TIMING_BATCHES if by_content else 1


def measure_part_seconds_over(
    model: AdaptiveModel,
    batches: Sequence[Any],
    repeats: int = 7,
    graphs: bool | None = None,
    rows: Sequence[int] | None = None,
) -> PartSeconds:
    """:func:`~sidenet.measure_part_seconds` on each of ``batches`` of the first one's size (a smaller last
    batch is left out), averaged (:meth:`PartSeconds.mean`): the time of the mean batch, where one batch's
    lengths would set it (text; see :func:`timing_batch_count`). Raises ``ValueError`` for no batches."""
    if not batches:
        raise ValueError("no batches to time the parts on")
    size = model.split.batch_size(batches[0])
    same = [batch for batch in batches if model.split.batch_size(batch) == size]
    return PartSeconds.mean([measure_part_seconds(model, batch, repeats, graphs, rows) for batch in same])


def timed_parts(
    model: AdaptiveModel,
    batches: Sequence[Any],
    scores: np.ndarray,
    points: Mapping[Any, Sequence[float] | float],
    repeats: int,
    compile_backend: str | None,
) -> tuple[PartSeconds, dict[Any, float] | None]:
    """Where a report's time goes (every part timed ``repeats`` times on the first of its timing ``batches``,
    or on the first few for text: :func:`timing_batch_count`) and, where the model was routed eagerly on the
    CPU (no ``compile_backend``), each of ``points`` (thresholds, or vectors by name) forecast per routed
    batch on the evaluation ``scores``, beside what the report measures there. Elsewhere no forecast:
    compiled stages, or a GPU's parts replayed from CUDA graphs, are not what eager routing runs."""
    eager = compile_backend is None and model.split.input_device(batches[0]).type == "cpu"
    rows = batch_row_counts(model.split.batch_size(batches[0])) if eager else None
    parts = measure_part_seconds_over(model, batches[: timing_batch_count(model)], repeats, rows=rows)
    if not eager:
        return parts, None
    vectors = {key: np.atleast_1d(np.asarray(point, dtype=np.float64)).tolist() for key, point in points.items()}
    return parts, {key: forecast_batch_time(scores, parts, vector) for key, vector in vectors.items()}
