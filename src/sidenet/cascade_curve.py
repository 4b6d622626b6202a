"""The trade-off of a SideNet cascade: several SideNets at several taps of one frozen MainNet, a sample
exiting at the first SideNet whose score clears that SideNet's threshold (after the last SideNet the
rest of the MainNet answers). One pass of the MainNet over a dataset gives a :class:`CascadeRecord`;
:class:`CascadeCurve` evaluates any sequence of threshold vectors on it without running a network again.
Which vectors to try and which taps to keep is :mod:`sidenet.cascade_choice`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sidenet.cascade_record import CascadeRecord
from sidenet.curve import _as_number
from sidenet.guarantee import binomial_pvalue, certified_cheapest, fixed_sequence
from sidenet.plotting import pyplot, save_figure
from sidenet.policy import NEVER_EXIT, format_threshold, validate_threshold

__all__ = ["CascadeRecord", "CascadeCurve", "exit_stages"]

Thresholds = tuple[float, ...]


def _validate_vector(thresholds: Sequence[float], k: int) -> Thresholds:
    """``thresholds`` as a tuple of K validated floats, or ``ValueError``."""
    values = tuple(np.ravel(np.asarray(thresholds, dtype=object)))
    if len(values) != k:
        raise ValueError(f"a threshold vector needs one threshold per SideNet (K={k}), got {len(values)}")
    return tuple(validate_threshold(t) for t in values)


def exit_stages(confidence: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """(N,) index of the first SideNet whose score reaches its threshold, K where none does.

    Compared in float32, as :meth:`ExitPolicy.exits` compares the SideNet's float32 confidences (torch
    rounds a Python threshold to float32), so that curve and routed model agree at the boundary.
    :data:`NEVER_EXIT` never exits; 0 always does.
    """
    confidence = np.asarray(confidence)
    if confidence.ndim != 2:
        raise ValueError(f"confidence must be (N, K), got shape {confidence.shape}")
    k = confidence.shape[1]
    vector = np.asarray(_validate_vector(thresholds, k), dtype=np.float32)
    passes = confidence.astype(np.float32) >= vector
    return np.where(passes.any(axis=1), passes.argmax(axis=1), k)


MARK_OFFSETS = ((10, -24), (10, 14), (-10, -24), (-10, 14))  # points: label offsets of marked vectors


class CascadeCurve:
    """Accuracy, disagreement, exit rates and compute of a cascade at each threshold vector of ``path``.

    ``path`` runs from the safest vector (every SideNet at :data:`NEVER_EXIT`: the MainNet answers
    everything, every SideNet still paid) to the most aggressive; a path that does not start there gets
    that vector put in front, so point 0 is always the MainNet's answer. Build paths with
    :func:`sidenet.cascade_choice.threshold_path`, which puts thresholds between neighbouring distinct
    float32 confidences, never on a sample's own, so that routed model and curve agree exactly.
    """

    def __init__(self, record: CascadeRecord, path: Sequence[Sequence[float]]) -> None:
        n, k = record.confidence.shape
        if n == 0:
            raise ValueError("cannot build a cascade curve from zero samples")
        vectors = [_validate_vector(v, k) for v in path]
        never = (NEVER_EXIT,) * k
        if not vectors or vectors[0] != never:
            vectors.insert(0, never)
        self.record = record
        self.num_samples = n
        self.num_taps = k
        self.path: list[Thresholds] = vectors
        # Per sample and stage (K SideNets, then the MainNet): its cost, whether its answer there is right
        # and whether it differs from the MainNet's.
        self._costs = record.stage_costs()
        self._disagree = np.concatenate([~record.agree, np.zeros((n, 1), dtype=bool)], axis=1)
        labels = record.labels is not None
        self._correct = np.concatenate([record.side_correct, record.main_correct[:, None]], axis=1) if labels else None
        self.mainnet_flops = float(record.mainnet_flops.mean())
        if not self.mainnet_flops > 0:
            raise ValueError("the MainNet's FLOPs (segment_flops summed) must be positive to compare compute")
        self.mainnet_accuracy = float(record.main_correct.mean()) if labels else math.nan
        self.sidenet_accuracy = record.side_correct.mean(axis=0) if labels else np.full(k, math.nan)
        self._stats = [self._evaluate(exit_stages(record.confidence, v)) for v in vectors]
        column = lambda key: np.array([s[key] for s in self._stats])  # noqa: E731
        self.accuracy, self.disagreement = column("accuracy"), column("disagreement")
        self.exit_rates = column("exit_rates")  # (P, K): the share of all samples exiting at SideNet k
        self.exit_rate = self.exit_rates.sum(axis=1)
        self.mean_flops = column("mean_flops")
        self.relative_compute = self.mean_flops / self.mainnet_flops
        self._disagree_counts = column("disagree_count").astype(np.int64)

    def _evaluate(self, stages: np.ndarray) -> dict[str, Any]:
        """Totals of one vector, given each sample's exit stage."""
        rows = np.arange(self.num_samples)
        disagree_count = int(self._disagree[rows, stages].sum())
        return {
            "accuracy": math.nan if self._correct is None else float(self._correct[rows, stages].mean()),
            "disagreement": disagree_count / self.num_samples,
            "disagree_count": disagree_count,
            "exit_rates": np.bincount(stages, minlength=self.num_taps + 1)[: self.num_taps] / self.num_samples,
            "mean_flops": float(self._costs[rows, stages].mean()),
        }

    def __len__(self) -> int:
        return len(self.path)

    def _as_point(self, thresholds: Thresholds, stats: dict[str, Any]) -> dict[str, Any]:
        return {
            "thresholds": thresholds,
            "accuracy": stats["accuracy"],
            "accuracy_drop": self.mainnet_accuracy - stats["accuracy"],
            "disagreement": stats["disagreement"],
            "exit_rate": float(np.sum(stats["exit_rates"])),
            "exit_rates": [float(r) for r in stats["exit_rates"]],
            "mean_flops": stats["mean_flops"],
            "relative_compute": stats["mean_flops"] / self.mainnet_flops,
        }

    def point(self, index: int) -> dict[str, Any]:
        """The operating point ``index`` of the path as a dict (``thresholds`` a tuple of K floats)."""
        return self._as_point(self.path[index], self._stats[index])

    def at(self, thresholds: Sequence[float]) -> dict[str, Any]:
        """The operating point of any threshold vector on this data, on the path or off it."""
        vector = _validate_vector(thresholds, self.num_taps)
        return self._as_point(vector, self._evaluate(exit_stages(self.record.confidence, vector)))

    def threshold_for(
        self,
        *,
        max_accuracy_drop: float | None = None,
        compute_budget: float | None = None,
        max_disagreement: float | None = None,
        confidence: float | None = None,
    ) -> Thresholds:
        """Choose a threshold vector of the path, with the semantics of
        :meth:`sidenet.TradeoffCurve.threshold_for`.

        Args:
            max_accuracy_drop: the least compute whose accuracy is at most this far below the MainNet's
                (needs labels). Falls back to the all-:data:`NEVER_EXIT` vector.
            compute_budget: the most accurate point (least disagreeing without labels) whose mean
                compute is at most this fraction of the MainNet's; ``ValueError`` if none is that cheap.
            max_disagreement: the least compute at which at most this fraction of all samples exit with
                another answer than the MainNet's (needs no labels).
            confidence: 1 - delta. With it, the choice holds on new data exchangeable with this data,
                with probability at least ``confidence`` over the draw of this (calibration) data:

                - drop or disagreement: Learn then Test (Angelopoulos et al. 2021). Hypothesis i says
                  "the share of samples exiting with another answer than the MainNet's at path vector i
                  exceeds the limit" (it bounds the accuracy drop from above); each gets the exact
                  binomial (Clopper-Pearson) p-value of its disagreement count, and they are tested in
                  path order, safest first, stopping at the first not rejected (fixed-sequence testing).
                  The least compute among the rejected is returned, else all-never.
                - compute budget: hypothesis i says "mean FLOPs per sample at vector i exceed the budget
                  times the MainNet's mean FLOPs here"; costs scaled to [0, 1] by the cheapest and dearest
                  sample cost seen here (assumed to bound new samples), Hoeffding-Bentkus p-values
                  (exact binomial when one SideNet and constant costs make them 0/1), tested in reverse
                  path order, most aggressive first. The most accurate certified point is returned.

                Fixed-sequence testing controls the family-wise error at delta whatever the order and
                whether or not risk is monotone along the path, PROVIDED the path (and the order) is
                fixed before this data is looked at. Paths that qualify: any family (shared, equal
                disagreement, geometric, a searched vector) computed on a separate split of the data, as
                :func:`sidenet.cascade_choice.choose_taps` does with ``holdout``; or a data-independent
                grid of vectors. A path built from the calibration data itself (thinned grids, equal
                disagreement, search) does not qualify; nor does a set of taps chosen on it.
        """
        given = {
            "max_accuracy_drop": max_accuracy_drop,
            "compute_budget": compute_budget,
            "max_disagreement": max_disagreement,
        }
        if sum(v is not None for v in given.values()) != 1:
            raise ValueError("give exactly one of max_accuracy_drop, compute_budget and max_disagreement")
        name, limit = next((key, _as_number(key, v)) for key, v in given.items() if v is not None)
        if confidence is not None:
            confidence = _as_number("confidence", confidence)
            if not 0 < confidence < 1:
                raise ValueError(f"confidence is 1 - delta, a probability in (0, 1), got {confidence}")
        if name == "compute_budget":
            eligible = self._certified_budget(limit, confidence)
            score = self.accuracy if self.record.labels is not None else -self.disagreement
            best = eligible[score[eligible] == score[eligible].max()]
            return self.path[int(best[np.argmin(self.mean_flops[best])])]
        if not 0 <= limit <= 1:
            raise ValueError(f"{name} is a fraction in [0, 1], got {limit}")
        if name == "max_accuracy_drop" and self.record.labels is None and confidence is None:
            raise ValueError("max_accuracy_drop needs labels; this record has none (use max_disagreement)")
        if confidence is not None:
            pvalues = (binomial_pvalue(int(c), self.num_samples, limit) for c in self._disagree_counts[1:])
            eligible = np.arange(1 + fixed_sequence(pvalues, 1.0 - confidence))
        elif name == "max_accuracy_drop":
            eligible = np.flatnonzero(self.accuracy >= self.mainnet_accuracy - limit - 1e-12)
        else:
            eligible = np.flatnonzero(self.disagreement <= limit + 1e-12)
        eligible = np.union1d(eligible, [0])  # all-never: no drop, no disagreement
        return self.path[int(eligible[np.argmin(self.mean_flops[eligible])])]

    def _certified_budget(self, compute_budget: float, confidence: float | None) -> np.ndarray:
        """Indices of the points whose mean compute meets the budget (on this data, or certified)."""
        if not compute_budget >= 0:
            raise ValueError(f"compute_budget is a fraction of the MainNet's compute (>= 0), got {compute_budget}")
        if confidence is None:
            eligible = np.flatnonzero(self.relative_compute <= compute_budget + 1e-12)
        else:
            low, high = float(self._costs.min()), float(self._costs.max())
            # One SideNet, constant costs: a sample costs low (exits) or high (continues): exact binomial.
            two_valued = self.num_taps == 1 and np.ptp(self._costs[:, 0]) == 0 and np.ptp(self._costs[:, 1]) == 0
            n = self.num_samples
            continuing = n - np.rint(self.exit_rate * n).astype(np.int64) if two_valued else None
            limit = compute_budget * self.mainnet_flops
            count = certified_cheapest(self.mean_flops, low, high, limit, n, 1.0 - confidence, continuing)
            eligible = np.arange(len(self) - count, len(self))
        if len(eligible) == 0:
            how = "" if confidence is None else f" with confidence {confidence}"
            raise ValueError(
                f"no threshold vector meets compute_budget={compute_budget}{how}: the cheapest point costs "
                f"{self.relative_compute.min():.3f} of the MainNet on {self.num_samples} samples"
            )
        return eligible

    def oracle(self) -> dict[str, Any]:
        """Exit at the first SideNet that agrees with the MainNet (the MainNet's answer at the least
        compute this cascade allows; a bound, not a policy)."""
        agree = self.record.agree
        stages = np.where(agree.any(axis=1), agree.argmax(axis=1), self.num_taps)
        point = self._as_point((math.nan,) * self.num_taps, self._evaluate(stages))
        del point["thresholds"]
        return point

    def oracle_fraction(self, thresholds: Sequence[float]) -> float:
        """Compute saved at ``thresholds`` as a fraction of what the oracle saves (NaN if it saves none)."""
        saved_oracle = 1.0 - self.oracle()["relative_compute"]
        if saved_oracle <= 0:
            return math.nan
        return (1.0 - self.at(thresholds)["relative_compute"]) / saved_oracle

    def table(self, rows: int = 12, marks: dict[str, Sequence[float]] | None = None) -> str:
        """A plain-text table of about ``rows`` points spread along the path, plus marked vectors."""
        oracle = self.oracle()
        lines = [
            f"MainNet alone: accuracy {self.mainnet_accuracy:.4f}, {self.mainnet_flops / 1e6:.2f} MFLOPs/sample; "
            f"{self.num_taps} SideNets at taps {list(self.record.taps)}; {self.num_samples} samples",
            f"Oracle (exit at the first SideNet that agrees with the MainNet): exit rate {oracle['exit_rate']:.3f}, "
            f"compute {oracle['relative_compute']:.3f} of the MainNet",
        ]
        picks = sorted({int(i) for i in np.linspace(0, len(self) - 1, max(rows, 2)).round()})
        entries = [(self.point(i), "") for i in picks]
        entries += [(self.at(v), f"  <- {name}") for name, v in (marks or {}).items()]
        vectors = ["/".join(format_threshold(t, digits=4) for t in point["thresholds"]) for point, _ in entries]
        width = max(28, *map(len, vectors))  # as wide as the longest vector: the columns stay aligned
        lines.append(
            f"{'thresholds':>{width}} {'accuracy':>9} {'drop(pt)':>9} {'disagree':>9} {'exit rate':>10} "
            f"{'compute':>8}  exits per SideNet"
        )
        for (point, label), vector in zip(entries, vectors, strict=True):
            rates = " ".join(f"{r:.2f}" for r in point["exit_rates"])
            lines.append(
                f"{vector:>{width}} {point['accuracy']:>9.4f} {100 * point['accuracy_drop']:>9.2f} "
                f"{point['disagreement']:>9.4f} {point['exit_rate']:>10.3f} {point['relative_compute']:>8.3f}  "
                f"{rates}{label}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (never-exit thresholds and missing accuracies written as null)."""

        def clean(values: Any) -> Any:
            return [None if not math.isfinite(v) else float(v) for v in np.ravel(values)]

        return {
            "taps": list(self.record.taps),
            "mainnet_accuracy": None if math.isnan(self.mainnet_accuracy) else self.mainnet_accuracy,
            "mainnet_flops": self.mainnet_flops,
            "sidenet_accuracy": clean(self.sidenet_accuracy),
            "num_samples": self.num_samples,
            "thresholds": [clean(v) for v in self.path],
            "accuracy": clean(self.accuracy),
            "disagreement": self.disagreement.tolist(),
            "exit_rate": self.exit_rate.tolist(),
            "exit_rates": self.exit_rates.tolist(),
            "relative_compute": self.relative_compute.tolist(),
            "oracle": {
                key: clean(value) if key == "exit_rates" else clean(value)[0] for key, value in self.oracle().items()
            },
        }

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` to ``path``."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    def plot(self, path: str | Path, marks: dict[str, Sequence[float]] | None = None, title: str | None = None) -> Path:
        """Save a PNG of accuracy (agreement with the MainNet without labels) against compute relative to
        the MainNet along the path, with the MainNet, the oracle and any marked vectors."""
        plt = pyplot()
        labels = self.record.labels is not None
        y = 100 * (self.accuracy if labels else 1.0 - self.disagreement)
        main_y = 100 * self.mainnet_accuracy if labels else 100.0
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        ax.plot(self.relative_compute, y, lw=1.6, label=f"cascade of {self.num_taps} SideNets (path)")
        ax.scatter([1.0], [main_y], color="black", zorder=3, label="MainNet alone")
        oracle = self.oracle()
        ax.scatter(
            [oracle["relative_compute"]], [main_y], marker="*", s=140, color="#8172B2", zorder=4,
            label="oracle (first SideNet = MainNet)",
        )  # fmt: skip
        ax.axhline(main_y, color="black", lw=0.6, ls=":")
        for k, (name, vector) in enumerate((marks or {}).items()):
            point = self.at(vector)
            value = 100 * (point["accuracy"] if labels else 1.0 - point["disagreement"])
            dot = ax.scatter([point["relative_compute"]], [value], zorder=4, marker="D")
            # Marks often lie close together (saved, empirical, guaranteed): their labels take turns
            # below-right, above-right, below-left and above-left of the point, with a line to it, both in
            # the mark's colour, so that a label set near another mark still says whose it is.
            offset, colour = MARK_OFFSETS[k % len(MARK_OFFSETS)], dot.get_facecolor()[0]
            ax.annotate(
                f"{name}\nexit {point['exit_rate']:.0%}", (point["relative_compute"], value),
                textcoords="offset points", xytext=offset, fontsize=8, ha="left" if offset[0] > 0 else "right",
                color=colour, arrowprops={"arrowstyle": "-", "lw": 0.6, "color": colour},
            )  # fmt: skip
        ax.set_ylim(max(float(np.nanmin(y)), main_y - 5) - 0.5, max(float(np.nanmax(y)), main_y) + 0.5)
        ax.set_xlabel("compute per sample, relative to the MainNet (measured FLOPs)")
        ax.set_ylabel("accuracy (%)" if labels else "agreement with the MainNet (%)")
        ax.set_title(title or "Cascade compute-accuracy trade-off")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)  # where the curve and the marks leave room
        return save_figure(fig, path)
