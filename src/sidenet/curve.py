"""The compute-accuracy trade-off: one pass over a dataset (:func:`collect`, in :mod:`sidenet.record`)
collects the SideNet's confidences and predictions and the MainNet's predictions; every distinct
threshold is then evaluated by sorting, without running the network again."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sidenet.guarantee import binomial_pvalue, certified_cheapest, fixed_sequence
from sidenet.plotting import pyplot, save_figure
from sidenet.policy import NEVER_EXIT, format_threshold, validate_threshold

# SweepRecord and collect live in sidenet.record; importable from here too, where they lived before.
from sidenet.record import SweepRecord
from sidenet.record import collect as collect

if TYPE_CHECKING:
    from sidenet.routing import AdaptiveModel

__all__ = ["TradeoffCurve", "sweep"]


def _as_number(name: str, value: object) -> float:
    """``value`` as a float, or ``ValueError`` naming ``name``: strings and booleans are refused rather
    than compared (``"0.1" <= 1`` is a TypeError, ``True <= 1`` silently holds)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _point_thresholds(confidence: np.ndarray, exits: np.ndarray) -> np.ndarray:
    """The threshold of each point, given the confidences sorted from high to low and the number of
    samples each point exits (``exits[0] == 0``, ``exits[-1] == len(confidence)``).

    A threshold equal to a sample's confidence leaves that sample on the boundary, where its float32
    score, which may differ in the last bit between batch sizes, decides its exit. So point ``i``,
    which exits the top ``k`` samples, gets the float32 value midway between the float32 scores
    ``conf[k]`` (the highest that continues) and ``conf[k - 1]`` (the lowest that exits): the exit rule
    compares float32 scores, and torch rounds a Python threshold to float32 for that comparison.
    Point 0 is :data:`NEVER_EXIT`; the last point, where every sample exits, is 0.0.
    """
    inner = exits[1:-1]
    high = confidence[inner - 1].astype(np.float32)  # lowest score that exits
    low = confidence[inner].astype(np.float32)  # highest score that continues; low < high in float32
    middle = ((high.astype(np.float64) + low.astype(np.float64)) / 2).astype(np.float32)
    # When high is the float32 right after low, no float32 lies strictly between them: the threshold
    # must then be the lowest exiting confidence itself (the one case a sample sits on a threshold).
    adjacent = np.nextafter(low, np.float32(np.inf)) >= high
    between = np.where(adjacent, confidence[inner - 1], middle.astype(np.float64))
    return np.concatenate([[NEVER_EXIT], between, [0.0]])


class TradeoffCurve:
    """Accuracy, exit rate and compute at every distinct threshold.

    Point ``i`` exits exactly the samples whose confidence is at least ``thresholds[i]`` (compared in
    float32, as the exit policy compares the SideNet's float32 confidences). The first point is
    :data:`NEVER_EXIT` (the MainNet answers everything, the SideNet's cost still paid), the last, at
    threshold 0, exits every sample; the others lie midway between two neighbouring distinct
    confidences, never on a sample's own (see :func:`_point_thresholds`). ``mainnet_accuracy`` and
    ``mainnet_flops`` describe the MainNet alone.
    """

    def __init__(self, record: SweepRecord) -> None:
        n = len(record.confidence)
        if n == 0:
            raise ValueError("cannot build a trade-off curve from zero samples")
        self.record = record
        self.num_samples = n
        order = np.argsort(-record.confidence, kind="stable")
        confidence = record.confidence[order]

        def running_sum(values: np.ndarray) -> np.ndarray:
            """Sums over the ``k`` most confident samples, for k = 0..n."""
            return np.concatenate([[0.0], np.cumsum(values[order], dtype=np.float64)])

        side_correct, main_correct = running_sum(record.side_correct), running_sum(record.main_correct)
        rest, disagreeing = running_sum(record.rest_flops), running_sum(~record.agree)
        # Exiting the top k samples is a reachable point only at the end of a run of equal confidences,
        # equal in float32, in which the exit rule compares them (float32 rounding keeps the order).
        changes = np.flatnonzero(np.diff(confidence.astype(np.float32)) != 0) + 1
        ends = np.unique(np.concatenate([[0], changes, [n]]))
        self.exits = ends
        self.thresholds = _point_thresholds(confidence, ends)
        self.accuracy = (side_correct[ends] + main_correct[n] - main_correct[ends]) / n
        # Fraction of all samples that exit with another answer than the MainNet's: a bound on the
        # accuracy drop that needs no labels and no cancellation of errors.
        self.disagreement = disagreeing[ends] / n
        self.exit_rate = ends / n
        self.mean_flops = record.trunk_side_flops.mean() + (rest[n] - rest[ends]) / n
        self.mainnet_flops = float(record.mainnet_flops.mean())
        self.relative_compute = self.mean_flops / self.mainnet_flops
        self.mainnet_accuracy = float(record.main_correct.mean())
        self.sidenet_accuracy = float(record.side_correct.mean())

    def __len__(self) -> int:
        return len(self.thresholds)

    def point(self, index: int) -> dict[str, float]:
        """The operating point ``index`` as a dict."""
        return {
            "threshold": float(self.thresholds[index]),
            "accuracy": float(self.accuracy[index]),
            "accuracy_drop": self.mainnet_accuracy - float(self.accuracy[index]),
            "exit_rate": float(self.exit_rate[index]),
            "disagreement": float(self.disagreement[index]),
            "mean_flops": float(self.mean_flops[index]),
            "relative_compute": float(self.relative_compute[index]),
        }

    def at(self, threshold: float) -> dict[str, float]:
        """The operating point a given threshold reaches on this data."""
        return self.point(self.index_of(threshold))

    def index_of(self, threshold: float) -> int:
        """Index of the point a threshold reaches. Compared in float32, as the exit policy compares
        the SideNet's float32 confidences, so that curve and routed model agree at the boundary."""
        threshold = validate_threshold(threshold)
        exits = int((self.record.confidence.astype(np.float32) >= np.float32(threshold)).sum())
        return int(np.searchsorted(self.exits, exits))

    def threshold_for(
        self,
        *,
        max_accuracy_drop: float | None = None,
        compute_budget: float | None = None,
        max_disagreement: float | None = None,
        confidence: float | None = None,
    ) -> float:
        """Choose a threshold on this data: one of :attr:`thresholds`, so that it lies between two
        neighbouring confidences, not on a sample (a sample on it could flip its exit), and the routed
        model exits exactly the samples the chosen point counts.

        Args:
            max_accuracy_drop: the least compute whose accuracy is at most this far (a fraction,
                0.005 = half a point) below the MainNet's. Falls back to :data:`NEVER_EXIT`.
            compute_budget: the most accurate point whose mean compute is at most this fraction of
                the MainNet's; raises ``ValueError`` if no point is that cheap.
            max_disagreement: the least compute at which at most this fraction of the samples exit
                with another answer than the MainNet's. It bounds the accuracy drop on this data
                without counting on the SideNet's lucky wins where the MainNet errs, so it holds better
                on new data when the choosing set is small (and it needs no labels).
            confidence: 1 - delta. Without it the choice holds on this data only. With it the choice
                holds on new data with probability at least ``confidence`` over the draw of this
                (calibration) data, provided that new data and this data are exchangeable (i.i.d. from
                one distribution; see :mod:`sidenet.guarantee` and :mod:`sidenet.shift`):

                - with ``max_accuracy_drop`` (or ``max_disagreement``): the least compute among the
                  thresholds certified by a one-sided Clopper-Pearson test that the share of samples
                  exiting with another answer than the MainNet's (an upper bound on the accuracy drop)
                  is at most the limit, tested from the highest threshold down with fixed-sequence
                  testing ("Learn then Test"). Falls back to :data:`NEVER_EXIT`. Needs no labels.
                - with ``compute_budget``: the most accurate (on this data) threshold among those
                  certified to keep the mean FLOPs per sample at most the budget times the MainNet's
                  mean FLOPs here; the cost of one sample is assumed to stay within the range seen
                  here. Raises ``ValueError`` when no threshold can be certified.
        """
        if sum(x is not None for x in (max_accuracy_drop, compute_budget, max_disagreement)) != 1:
            raise ValueError("give exactly one of max_accuracy_drop, compute_budget and max_disagreement")
        given = {
            "max_accuracy_drop": max_accuracy_drop,
            "compute_budget": compute_budget,
            "max_disagreement": max_disagreement,
            "confidence": confidence,
        }
        given = {name: None if value is None else _as_number(name, value) for name, value in given.items()}
        max_accuracy_drop, compute_budget = given["max_accuracy_drop"], given["compute_budget"]
        max_disagreement, confidence = given["max_disagreement"], given["confidence"]
        for name, limit in (("max_accuracy_drop", max_accuracy_drop), ("max_disagreement", max_disagreement)):
            if limit is not None and not 0 <= limit <= 1:
                raise ValueError(f"{name} is a fraction in [0, 1], got {limit}")
        if confidence is not None and not 0 < confidence < 1:
            raise ValueError(f"confidence is 1 - delta, a probability in (0, 1), got {confidence}")
        if compute_budget is not None:
            eligible = self._certified_budget(compute_budget, confidence)
            best = eligible[self.accuracy[eligible] == self.accuracy[eligible].max()]
            return float(self.thresholds[best[np.argmin(self.mean_flops[best])]])
        if confidence is not None:
            limit = max_accuracy_drop if max_accuracy_drop is not None else max_disagreement
            assert limit is not None
            # Points in order of growing exits; point 0 (never exit) has no risk and needs no test.
            counts = np.rint(self.disagreement[1:] * self.num_samples).astype(np.int64)
            pvalues = (binomial_pvalue(int(k), self.num_samples, limit) for k in counts)
            eligible = np.arange(1 + fixed_sequence(pvalues, 1.0 - confidence))
        elif max_accuracy_drop is not None:
            eligible = np.flatnonzero(self.accuracy >= self.mainnet_accuracy - max_accuracy_drop - 1e-12)
        else:
            assert max_disagreement is not None
            eligible = np.flatnonzero(self.disagreement <= max_disagreement + 1e-12)
        # The first point (never exit) always qualifies: no drop, no disagreement.
        return float(self.thresholds[eligible[np.argmin(self.mean_flops[eligible])]])

    def _certified_budget(self, compute_budget: float, confidence: float | None) -> np.ndarray:
        """Indices of the points whose mean compute meets the budget (on this data, or certified)."""
        if not compute_budget >= 0:  # NaN too
            raise ValueError(f"compute_budget is a fraction of the MainNet's compute (>= 0), got {compute_budget}")
        if confidence is None:
            eligible = np.flatnonzero(self.relative_compute <= compute_budget + 1e-12)
        else:
            record = self.record
            low = float(record.trunk_side_flops.min())
            high = float((record.trunk_side_flops + record.rest_flops).max())
            two_valued = np.ptp(record.trunk_side_flops) == 0 and np.ptp(record.rest_flops) == 0
            # Every sample costs low or high when costs are constant: the ones that continue pay high.
            continuing = self.num_samples - self.exits if two_valued else None
            limit = compute_budget * self.mainnet_flops
            count = certified_cheapest(
                self.mean_flops, low, high, limit, self.num_samples, 1.0 - confidence, continuing
            )
            eligible = np.arange(len(self) - count, len(self))
        if len(eligible) == 0:
            how = "" if confidence is None else f" with confidence {confidence}"
            raise ValueError(
                f"no threshold meets compute_budget={compute_budget}{how}: the cheapest point costs "
                f"{self.relative_compute.min():.3f} of the MainNet on {self.num_samples} samples"
            )
        return eligible

    def oracle(self) -> dict[str, float]:
        """The oracle exit rule: exit exactly where the SideNet's answer equals the MainNet's. It keeps
        the MainNet's accuracy at the least compute this SideNet allows; a bound, not a policy."""
        record = self.record
        continues = ~record.agree
        mean_flops = float(record.trunk_side_flops.mean() + (record.rest_flops * continues).sum() / self.num_samples)
        return {
            "accuracy": self.mainnet_accuracy,
            "exit_rate": float(record.agree.mean()),
            "mean_flops": mean_flops,
            "relative_compute": mean_flops / self.mainnet_flops,
        }

    def oracle_fraction(self, threshold: float) -> float:
        """The compute saved at ``threshold`` as a fraction of what the oracle saves (NaN if the oracle
        saves nothing)."""
        saved_oracle = 1.0 - self.oracle()["relative_compute"]
        if saved_oracle <= 0:
            return float("nan")
        return (1.0 - self.at(threshold)["relative_compute"]) / saved_oracle

    def table(self, rows: int = 12, marks: dict[str, float] | None = None) -> str:
        """A plain-text table of about ``rows`` points spread over the exit rate, plus marked thresholds."""
        picks = {0, len(self) - 1}
        picks |= {int(np.searchsorted(self.exit_rate, q)) for q in np.linspace(0, 1, rows)}
        labels: dict[int, str] = {}
        for name, threshold in (marks or {}).items():
            index = self.index_of(threshold)
            picks.add(index)
            labels[index] = name
        lines = [
            f"MainNet alone: accuracy {self.mainnet_accuracy:.4f}, {self.mainnet_flops / 1e6:.2f} MFLOPs/sample; "
            f"SideNet alone: accuracy {self.sidenet_accuracy:.4f}; {self.num_samples} samples",
            f"Oracle (exit iff the SideNet agrees with the MainNet): exit rate {self.oracle()['exit_rate']:.3f}, "
            f"compute {self.oracle()['relative_compute']:.3f} of the MainNet",
            f"{'threshold':>10} {'accuracy':>9} {'drop(pt)':>9} {'exit rate':>10} {'MFLOPs':>9} {'compute':>8}",
        ]
        for index in sorted(pick for pick in picks if 0 <= pick < len(self)):
            point = self.point(index)
            lines.append(
                f"{format_threshold(point['threshold'], digits=6):>10} {point['accuracy']:>9.4f} "
                f"{100 * point['accuracy_drop']:>9.2f} {point['exit_rate']:>10.3f} "
                f"{point['mean_flops'] / 1e6:>9.3f} {point['relative_compute']:>8.3f}"
                + (f"  <- {labels[index]}" if index in labels else "")
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (thresholds of never-exit are written as null)."""
        return {
            "mainnet_accuracy": self.mainnet_accuracy,
            "mainnet_flops": self.mainnet_flops,
            "sidenet_accuracy": self.sidenet_accuracy,
            "num_samples": self.num_samples,
            "thresholds": [None if math.isinf(t) else float(t) for t in self.thresholds],
            "accuracy": self.accuracy.tolist(),
            "exit_rate": self.exit_rate.tolist(),
            "relative_compute": self.relative_compute.tolist(),
        }

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    def plot(self, path: str | Path, marks: dict[str, float] | None = None, title: str | None = None) -> Path:
        """Save a PNG of accuracy against compute relative to the MainNet, with the MainNet's point
        and any marked thresholds."""
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        ax.plot(self.relative_compute, 100 * self.accuracy, lw=1.6, label="SideNet + MainNet (threshold sweep)")
        ax.scatter([1.0], [100 * self.mainnet_accuracy], color="black", zorder=3, label="MainNet alone")
        oracle = self.oracle()
        ax.scatter(
            [oracle["relative_compute"]],
            [100 * oracle["accuracy"]],
            marker="*",
            s=140,
            color="#8172B2",
            zorder=4,
            label="oracle (exit iff SideNet = MainNet)",
        )
        ax.axhline(100 * self.mainnet_accuracy, color="black", lw=0.6, ls=":")
        for name, threshold in (marks or {}).items():
            point = self.at(threshold)
            ax.scatter([point["relative_compute"]], [100 * point["accuracy"]], zorder=4, marker="D")
            ax.annotate(
                f"{name}\nexit {point['exit_rate']:.0%}",
                (point["relative_compute"], 100 * point["accuracy"]),
                textcoords="offset points",
                xytext=(8, -18),
                fontsize=8,
            )
        low = min(100 * self.accuracy.min(), 100 * self.mainnet_accuracy - 5)
        ax.set_ylim(
            max(low, 100 * self.sidenet_accuracy - 1), 100 * max(self.accuracy.max(), self.mainnet_accuracy) + 0.5
        )
        ax.set_xlabel("compute per sample, relative to the MainNet (measured FLOPs)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title or "Compute-accuracy trade-off")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        return save_figure(fig, path)


def sweep(model: AdaptiveModel, loader: Iterable, progress: bool = True) -> Any:
    """One pass over ``loader``, then the trade-off: for one SideNet a :class:`TradeoffCurve` at every
    distinct threshold; for a cascade a :class:`~sidenet.cascade_curve.CascadeCurve` along the default
    one-knob path of threshold vectors (:func:`~sidenet.cascade_choice.threshold_path`), whose
    ``threshold_for`` returns one threshold per SideNet (``model.thresholds = ...``)."""
    if model.num_taps == 1:
        return TradeoffCurve(collect(model, loader, progress=progress))
    # Imported here: the cascade modules build on this one.
    from sidenet.cascade_choice import threshold_path
    from sidenet.cascade_curve import CascadeCurve
    from sidenet.cascade_record import collect_cascade

    record = collect_cascade(model, loader, progress=progress)
    return CascadeCurve(record, threshold_path(record))
