"""The trade-off report of a saved cascade of SideNets on a dataset (``sidenet report`` on a cascade
folder): the cascade's parts and their FLOPs, each SideNet's calibration, accuracy and agreement with
the MainNet, the trade-off along a path of threshold vectors with the saved thresholds and the oracle,
thresholds chosen with and without a guarantee, the shift check and measured throughput.
:func:`build_cascade_report` computes it as a :class:`CascadeReport`;
:mod:`sidenet.report_cascade_page` writes it as HTML, Markdown and ``report.json``.

As in :mod:`sidenet.report`, the *calibration* data fits temperatures, builds the path and chooses
thresholds; the *evaluation* data reports what they do on data they never saw. The model is scored
under its saved exit rules (saved temperatures: the saved thresholds mean what they meant when
chosen); temperatures refitted here are measured, never installed in the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sidenet.calibration import CalibrationMetrics, calibration_metrics, every_sidenet_logits, fit_temperature
from sidenet.cascade_choice import DEFAULT_FAMILY, FAMILIES, threshold_path
from sidenet.cascade_curve import CascadeCurve, CascadeRecord, Thresholds
from sidenet.cascade_record import collect_cascade
from sidenet.report_data import ReportSettings, ShiftChecks
from sidenet.routing import AdaptiveModel
from sidenet.shift import confidence_shift
from sidenet.time_forecast import timed_parts
from sidenet.timing import RoutedTiming, input_batches, time_routed
from sidenet.training import to_mainnet

__all__ = ["CascadeReport", "SideNetSummary", "CascadePoint", "CascadeThroughput", "build_cascade_report"]

Point = dict[str, Any]  # an operating point of a CascadeCurve (CascadeCurve.at)
HOLDOUT = 0.5  # share of the calibration samples that certify the guaranteed thresholds


def clean(value: Any) -> Any:
    """``value`` for JSON: tuples as lists, non-finite floats (never-exit thresholds, NaN) as null."""
    if isinstance(value, dict):
        return {key: clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [clean(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass
class SideNetSummary:
    """One SideNet of the cascade: its size and FLOPs, its saved exit rule, and on the evaluation data
    its calibration (at T = 1, the saved T and a T refitted on the calibration data), accuracy and
    agreement with the MainNet (every sample counted, exit or not)."""

    tap: str
    parameters: int
    hidden: int
    segment_flops: float  # mean FLOPs per sample of the MainNet segment that ends at this tap
    side_flops: float  # mean FLOPs per sample of this SideNet
    policy: str
    threshold: float
    temperature: float  # saved
    fitted_temperature: float  # fitted on the calibration data, not installed
    ece_raw: CalibrationMetrics  # T = 1
    ece_saved: CalibrationMetrics
    ece_fitted: CalibrationMetrics
    accuracy: float
    agreement: float

    def to_dict(self) -> dict[str, Any]:
        metrics = {"ece_raw": self.ece_raw, "ece_saved": self.ece_saved, "ece_fitted": self.ece_fitted}
        plain = {k: v for k, v in vars(self).items() if k not in metrics}
        return clean({**plain, **{name: m.to_dict() for name, m in metrics.items()}})


@dataclass
class CascadePoint:
    """A threshold vector, how it was chosen, its point on the data it was chosen (or certified) on and
    on the evaluation data, and the share of the oracle's saving it reaches there."""

    thresholds: Thresholds
    how: str
    calibration: Point
    evaluation: Point
    oracle_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return clean(vars(self))


@dataclass(kw_only=True)
class CascadeThroughput(RoutedTiming):
    """Samples per second of the MainNet alone and of the cascade at each named threshold vector
    (``points``), timed interleaved on the same batches (the loader's batch size); speed-ups over the
    best MainNet alone (:class:`~sidenet.timing.RoutedTiming`)."""

    def to_dict(self) -> dict[str, Any]:
        points = {name: {**t.to_dict(), "speedup": self.speedup(name)} for name, t in self.points.items()}
        return {"samples": self.samples, "batches": self.batches, **self.baseline_dict(), "points": points}


@dataclass
class CascadeReport:
    """Everything the cascade's page shows; :meth:`to_dict` is ``report.json``. ``points`` holds the
    saved, empirical and guaranteed vectors; ``table`` the evaluation points shown (path points spread
    along it, then the named ones), the MainNet's first."""

    taps: list[str]
    settings: ReportSettings
    family: str
    family_source: str
    sidenets: list[SideNetSummary]
    rest_flops: float  # mean FLOPs per sample of the MainNet after the last tap
    calibration_curve: CascadeCurve
    evaluation_curve: CascadeCurve
    guaranteed_path: list[Thresholds]  # built on one half of the calibration data
    points: dict[str, CascadePoint]
    table: list[tuple[Point, list[str]]]
    shift: ShiftChecks
    timing: CascadeThroughput | None
    main_logits: np.ndarray  # evaluation data, for the reliability diagram
    side_logits: list[np.ndarray]  # raw, per SideNet
    labels: np.ndarray
    audit: dict[str, Any] | None = None  # the live audit of logged traffic (LiveAudit.to_dict()), if given

    @property
    def oracle(self) -> Point:
        return self.evaluation_curve.oracle()

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready content of ``report.json`` (never-exit thresholds as null)."""
        curve, settings = self.evaluation_curve, self.settings
        return clean(
            {
                "taps": self.taps,
                "settings": {
                    "max_accuracy_drop": settings.max_accuracy_drop,
                    "confidence": settings.confidence,
                    "bins": settings.bins,
                    "holdout": HOLDOUT,
                },
                "family": self.family,
                "family_source": self.family_source,
                "samples": {"calibration": self.calibration_curve.num_samples, "evaluation": curve.num_samples},
                "mainnet": {"accuracy": curve.mainnet_accuracy, "flops": curve.mainnet_flops},
                "rest_flops": self.rest_flops,
                "sidenets": [s.to_dict() for s in self.sidenets],
                "points": {name: point.to_dict() for name, point in self.points.items()},
                "oracle": self.oracle,
                "table": [{**point, "marks": marks} for point, marks in self.table],
                "guaranteed_path": self.guaranteed_path,
                "evaluation_curve": curve.to_dict(),
                "shift": self.shift.to_dict(),
                "timing": None if self.timing is None else self.timing.to_dict(),
                "audit": self.audit,
            }
        )


def saved_family(model: AdaptiveModel) -> tuple[str, str]:
    """The threshold family of the saved choice (``sidenet fit --taps``), or the default; and which."""
    choice = model.config.metadata.get("threshold_choice")
    family = choice.get("family") if isinstance(choice, dict) else None
    if family in FAMILIES:
        return family, "saved choice"
    return DEFAULT_FAMILY, "default (no family saved)"


def _guaranteed(record: CascadeRecord, family: str, settings: ReportSettings) -> tuple[Thresholds, Point, list]:
    """Thresholds for the cascade's own taps with the guarantee: the path built on one half of the
    calibration data, the thresholds certified along it (Learn-then-Test) on the other half, split as
    :func:`sidenet.cascade_choice.choose_taps` splits with ``holdout``. Returns the vector, its point on
    the certifying half and the path."""
    n = len(record)
    cut = int(round(HOLDOUT * n))
    if cut == 0 or cut == n:
        raise ValueError(f"the guarantee needs calibration samples on both halves; got {n} sample(s)")
    order = np.random.default_rng(0).permutation(n)
    build, certify = record.subset(np.sort(order[cut:])), record.subset(np.sort(order[:cut]))
    path = threshold_path(build, family)
    curve = CascadeCurve(certify, path)
    vector = curve.threshold_for(max_accuracy_drop=settings.max_accuracy_drop, confidence=settings.confidence)
    return vector, curve.at(vector), curve.path


def _table(curve: CascadeCurve, marks: dict[str, Thresholds], rows: int) -> list[tuple[Point, list[str]]]:
    """The MainNet's point, about ``rows`` points spread along the path and the marked vectors (one row
    per distinct vector, its marks beside it), dearest first."""
    picks = sorted({int(i) for i in np.linspace(0, len(curve) - 1, max(rows, 2)).round()})
    vectors: dict[Thresholds, list[str]] = {curve.path[i]: [] for i in picks}
    for name, vector in marks.items():
        vectors.setdefault(tuple(vector), []).append(name)
    entries = [(curve.at(vector), names) for vector, names in vectors.items()]
    first, rest = entries[0], sorted(entries[1:], key=lambda entry: -entry[0]["relative_compute"])
    return [first, *rest]


def _throughput(
    model: AdaptiveModel,
    loader: Iterable,
    points: dict[str, Thresholds],
    settings: ReportSettings,
    scores: np.ndarray,
    progress: bool = False,
) -> CascadeThroughput:
    """:class:`CascadeThroughput` of the MainNet alone and the cascade at each of ``points``, on the first
    ``settings.timing_samples`` evaluation samples moved to the MainNet's device first; eager, or as
    served by ``settings.compile_backend``. The model's own exit rules are put back afterwards. Routed
    eagerly on the CPU, each point's speed-up is also forecast from the parts on the evaluation ``scores``."""
    loaded = input_batches(loader, settings.timing_samples, batch_size=model.split.batch_size)
    batches = [to_mainnet(model.split, batch) for batch in loaded]

    def at(vector: Thresholds) -> Callable[[], None]:
        def put() -> None:
            model.thresholds = vector

        return put

    puts = {name: at(vector) for name, vector in points.items()}
    timing = time_routed(model, batches, puts, settings.repeats, settings.compile_backend, progress)
    timing.parts, timing.forecasts = timed_parts(
        model, batches, scores, points, settings.repeats, settings.compile_backend
    )
    return CascadeThroughput(**vars(timing))


def _sidenets(
    model: AdaptiveModel,
    record: CascadeRecord,
    calibration_logits: list[np.ndarray],
    calibration_labels: np.ndarray,
    evaluation: tuple[list[np.ndarray], np.ndarray],
    bins: int,
) -> list[SideNetSummary]:
    """Each SideNet's summary; FLOPs, accuracy and agreement from the evaluation ``record``."""
    logits, labels = evaluation
    summaries = []
    for k, (rule, config, head) in enumerate(zip(model.policies, model.configs, model.sidenets, strict=True)):
        fitted = fit_temperature(calibration_logits[k], calibration_labels)
        summaries.append(
            SideNetSummary(
                tap=str(model.taps[k]),
                parameters=sum(p.numel() for p in head.parameters()),
                hidden=config.hidden,
                segment_flops=float(record.segment_flops[:, k].mean()),
                side_flops=float(record.side_flops[:, k].mean()),
                policy=rule.kind,
                threshold=rule.threshold,
                temperature=rule.temperature,
                fitted_temperature=fitted,
                ece_raw=calibration_metrics(logits[k], labels, bins),
                ece_saved=calibration_metrics(logits[k], labels, bins, temperature=rule.temperature),
                ece_fitted=calibration_metrics(logits[k], labels, bins, temperature=fitted),
                accuracy=float(record.side_correct[:, k].mean()),
                agreement=float(record.agree[:, k].mean()),
            )
        )
    return summaries


def build_cascade_report(
    model: AdaptiveModel,
    calibration_loader: Iterable,
    evaluation_loader: Iterable,
    settings: ReportSettings | None = None,
    progress: bool = True,
) -> CascadeReport:
    """Compute the report of ``model`` (a cascade, or one SideNet as the cascade of length one) under its
    saved exit rules; the model is left as it was. Needs labels on both data partitions."""
    settings = settings or ReportSettings()
    model.eval()
    tolerance = settings.max_accuracy_drop
    cal_record = collect_cascade(model, calibration_loader, progress=progress)
    eval_record = collect_cascade(model, evaluation_loader, progress=progress)
    # Per-SideNet calibration reads raw logits: one more MainNet pass per data partition.
    cal_logits, _, cal_labels = every_sidenet_logits(model, calibration_loader, progress)
    eval_logits, main_logits, eval_labels = every_sidenet_logits(model, evaluation_loader, progress, mainnet=True)

    # The trade-off along a path built on the calibration data, evaluated on data it never saw.
    family, source = saved_family(model)
    path = threshold_path(cal_record, family)
    calibration, evaluation = CascadeCurve(cal_record, path), CascadeCurve(eval_record, path)
    saved = tuple(model.thresholds)
    empirical = calibration.threshold_for(max_accuracy_drop=tolerance)
    guaranteed, certified, guaranteed_path = _guaranteed(cal_record, family, settings)
    drop, level = f"<= {100 * tolerance:g} pt", f"{100 * settings.confidence:g}%"

    def chosen(vector: Thresholds, how: str, there: Point) -> CascadePoint:
        return CascadePoint(vector, how, there, evaluation.at(vector), evaluation.oracle_fraction(vector))

    points = {
        "saved": chosen(saved, "saved with the model", calibration.at(saved)),
        "empirical": chosen(empirical, f"least compute {drop} on calibration", calibration.at(empirical)),
        "guaranteed": chosen(
            guaranteed,
            f"{drop} with probability {level}: path on half of calibration, certified on the other half",
            certified,
        ),
    }

    # Is the evaluation data like the calibration data? The first SideNet's scores (every sample gets one).
    first = eval_record.confidence[:, 0]
    halves = np.random.default_rng(0).permutation(len(first))
    shift = ShiftChecks(
        calibration_vs_evaluation=confidence_shift(cal_record.confidence[:, 0], first, saved[0]),
        evaluation_half_vs_half=confidence_shift(
            first[halves[: len(halves) // 2]], first[halves[len(halves) // 2 :]], saved[0]
        ),
    )
    timing = None
    if settings.timing:
        vectors = {name: point.thresholds for name, point in points.items()}
        timing = _throughput(model, evaluation_loader, vectors, settings, eval_record.confidence, progress)
    marks = {f"{name} thresholds": point.thresholds for name, point in points.items()}
    return CascadeReport(
        taps=[str(tap) for tap in model.taps],
        settings=settings,
        family=family,
        family_source=source,
        sidenets=_sidenets(model, eval_record, cal_logits, cal_labels, (eval_logits, eval_labels), settings.bins),
        rest_flops=float(eval_record.segment_flops[:, -1].mean()),
        calibration_curve=calibration,
        evaluation_curve=evaluation,
        guaranteed_path=guaranteed_path,
        points=points,
        table=_table(evaluation, marks, settings.table_rows),
        shift=shift,
        timing=timing,
        main_logits=main_logits,
        side_logits=eval_logits,
        labels=eval_labels,
    )
