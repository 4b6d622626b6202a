"""What a trade-off report holds, typed: one :class:`PolicyReport` per exit rule, the calibration
metrics, the shift checks, per-class rows, the threshold table and the measured throughput, gathered
in a :class:`TradeoffReport`. :func:`sidenet.report.build_report` fills them;
:mod:`sidenet.report_page` reads them by attribute; :meth:`TradeoffReport.to_dict` is ``report.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sidenet.calibration import CalibrationMetrics
from sidenet.curve import SweepRecord, TradeoffCurve
from sidenet.policy import POLICIES, ExitPolicy
from sidenet.shift import ShiftReport
from sidenet.timing import RoutedTiming, Timing

__all__ = [
    "Point",
    "ReportSettings",
    "ThresholdChoice",
    "PolicyReport",
    "CalibrationReport",
    "ShiftChecks",
    "ClassRow",
    "ThresholdRow",
    "ThroughputReport",
    "TradeoffReport",
]

Point = dict[str, float]  # an operating point of a curve, as TradeoffCurve.at gives it


@dataclass
class ReportSettings:
    """What the report asks of the model.

    Attributes:
        max_accuracy_drop: the tolerance of the chosen operating points (0.005 = half a point).
        confidence: 1 - delta of the guaranteed threshold.
        bins: calibration bins.
        policies: exit rules to compare.
        timing: measure throughput (the slowest part); ``timing_samples`` evaluation samples in
            batches as the loader gives them, ``repeats`` interleaved passes.
        compile_backend: None: time eager routing against the eager MainNet; a backend of
            :func:`sidenet.compile_for_serving` (``auto``, ...): time the model as served that way, over
            the best MainNet alone (the faster of eager and ``torch.compile``). See
            :func:`sidenet.timing.time_routed`.
        table_rows: rows of the threshold table besides the marked points.
    """

    max_accuracy_drop: float = 0.005
    confidence: float = 0.9
    bins: int = 15
    policies: Sequence[str] = POLICIES
    timing: bool = True
    timing_samples: int = 2048
    repeats: int = 3
    table_rows: int = 6
    compile_backend: str | None = None


@dataclass
class ThresholdChoice:
    """A threshold chosen on the calibration data, and the points it reaches on both data partitions."""

    threshold: float
    calibration: Point
    evaluation: Point
    oracle_fraction: float  # share of the oracle's compute saving it reaches on the evaluation data

    @classmethod
    def of(cls, threshold: float, calibration: TradeoffCurve, evaluation: TradeoffCurve) -> ThresholdChoice:
        return cls(
            threshold, calibration.at(threshold), evaluation.at(threshold), evaluation.oracle_fraction(threshold)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PolicyReport:
    """One exit rule at the fitted temperature: its curves and its thresholds chosen on calibration.

    ``policy`` is the rule ready to deploy: its kind, the fitted temperature, the guaranteed threshold.
    """

    policy: ExitPolicy
    calibration_curve: TradeoffCurve
    evaluation_curve: TradeoffCurve
    guaranteed: ThresholdChoice
    empirical: ThresholdChoice
    # The least compute within the tolerance on the evaluation curve itself: hindsight, for comparing
    # the rules' curves only, never for choosing.
    best_compute_evaluation: float

    @property
    def kind(self) -> str:
        return self.policy.kind

    @property
    def best_compute_calibration(self) -> float:
        """The least compute within the tolerance on the calibration curve: the empirical choice's, as
        that choice is exactly this least-compute point."""
        return self.empirical.calibration["relative_compute"]

    @property
    def oracle(self) -> Point:
        """The oracle's point on the evaluation data (exit iff the SideNet agrees with the MainNet)."""
        return self.evaluation_curve.oracle()

    def to_dict(self) -> dict[str, Any]:
        return {
            "guaranteed": self.guaranteed.to_dict(),
            "empirical": self.empirical.to_dict(),
            "best_compute_calibration": self.best_compute_calibration,
            "best_compute_evaluation": self.best_compute_evaluation,
            "oracle": self.oracle,
        }


@dataclass
class CalibrationReport:
    """Calibration metrics; the unsuffixed ones are on the evaluation data."""

    temperature: float  # fitted on the calibration data
    sidenet_before: CalibrationMetrics  # T = 1
    sidenet_after: CalibrationMetrics  # at the fitted temperature
    mainnet: CalibrationMetrics
    sidenet_before_calibration_split: CalibrationMetrics
    sidenet_after_calibration_split: CalibrationMetrics
    adaptive_at_guaranteed: CalibrationMetrics  # the recommended policy's answers
    fitted_on: str = "calibration split"

    def to_dict(self) -> dict[str, Any]:
        metrics = (
            "sidenet_before",
            "sidenet_after",
            "mainnet",
            "sidenet_before_calibration_split",
            "sidenet_after_calibration_split",
            "adaptive_at_guaranteed",
        )
        return {
            "temperature": self.temperature,
            "fitted_on": self.fitted_on,
            **{name: getattr(self, name).to_dict() for name in metrics},
        }


@dataclass
class ShiftChecks:
    """The shift check at the guaranteed threshold, two ways."""

    calibration_vs_evaluation: ShiftReport
    evaluation_half_vs_half: ShiftReport  # two random halves of the evaluation data

    def items(self) -> list[tuple[str, ShiftReport]]:
        return [
            ("calibration_vs_evaluation", self.calibration_vs_evaluation),
            ("evaluation_half_vs_half", self.evaluation_half_vs_half),
        ]

    def to_dict(self) -> dict[str, Any]:
        return {name: check.to_dict() for name, check in self.items()}


@dataclass
class ClassRow:
    """One class of the evaluation data at the guaranteed threshold of the recommended policy."""

    name: str
    samples: int
    exit_rate: float
    adaptive_accuracy: float
    mainnet_accuracy: float
    sidenet_accuracy: float

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.name, **{k: v for k, v in asdict(self).items() if k != "name"}}


@dataclass
class ThresholdRow:
    """A row of the threshold table: the recommended policy's evaluation point, the marks that land on
    it, and its measured throughput (None when not measured)."""

    threshold: float
    point: Point
    marks: list[str]
    throughput: float | None = None
    speedup: float | None = None

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {**self.point, "threshold": self.threshold, "marks": self.marks}
        if self.throughput is not None:
            row.update(throughput=self.throughput, speedup=self.speedup)
        return row


@dataclass(kw_only=True)
class ThroughputReport(RoutedTiming):
    """Samples per second of the MainNet alone and of the model at each table threshold (``points``,
    keyed by threshold), interleaved; speed-ups over the best MainNet alone (:class:`RoutedTiming`)."""

    @property
    def thresholds(self) -> dict[float, Timing]:
        return self.points

    def to_dict(self) -> dict[str, Any]:
        # Keyed by repr(threshold), which JSON keeps exactly; the best MainNet alone is the speed-up unit.
        unit = self.baseline_timing.throughput
        runners = {"mainnet": {**self.mainnet.to_dict(), "speedup": self.mainnet.throughput / unit}}
        runners |= {f"{t!r}": {**timing.to_dict(), "speedup": self.speedup(t)} for t, timing in self.points.items()}
        return {"samples": self.samples, "batches": self.batches, **self.baseline_dict(), "thresholds": runners}


@dataclass
class TradeoffReport:
    """Everything the page shows. ``recommended`` is the policy chosen on the calibration data alone
    (one of ``policies``); ``marks`` are its named thresholds; ``raw_evaluation`` holds the raw logits
    (before the temperature) that feed the reliability diagrams."""

    tap: str
    settings: ReportSettings
    calibration: CalibrationReport
    policies: dict[str, PolicyReport]
    recommended: PolicyReport
    marks: dict[str, float]
    shift: ShiftChecks
    per_class: list[ClassRow]
    thresholds: list[ThresholdRow]
    timing: ThroughputReport | None
    raw_evaluation: SweepRecord
    # The live audit of logged traffic (LiveAudit.to_dict()), when the report is given one.
    audit: dict[str, Any] | None = None

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    @property
    def curves(self) -> dict[str, TradeoffCurve]:
        """The evaluation curve of each policy (at the fitted temperature)."""
        return {kind: policy.evaluation_curve for kind, policy in self.policies.items()}

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready content of ``report.json``."""
        best = self.recommended
        curve = best.evaluation_curve
        settings = self.settings
        return {
            "tap": self.tap,
            "settings": {
                "max_accuracy_drop": settings.max_accuracy_drop,
                "confidence": settings.confidence,
                "bins": settings.bins,
                "policies": list(settings.policies),
            },
            "samples": {"calibration": best.calibration_curve.num_samples, "evaluation": curve.num_samples},
            "mainnet": {"accuracy": curve.mainnet_accuracy, "flops": curve.mainnet_flops},
            "sidenet_accuracy": curve.sidenet_accuracy,
            "calibration": self.calibration.to_dict(),
            "policies": {kind: policy.to_dict() for kind, policy in self.policies.items()},
            "recommended": {
                "policy": best.kind,
                "threshold": best.guaranteed.threshold,
                "temperature": self.temperature,
                "evaluation": best.guaranteed.evaluation,
                "oracle": best.oracle,
                "oracle_fraction": best.guaranteed.oracle_fraction,
            },
            "shift": self.shift.to_dict(),
            "per_class": [row.to_dict() for row in self.per_class],
            "thresholds": [row.to_dict() for row in self.thresholds],
            "timing": None if self.timing is None else self.timing.to_dict(),
            "audit": self.audit,
        }

    @property
    def summary(self) -> dict[str, Any]:
        """Same as :meth:`to_dict` (the name of earlier releases)."""
        return self.to_dict()
