"""Which threshold vectors to try on a cascade, and which taps to keep (issue 14, item 2).

A cascade of K SideNets has K thresholds; :class:`~sidenet.cascade_curve.CascadeCurve` needs a path of
vectors, one knob from the safest (all never) to the most aggressive. Families (:data:`FAMILIES`):

- ``"shared"``: one threshold for every SideNet, as Shallow-Deep Networks (Kaya et al. 2019) exit at
  the first internal classifier whose confidence clears one threshold, and as CALM (Schuster et al.
  2022) calibrates one threshold across layers with Learn then Test.
- ``"equal_disagreement"``: knob eps; SideNet k gets the lowest threshold at which, among the samples
  it would exit, at most eps disagree with the MainNet: every SideNet exits at the same precision.
  Computed on every sample (``"equal_disagreement"``) or on the samples that reach SideNet k given
  the earlier thresholds (``"equal_disagreement_reached"``).
- ``"geometric"``: knob q; SideNet k exits the share q of the samples that reach it, the rule MSDNet
  (Huang et al. 2018) uses to set its thresholds for budgeted batch classification.

:func:`search_thresholds` refines one vector by exact coordinate descent on the data (no guarantee), a
comparison point; :func:`choose_taps` picks the subset of SideNets (exhaustive or greedy forward).

Measured (paths built on one synthetic record of 5,000 samples, evaluated on a fresh one; least compute
at a 0.5 or 1 point drop; 20 seeds; ResNet-like 6 taps and BERT-like 5 taps, SideNets calibrated alike
or not): the three per-SideNet families are within 0.2 points of compute of each other on average
(equal_disagreement 0.528, reached 0.526, geometric 0.527 of the MainNet) and 0.8 points better than
shared (0.536), which loses 1.3 to 1.9 points wherever SideNets differ in calibration and ties where
they do not. The default is ``equal_disagreement``: as good, and its thresholds only fall along the
path, so every sample's cost only falls and compute is monotone along it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sidenet.cascade_curve import CascadeCurve, CascadeRecord, Thresholds, exit_stages
from sidenet.curve import _as_number, _point_thresholds
from sidenet.policy import NEVER_EXIT

__all__ = ["FAMILIES", "DEFAULT_FAMILY", "CascadeChoice", "threshold_path", "search_thresholds", "choose_taps"]

FAMILIES = ("shared", "equal_disagreement", "equal_disagreement_reached", "geometric")
DEFAULT_FAMILY = "equal_disagreement"


class _Grid:
    """The candidate thresholds of one score column: between neighbouring distinct float32 scores,
    never on a sample's own (see :func:`sidenet.curve._point_thresholds`), from never (index 0) to 0.
    Grid point j exits exactly the samples whose ``rank`` (position from the highest score) is below
    ``ends[j]``."""

    def __init__(self, scores: np.ndarray) -> None:
        self.order = np.argsort(-scores, kind="stable")
        ordered = scores[self.order]
        changes = np.flatnonzero(np.diff(ordered.astype(np.float32)) != 0) + 1
        self.ends = np.unique(np.concatenate([[0], changes, [len(scores)]]))
        self.thresholds = _point_thresholds(ordered, self.ends)
        self.rank = np.empty(len(scores), dtype=np.int64)
        self.rank[self.order] = np.arange(len(scores))

    def counts(self, values: np.ndarray) -> np.ndarray:
        """For each grid point, the sum of ``values`` over the samples it exits."""
        return np.concatenate([[0.0], np.cumsum(values[self.order], dtype=np.float64)])[self.ends]


def _thin(count: int, points: int | None) -> np.ndarray:
    """At most ``points`` indices spread evenly over ``range(count)``, both ends kept."""
    if points is None or count <= points:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, points).round().astype(np.int64))


def _dedupe(path: list[Thresholds]) -> list[Thresholds]:
    """The path without consecutive repeats (equal vectors are one point), starting at all-never."""
    out: list[Thresholds] = [(NEVER_EXIT,) * len(path[0])] if path else []
    for vector in path:
        if vector != out[-1]:
            out.append(vector)
    return out


def _sequential(record: CascadeRecord, grids: list[_Grid], pick: Callable[[int, _Grid, np.ndarray], int]) -> Thresholds:
    """Thresholds set tap by tap: ``pick(k, grid, reached)`` returns SideNet k's grid index given the
    samples that reach it; the samples it exits stop reaching the next ones."""
    reached = np.ones(len(record), dtype=bool)
    vector = []
    for k, grid in enumerate(grids):
        j = pick(k, grid, reached)
        vector.append(float(grid.thresholds[j]))
        reached &= grid.rank >= grid.ends[j]
    return tuple(vector)


def threshold_path(record: CascadeRecord, family: str = DEFAULT_FAMILY, points: int | None = 200) -> list[Thresholds]:
    """A one-knob path of threshold vectors on ``record``, from all-never to the most aggressive, with
    at most about ``points`` vectors (``None``: every distinct one). See the module docstring for the
    families. Every threshold lies between two neighbouring distinct float32 scores of its SideNet.

    A path built here from the data it is then certified on voids the guarantee of
    :meth:`CascadeCurve.threshold_for` with ``confidence``; build it on another split.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown threshold family {family!r}; choose one of {', '.join(FAMILIES)}")
    if points is not None and points < 2:
        raise ValueError(f"points must be at least 2 (both ends of the path), got {points}")
    if len(record) == 0:
        raise ValueError("cannot build a threshold path from zero samples")
    k = record.num_taps
    if family == "shared":
        pooled = _Grid(record.confidence.ravel())
        return [(float(pooled.thresholds[j]),) * k for j in _thin(len(pooled.thresholds), points)]
    grids = [_Grid(record.confidence[:, c]) for c in range(k)]
    disagree = ~record.agree
    if family == "geometric":
        knobs = np.linspace(0.0, 1.0, points or len(record) + 1)

        def geometric(q: float) -> Thresholds:
            def pick(c: int, grid: _Grid, reached: np.ndarray) -> int:
                exits = grid.counts(reached.astype(np.float64))
                return int(np.flatnonzero(exits <= q * reached.sum() + 1e-9)[-1])

            return _sequential(record, grids, pick)

        return _dedupe([geometric(q) for q in knobs])
    # equal_disagreement: the knob runs over the precisions the SideNets reach on all samples.
    shares = []
    for c, grid in enumerate(grids):
        exits = grid.ends[1:]
        shares.append(grid.counts(disagree[:, c].astype(np.float64))[1:] / exits)
    levels = np.unique(np.concatenate(shares))
    levels = levels[_thin(len(levels), None if points is None else points - 1)]

    def lowest(share: np.ndarray, eps: float) -> int:
        """Index of the lowest threshold (most exits) whose disagreeing share is at most eps; 0 if none."""
        ok = np.flatnonzero(share <= eps + 1e-12)
        return int(ok[-1]) + 1 if len(ok) else 0

    if family == "equal_disagreement":
        path = [
            tuple(float(g.thresholds[lowest(s, eps)]) for g, s in zip(grids, shares, strict=True)) for eps in levels
        ]
        return _dedupe(path)

    def reached_vector(eps: float) -> Thresholds:
        def pick(c: int, grid: _Grid, reached: np.ndarray) -> int:
            exits = grid.counts(reached.astype(np.float64))[1:]
            wrong = grid.counts((reached & disagree[:, c]).astype(np.float64))[1:]
            return lowest(np.divide(wrong, exits, out=np.zeros_like(wrong), where=exits > 0), eps)

        return _sequential(record, grids, pick)

    return _dedupe([reached_vector(eps) for eps in levels])


def _criterion(
    max_accuracy_drop: float | None, max_disagreement: float | None, compute_budget: float | None
) -> dict[str, float]:
    """The one limit given, by name, checked: fractions in [0, 1], a budget >= 0."""
    given = {"max_accuracy_drop": max_accuracy_drop, "max_disagreement": max_disagreement}
    given["compute_budget"] = compute_budget
    chosen = {name: _as_number(name, value) for name, value in given.items() if value is not None}
    if len(chosen) != 1:
        raise ValueError("give exactly one of max_accuracy_drop, compute_budget and max_disagreement")
    ((name, value),) = chosen.items()
    if name == "compute_budget" and not value >= 0:
        raise ValueError(f"compute_budget is a fraction of the MainNet's compute (>= 0), got {value}")
    if name != "compute_budget" and not 0 <= value <= 1:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value}")
    return chosen


def search_thresholds(
    record: CascadeRecord,
    *,
    max_accuracy_drop: float | None = None,
    max_disagreement: float | None = None,
    compute_budget: float | None = None,
    start: Sequence[float] | None = None,
    family: str = DEFAULT_FAMILY,
    max_sweeps: int = 20,
) -> Thresholds:
    """Refine a threshold vector on ``record`` by coordinate descent: SideNet by SideNet, try every
    threshold between its distinct scores (evaluated exactly, all at once, by sorting) with the others
    fixed, keep the best that meets the limit; repeat until a sweep changes nothing. The objective is the
    least mean compute (drop, disagreement) or the best accuracy, then the least compute (budget).

    Starts from ``start`` or from the ``family`` path's choice on this data, so it never does worse
    there. A comparison point: it fits this data, with no guarantee for new data.
    """
    criterion = _criterion(max_accuracy_drop, max_disagreement, compute_budget)
    k, n = record.num_taps, len(record)
    if start is None:
        start = CascadeCurve(record, threshold_path(record, family)).threshold_for(**criterion)
    vector = list(CascadeCurve(record, [start]).path[-1])
    if record.labels is None and "max_accuracy_drop" in criterion:
        raise ValueError("max_accuracy_drop needs labels; this record has none (use max_disagreement)")
    costs = record.stage_costs()
    disagree = np.concatenate([~record.agree, np.zeros((n, 1), dtype=bool)], axis=1).astype(np.float64)
    correct = (
        None
        if record.labels is None
        else np.concatenate([record.side_correct, record.main_correct[:, None]], axis=1).astype(np.float64)
    )
    grids = [_Grid(record.confidence[:, c]) for c in range(k)]
    rows = np.arange(n)
    tolerance = 1e-12 * n

    def totals(c: int) -> tuple[np.ndarray, ...]:
        """Totals (cost, correct, disagreeing) at every grid threshold of SideNet c, the others fixed."""
        stages = exit_stages(record.confidence, [*vector[:c], NEVER_EXIT, *vector[c + 1 :]])
        reach = (stages > c).astype(np.float64)  # these exit at c when its threshold lets them
        out = []
        for table in (costs, correct if correct is not None else -disagree, disagree):
            base = table[rows, stages]
            out.append(base.sum() + grids[c].counts(reach * (table[:, c] - base)))
        return tuple(out)

    score_table = correct if correct is not None else -disagree
    main_score = score_table[:, k].sum()

    def feasible(cost: np.ndarray, score: np.ndarray, wrong: np.ndarray) -> np.ndarray:
        if "max_accuracy_drop" in criterion:
            return score >= main_score - criterion["max_accuracy_drop"] * n - tolerance
        if "max_disagreement" in criterion:
            return wrong <= criterion["max_disagreement"] * n + tolerance
        return cost <= criterion["compute_budget"] * record.mainnet_flops.sum() + tolerance

    def better(cost: float, score: float, than_cost: float, than_score: float) -> bool:
        """A real gain (relative 1e-12 on compute, so that rounding cannot make the descent cycle):
        less compute, or for a budget more correct answers, then less compute."""
        cheaper = cost < than_cost * (1 - 1e-12)
        if "compute_budget" in criterion:  # scores are counts of samples: whole numbers
            return score > than_score + 0.5 or (score > than_score - 0.5 and cheaper)
        return cheaper

    for _ in range(max_sweeps):
        changed = False
        for c in range(k):
            cost, score, wrong = totals(c)
            stages = exit_stages(record.confidence, vector)
            now = [np.array([table[rows, stages].sum()]) for table in (costs, score_table, disagree)]
            options = np.flatnonzero(feasible(cost, score, wrong))
            if len(options) == 0:
                continue
            if "compute_budget" in criterion:
                best = options[np.lexsort((cost[options], -score[options]))[0]]
            else:
                best = options[np.argmin(cost[options])]
            gain = better(cost[best], score[best], float(now[0][0]), float(now[1][0]))
            if gain or not feasible(*now)[0]:
                vector[c] = float(grids[c].thresholds[best])
                changed = True
        if not changed:
            break
    return tuple(vector)


@dataclass
class CascadeChoice:
    """The chosen sub-cascade: ``columns`` index the record's SideNets (empty: the MainNet alone),
    ``thresholds`` one per kept SideNet, ``point`` its operating point (on the calibration part when
    certified), ``candidates`` the evidence: every subset tried with its point."""

    columns: tuple[int, ...]
    taps: tuple[str | int, ...]
    thresholds: Thresholds
    point: dict[str, Any]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    method: str = "exhaustive"
    family: str = DEFAULT_FAMILY


def _mainnet_point(record: CascadeRecord) -> dict[str, Any]:
    accuracy = float(record.main_correct.mean()) if record.labels is not None else float("nan")
    return {"thresholds": (), "accuracy": accuracy, "accuracy_drop": 0.0, "disagreement": 0.0, "exit_rate": 0.0,
            "exit_rates": [], "mean_flops": float(record.mainnet_flops.mean()), "relative_compute": 1.0}  # fmt: skip


def choose_taps(
    record: CascadeRecord,
    *,
    max_accuracy_drop: float | None = None,
    max_disagreement: float | None = None,
    compute_budget: float | None = None,
    confidence: float | None = None,
    family: str = "auto",
    max_taps: int | None = None,
    holdout: float | None = None,
    method: str = "auto",
    points: int | None = 200,
    seed: int = 0,
    rank: Callable[[tuple[int, ...], CascadeRecord, Thresholds], float] | None = None,
) -> CascadeChoice:
    """Choose which SideNets to keep and their thresholds, for the least compute under a drop or
    disagreement limit (or the best accuracy under a compute budget).

    Each subset is scored by its ``family`` path's :meth:`CascadeCurve.threshold_for` point; ``"auto"``
    (the default) tries every family of :data:`FAMILIES` and keeps, per subset, the one whose point is
    best on the choosing data (``CascadeChoice.family`` names the one chosen). ``method``:
    ``"exhaustive"`` (every subset of at most ``max_taps``), ``"greedy"`` (forward selection: add the
    SideNet that improves the point most, stop when none does) or ``"auto"`` (exhaustive for K <= 6).
    The empty subset, the MainNet alone, always competes (it pays for no SideNet).

    With ``confidence``, the subset and the path chosen on some data may not be certified on that same
    data: ``holdout`` (a fraction, e.g. 0.5) is then required. A random part of that size (``seed``) is
    set aside; subset and path are chosen on the rest (scored with the same certified rule there), and
    the thresholds are certified on the held-out part along that fixed path. ``point`` is measured on it.

    ``rank(columns, record, thresholds)``: compares subsets instead of their points' ``relative_compute``
    (a fraction of the MainNet's, on the record they are chosen on; e.g. :func:`sidenet.forecast_batch_time`),
    kept in the points as ``ranked_compute``; thresholds within a subset still follow the record's costs.
    """
    criterion = _criterion(max_accuracy_drop, max_disagreement, compute_budget)
    if method not in ("auto", "exhaustive", "greedy"):
        raise ValueError(f"method must be 'auto', 'exhaustive' or 'greedy', got {method!r}")
    if family != "auto" and family not in FAMILIES:
        raise ValueError(f"unknown threshold family {family!r}; choose 'auto' or one of {', '.join(FAMILIES)}")
    tried = FAMILIES if family == "auto" else (family,)
    if confidence is not None and holdout is None:
        raise ValueError(
            "confidence needs holdout=fraction: taps and path chosen on the data they are certified on void the "
            "guarantee (or choose without confidence on one split and call CascadeCurve.threshold_for on another)"
        )
    if holdout is not None and not 0 < holdout < 1:
        raise ValueError(f"holdout is the fraction of samples kept for certification, in (0, 1), got {holdout}")
    select, calibrate = record, None
    if holdout is not None:
        order = np.random.default_rng(seed).permutation(len(record))
        cut = int(round(holdout * len(record)))
        if cut == 0 or cut == len(record):
            raise ValueError(f"holdout={holdout} leaves no samples on one side of {len(record)}")
        select, calibrate = record.subset(np.sort(order[cut:])), record.subset(np.sort(order[:cut]))
    k = record.num_taps
    limit = k if max_taps is None else max(0, min(int(max_taps), k))
    budget = "compute_budget" in criterion
    candidates: list[dict[str, Any]] = []
    families: dict[tuple[int, ...], str] = {}

    def evaluate(columns: tuple[int, ...]) -> dict[str, Any] | None:
        point = None
        if not columns:
            if not (budget and criterion["compute_budget"] < 1):
                point = _mainnet_point(select)
        else:
            sub = select.restrict(columns)
            for name in tried:  # "auto": the family whose path gives this subset its best point here
                curve = CascadeCurve(sub, threshold_path(sub, name, points))
                try:
                    found = curve.at(curve.threshold_for(**criterion, confidence=confidence))
                except ValueError:  # no point meets the compute budget
                    continue
                if rank is not None:
                    found["ranked_compute"] = float(rank(columns, select, tuple(found["thresholds"])))
                if point is None or key(found) < key(point):
                    point, families[columns] = found, name
        taps = tuple(record.taps[c] for c in columns)
        candidates.append({"columns": columns, "taps": taps, "family": families.get(columns), "point": point})
        return point

    def key(point: dict[str, Any] | None) -> tuple[float, float]:
        if point is None:
            return (np.inf, np.inf)
        compute = point.get("ranked_compute", point["relative_compute"])
        if budget:
            score = point["accuracy"] if select.labels is not None else 1 - point["disagreement"]
            return (-score, compute)
        return (compute, 0.0)

    chosen: tuple[int, ...] = ()
    best = evaluate(chosen)
    use = "exhaustive" if method == "exhaustive" or (method == "auto" and k <= 6) else "greedy"
    if use == "exhaustive":
        for size in range(1, limit + 1):
            for columns in itertools.combinations(range(k), size):
                point = evaluate(columns)
                if key(point) < key(best):  # ties keep the smaller subset, tried first
                    chosen, best = columns, point
    else:
        while len(chosen) < limit:
            trials = [tuple(sorted({*chosen, c})) for c in range(k) if c not in chosen]
            trials = [(columns, evaluate(columns)) for columns in trials]
            columns, point = min(trials, key=lambda item: key(item[1]))
            if not key(point) < key(best):
                break
            chosen, best = columns, point
    if best is None:
        raise ValueError(f"no subset of SideNets meets {criterion} on {len(select)} samples")
    thresholds = tuple(best["thresholds"])
    family = families.get(chosen, tried[0])
    if calibrate is not None and chosen:
        sub = select.restrict(chosen)
        path = threshold_path(sub, family, points)
        curve = CascadeCurve(calibrate.restrict(chosen), path)
        thresholds = curve.threshold_for(**criterion, confidence=confidence)
        best = curve.at(thresholds)
    elif calibrate is not None:
        best = _mainnet_point(calibrate)
    taps = tuple(record.taps[c] for c in chosen)
    return CascadeChoice(chosen, taps, thresholds, best, candidates, use, family)
