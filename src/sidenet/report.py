"""The trade-off report of a fitted model on a dataset: calibration before and after temperature
scaling, every exit policy's curve, thresholds with and without a guarantee, the oracle bound, the
shift check, per-class behaviour and measured throughput. :func:`build_report` computes it as a
:class:`TradeoffReport`; :mod:`sidenet.report_page` writes it as HTML and Markdown, and
:meth:`TradeoffReport.to_dict` as ``report.json``.

Two data partitions play two roles: the *calibration* data fits the temperature and chooses the
thresholds; the *evaluation* data reports what they do on data they never saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from sidenet.calibration import CalibrationMetrics, calibration_metrics, fit_temperature, sidenet_logits
from sidenet.curve import SweepRecord, TradeoffCurve, collect
from sidenet.policy import ExitPolicy
from sidenet.report_data import (
    CalibrationReport,
    ClassRow,
    PolicyReport,
    ReportSettings,
    ShiftChecks,
    ThresholdChoice,
    ThresholdRow,
    ThroughputReport,
    TradeoffReport,
)
from sidenet.routing import AdaptiveModel
from sidenet.shift import confidence_shift
from sidenet.time_forecast import timed_parts
from sidenet.timing import input_batches, time_routed
from sidenet.training import to_mainnet

__all__ = [
    "ReportSettings",
    "TradeoffReport",
    "PolicyReport",
    "ThresholdChoice",
    "CalibrationReport",
    "ShiftChecks",
    "ClassRow",
    "ThresholdRow",
    "ThroughputReport",
    "build_report",
    "adaptive_log_probs",
]


def adaptive_log_probs(record: SweepRecord, threshold: float, temperature: float) -> np.ndarray:
    """Log-probabilities the adaptive model answers with: the SideNet's (at ``temperature``) where the
    sample exits, the MainNet's elsewhere."""
    if record.side_logits is None or record.main_logits is None:
        raise ValueError("the record holds no logits (build it with sidenet.curve.collect)")
    side = torch.log_softmax(torch.as_tensor(record.side_logits, dtype=torch.float64) / temperature, dim=1)
    main = torch.log_softmax(torch.as_tensor(record.main_logits, dtype=torch.float64), dim=1)
    exited = torch.as_tensor(record.confidence.astype(np.float32) >= np.float32(threshold))
    return torch.where(exited[:, None], side, main).numpy()


@contextmanager
def _exiting_by(model: AdaptiveModel, policy: ExitPolicy) -> Iterator[AdaptiveModel]:
    """``model`` answering under ``policy`` inside the block, its own policy back afterwards (``collect``
    and the timed passes read the exit rule from the model)."""
    saved = model.policy
    model.policy = policy
    try:
        yield model
    finally:
        model.policy = saved


def _rescored(
    model: AdaptiveModel, raw: SweepRecord, loader: Iterable, progress: bool, rule: ExitPolicy | None = None
) -> SweepRecord:
    """``raw`` (a sweep of ``loader``) scored under ``rule`` (default: the model's own exit rule): its
    SideNet logits give the confidences without running the MainNet again. Its FLOPs stay exact unless
    they credit samples in confidence order (text) and the new scores order the samples differently:
    then ``loader`` is swept again, the model answering under ``rule``."""
    rule = model.policy if rule is None else rule
    confidence = rule.confidence(torch.as_tensor(raw.side_logits)).numpy().astype(np.float64)
    if raw.order_dependent_flops and not np.array_equal(
        np.argsort(-raw.confidence, kind="stable"), np.argsort(-confidence, kind="stable")
    ):
        with _exiting_by(model, rule):
            return collect(model, loader, progress=progress)
    return replace(raw, confidence=confidence, exit_rule=rule)


def _policy_report(
    rule: ExitPolicy,
    model: AdaptiveModel,
    raw: tuple[SweepRecord, SweepRecord],
    loaders: tuple[Iterable, Iterable],
    settings: ReportSettings,
    progress: bool,
) -> PolicyReport:
    """``rule``'s curves on the (calibration, evaluation) records ``raw`` of ``loaders``, its thresholds
    chosen on calibration, and what they do on evaluation."""
    calibration, evaluation = (
        TradeoffCurve(_rescored(model, r, loader, progress, rule)) for r, loader in zip(raw, loaders, strict=True)
    )
    tolerance = settings.max_accuracy_drop
    guaranteed = calibration.threshold_for(max_accuracy_drop=tolerance, confidence=settings.confidence)
    empirical = calibration.threshold_for(max_accuracy_drop=tolerance)
    hindsight = evaluation.threshold_for(max_accuracy_drop=tolerance)
    return PolicyReport(
        policy=replace(rule, threshold=guaranteed),
        calibration_curve=calibration,
        evaluation_curve=evaluation,
        guaranteed=ThresholdChoice.of(guaranteed, calibration, evaluation),
        empirical=ThresholdChoice.of(empirical, calibration, evaluation),
        best_compute_evaluation=evaluation.at(hindsight)["relative_compute"],
    )


def _calibration(
    raw_cal: SweepRecord, raw_eval: SweepRecord, temperature: float, bins: int, adaptive: CalibrationMetrics
) -> CalibrationReport:
    def metrics(logits: Any, record: SweepRecord, **options: float) -> CalibrationMetrics:
        return calibration_metrics(logits, record.labels, bins, **options)

    return CalibrationReport(
        temperature=temperature,
        sidenet_before=metrics(raw_eval.side_logits, raw_eval),
        sidenet_after=metrics(raw_eval.side_logits, raw_eval, temperature=temperature),
        mainnet=metrics(raw_eval.main_logits, raw_eval),
        sidenet_before_calibration_split=metrics(raw_cal.side_logits, raw_cal),
        sidenet_after_calibration_split=metrics(raw_cal.side_logits, raw_cal, temperature=temperature),
        adaptive_at_guaranteed=adaptive,
    )


def _per_class(record: SweepRecord, threshold: float, class_names: Sequence[str]) -> list[ClassRow]:
    assert record.labels is not None and record.side_logits is not None
    exited = record.confidence.astype(np.float32) >= np.float32(threshold)
    correct = np.where(exited, record.side_correct, record.main_correct)
    rows = []
    for c in range(int(record.side_logits.shape[1])):
        mask = record.labels == c
        if mask.any():
            name = class_names[c] if c < len(class_names) else str(c)
            means = (exited[mask], correct[mask], record.main_correct[mask], record.side_correct[mask])
            rows.append(ClassRow(name, int(mask.sum()), *(float(values.mean()) for values in means)))
    return rows


def _table_thresholds(curve: TradeoffCurve, marks: dict[str, float], rows: int) -> list[float]:
    """The marked thresholds plus ``rows`` spread over the exit rate, without duplicates, high to low."""
    picks = {curve.index_of(t) for t in marks.values()}
    picks |= {min(int(np.searchsorted(curve.exit_rate, q)), len(curve) - 1) for q in np.linspace(0, 1, rows)}
    return [float(curve.thresholds[i]) for i in sorted(picks)]


def _throughput(
    model: AdaptiveModel,
    policy: ExitPolicy,
    loader: Iterable,
    thresholds: list[float],
    settings: ReportSettings,
    scores: np.ndarray,
    progress: bool = False,
) -> ThroughputReport:
    """Samples per second of the MainNet alone and of the model under ``policy`` at each threshold, on
    batches moved to the MainNet's device and dtype before timing (as the sweeps move them); eager, or
    as served by ``settings.compile_backend``. Routed eagerly on the CPU, each threshold's speed-up is also
    forecast from the parts on the evaluation ``scores`` (under ``policy``)."""
    loaded = input_batches(loader, settings.timing_samples, batch_size=model.split.batch_size)
    batches = [to_mainnet(model.split, batch) for batch in loaded]

    def at(threshold: float) -> Callable[[], None]:
        rule = replace(policy, threshold=threshold)

        def put() -> None:
            model.policy = rule

        return put

    points = {t: at(t) for t in thresholds}
    timing = time_routed(model, batches, points, settings.repeats, settings.compile_backend, progress)
    timing.parts, timing.forecasts = timed_parts(
        model, batches, scores, {t: t for t in thresholds}, settings.repeats, settings.compile_backend
    )
    return ThroughputReport(**vars(timing))


def build_report(
    model: AdaptiveModel,
    calibration_loader: Iterable,
    evaluation_loader: Iterable,
    settings: ReportSettings | None = None,
    class_names: Sequence[str] = (),
    progress: bool = True,
) -> TradeoffReport:
    """Compute the report; the model's exit policy (rule, temperature, threshold) is left as it was."""
    settings = settings or ReportSettings()
    tolerance, bins = settings.max_accuracy_drop, settings.bins
    model.eval()
    # 1. Temperature scaling of the SideNet on the calibration data (raw logits: policy-independent).
    # Trunk and SideNet suffice for T; the two full sweeps then run at T under the first policy, so that
    # the other policies' scores order the samples alike and are rescored without sweeping again
    # (at T = 1 saturated confidences tie, and breaking those ties would force new text sweeps).
    temperature = fit_temperature(*sidenet_logits(model, calibration_loader, progress=progress))
    # Each rule keeps the model's threshold: a record scored here equals a sweep of the model under it.
    rules = {kind: replace(model.policy, temperature=temperature, kind=kind) for kind in settings.policies}
    with _exiting_by(model, rules[settings.policies[0]]):
        raw_cal = collect(model, calibration_loader, progress=progress)  # its logits are raw whatever the policy
        raw_eval = collect(model, evaluation_loader, progress=progress)

    # 2. Every policy at the fitted temperature: curves, thresholds chosen on calibration, outcome on evaluation.
    loaders = (calibration_loader, evaluation_loader)
    policies = {
        kind: _policy_report(rule, model, (raw_cal, raw_eval), loaders, settings, progress)
        for kind, rule in rules.items()
    }

    # 3. The recommended policy is chosen on the calibration data alone; the rest is about it.
    best = min(policies.values(), key=lambda policy: policy.best_compute_calibration)
    curve, record, guaranteed = best.evaluation_curve, best.evaluation_curve.record, best.guaranteed.threshold
    marks = {
        f"guaranteed (<= {100 * tolerance:g} pt, {100 * settings.confidence:g}%)": guaranteed,
        f"empirical (<= {100 * tolerance:g} pt on calibration)": best.empirical.threshold,
    }
    # Hold the evaluation data to the thresholds' promises as new traffic: shift check, two-way.
    halves = np.random.default_rng(0).permutation(len(record))
    first, second = record.confidence[halves[: len(halves) // 2]], record.confidence[halves[len(halves) // 2 :]]
    shift = ShiftChecks(
        calibration_vs_evaluation=confidence_shift(
            best.calibration_curve.record.confidence, record.confidence, guaranteed
        ),
        evaluation_half_vs_half=confidence_shift(first, second, guaranteed),
    )
    adaptive = calibration_metrics(adaptive_log_probs(record, guaranteed, temperature), record.labels, bins)

    table = _table_thresholds(curve, marks, settings.table_rows)
    timing = None
    if settings.timing:
        with _exiting_by(model, best.policy):
            timing = _throughput(model, best.policy, evaluation_loader, table, settings, record.confidence, progress)
    rows = [
        ThresholdRow(
            threshold=t,
            point=curve.at(t),
            marks=[name for name, marked in marks.items() if curve.index_of(marked) == curve.index_of(t)],
            throughput=None if timing is None else timing.thresholds[t].throughput,
            speedup=None if timing is None else timing.speedup(t),
        )
        for t in table
    ]
    return TradeoffReport(
        tap=str(model.tap),
        settings=settings,
        calibration=_calibration(raw_cal, raw_eval, temperature, bins, adaptive),
        policies=policies,
        recommended=best,
        marks=marks,
        shift=shift,
        per_class=_per_class(record, guaranteed, class_names),
        thresholds=rows,
        timing=timing,
        raw_evaluation=raw_eval,
    )
