"""The trade-off report of a fitted model on a dataset: calibration before and after temperature
scaling, every exit policy's curve, thresholds with and without a guarantee, the oracle bound, the
shift check, per-class behaviour and measured throughput. :func:`build_report` computes it;
:mod:`sidenet.report_page` writes it as HTML and Markdown.

Two splits play two roles: the *calibration* split fits the temperature and chooses the thresholds;
the *evaluation* split reports what they do on data they never saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sidenet.calibration import calibration_metrics, fit_temperature, sidenet_logits
from sidenet.curve import SweepRecord, TradeoffCurve, collect
from sidenet.data import iter_batches
from sidenet.policy import NEVER_EXIT, POLICIES
from sidenet.routing import AdaptiveModel
from sidenet.shift import confidence_shift
from sidenet.timing import measure_throughput

__all__ = ["ReportSettings", "TradeoffReport", "build_report", "adaptive_log_probs"]


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


@dataclass
class TradeoffReport:
    """Everything the page shows: ``summary`` is JSON-ready; the curves and records feed the plots."""

    summary: dict[str, Any]
    curves: dict[str, TradeoffCurve]  # evaluation curve per policy (at the fitted temperature)
    raw_evaluation: SweepRecord  # its raw logits (before the temperature) feed the reliability diagrams
    temperature: float
    marks: dict[str, float] = field(default_factory=dict)  # named thresholds of the recommended policy


def adaptive_log_probs(record: SweepRecord, threshold: float, temperature: float) -> np.ndarray:
    """Log-probabilities the adaptive model answers with: the SideNet's (at ``temperature``) where the
    sample exits, the MainNet's elsewhere."""
    if record.side_logits is None or record.main_logits is None:
        raise ValueError("the record holds no logits (build it with sidenet.curve.collect)")
    side = torch.log_softmax(torch.as_tensor(record.side_logits, dtype=torch.float64) / temperature, dim=1)
    main = torch.log_softmax(torch.as_tensor(record.main_logits, dtype=torch.float64), dim=1)
    exited = torch.as_tensor(record.confidence.astype(np.float32) >= np.float32(threshold))
    return torch.where(exited[:, None], side, main).numpy()


def _per_class(record: SweepRecord, threshold: float, class_names: Sequence[str]) -> list[dict[str, Any]]:
    assert record.labels is not None
    exited = record.confidence.astype(np.float32) >= np.float32(threshold)
    correct = np.where(exited, record.side_correct, record.main_correct)
    rows = []
    for c in range(int(record.side_logits.shape[1])):  # type: ignore[union-attr]
        mask = record.labels == c
        if not mask.any():
            continue
        rows.append(
            {
                "class": class_names[c] if c < len(class_names) else str(c),
                "samples": int(mask.sum()),
                "exit_rate": float(exited[mask].mean()),
                "adaptive_accuracy": float(correct[mask].mean()),
                "mainnet_accuracy": float(record.main_correct[mask].mean()),
                "sidenet_accuracy": float(record.side_correct[mask].mean()),
            }
        )
    return rows


def _table_thresholds(curve: TradeoffCurve, marks: dict[str, float], rows: int) -> list[float]:
    """The marked thresholds plus ``rows`` spread over the exit rate, without duplicates, high to low."""
    picks = {curve._index_of(t) for t in marks.values()}
    picks |= {min(int(np.searchsorted(curve.exit_rate, q)), len(curve) - 1) for q in np.linspace(0, 1, rows)}
    return [float(curve.thresholds[i]) for i in sorted(picks)]


def _throughput(
    model: AdaptiveModel, loader: Iterable, thresholds: list[float], settings: ReportSettings
) -> dict[str, Any]:
    """Samples per second of the MainNet alone and of the model at each threshold, interleaved."""
    batches, count = [], 0
    for inputs, _ in iter_batches(loader):
        batches.append(inputs)
        count += model.split.batch_size(inputs)
        if count >= settings.timing_samples:
            break

    def at(threshold: float, mode: str = "adaptive"):  # noqa: ANN202 - a runner
        def run(x: Any) -> torch.Tensor:
            model.threshold = threshold
            return model(x, mode=mode).logits

        return run

    runners = {"mainnet": at(NEVER_EXIT, "main"), **{f"{t!r}": at(t) for t in thresholds}}
    timings = measure_throughput(runners, batches, repeats=settings.repeats, batch_size=model.split.batch_size)
    main = timings["mainnet"].throughput
    return {
        "samples": count,
        "batches": len(batches),
        "mainnet": timings["mainnet"].to_dict(),
        "thresholds": {key: {**t.to_dict(), "speedup": t.throughput / main} for key, t in timings.items()},
    }


def _rescored(model: AdaptiveModel, raw: SweepRecord, loader: Iterable, progress: bool) -> SweepRecord:
    """``raw`` scored under the model's current policy and temperature. The SideNet logits give the new
    confidences without running the MainNet again; its FLOPs stay exact unless they credit samples in
    confidence order (text) and the new scores order the samples differently: then ``loader`` is
    swept again."""
    confidence = model.policy.confidence(torch.as_tensor(raw.side_logits)).cpu().numpy().astype(np.float64)
    if raw.order_dependent_flops and not np.array_equal(
        np.argsort(-raw.confidence, kind="stable"), np.argsort(-confidence, kind="stable")
    ):
        return collect(model, loader, progress=progress)
    policy = {"kind": model.policy.kind, "temperature": model.policy.temperature}
    return dataclasses.replace(raw, confidence=confidence, policy=policy)


def build_report(
    model: AdaptiveModel,
    calibration_loader: Iterable,
    evaluation_loader: Iterable,
    settings: ReportSettings | None = None,
    class_names: Sequence[str] = (),
    progress: bool = True,
) -> TradeoffReport:
    """Compute the report; the model's policy, temperature and threshold are restored afterwards."""
    settings = settings or ReportSettings()
    saved = (model.policy_kind, model.temperature, model.threshold)
    model.eval()
    try:
        return _build(model, calibration_loader, evaluation_loader, settings, class_names, progress)
    finally:
        model.policy_kind, model.temperature, model.threshold = saved


def _build(
    model: AdaptiveModel,
    calibration_loader: Iterable,
    evaluation_loader: Iterable,
    settings: ReportSettings,
    class_names: Sequence[str],
    progress: bool,
) -> TradeoffReport:
    eps, conf = settings.max_accuracy_drop, settings.confidence
    # 1. Temperature scaling of the SideNet on the calibration split (raw logits: policy-independent).
    # Trunk and SideNet suffice for T; the two full sweeps then run at T under the first policy, so that
    # the other policies' scores order the samples alike and are rescored without sweeping again
    # (at T = 1 saturated confidences tie, and breaking those ties would force new text sweeps).
    temperature = fit_temperature(*sidenet_logits(model, calibration_loader, progress=progress))
    model.policy_kind, model.temperature = settings.policies[0], temperature
    raw_cal = collect(model, calibration_loader, progress=progress)  # its logits are raw whatever the policy
    raw_eval = collect(model, evaluation_loader, progress=progress)
    calibration = {
        "temperature": temperature,
        "fitted_on": "calibration split",
        "sidenet_before": calibration_metrics(raw_eval.side_logits, raw_eval.labels, settings.bins).to_dict(),
        "sidenet_after": calibration_metrics(
            raw_eval.side_logits, raw_eval.labels, settings.bins, temperature=temperature
        ).to_dict(),
        "mainnet": calibration_metrics(raw_eval.main_logits, raw_eval.labels, settings.bins).to_dict(),
        "sidenet_before_calibration_split": calibration_metrics(
            raw_cal.side_logits, raw_cal.labels, settings.bins
        ).to_dict(),
        "sidenet_after_calibration_split": calibration_metrics(
            raw_cal.side_logits, raw_cal.labels, settings.bins, temperature=temperature
        ).to_dict(),
    }

    # 2. Every policy at the fitted temperature: curves, thresholds chosen on calibration, outcome on evaluation.
    policies: dict[str, dict[str, Any]] = {}
    cal_curves: dict[str, TradeoffCurve] = {}
    eval_curves: dict[str, TradeoffCurve] = {}
    records: dict[str, SweepRecord] = {}
    for kind in settings.policies:
        model.policy_kind, model.temperature = kind, temperature
        cal = TradeoffCurve(_rescored(model, raw_cal, calibration_loader, progress))
        ev = TradeoffCurve(_rescored(model, raw_eval, evaluation_loader, progress))
        cal_curves[kind], eval_curves[kind], records[kind] = cal, ev, ev.record
        guaranteed = cal.threshold_for(max_accuracy_drop=eps, confidence=conf)
        empirical = cal.threshold_for(max_accuracy_drop=eps)
        policies[kind] = {
            "guaranteed": {
                "threshold": guaranteed,
                "calibration": cal.at(guaranteed),
                "evaluation": ev.at(guaranteed),
                "oracle_fraction": ev.oracle_fraction(guaranteed),
            },  # fmt: skip
            "empirical": {
                "threshold": empirical,
                "calibration": cal.at(empirical),
                "evaluation": ev.at(empirical),
                "oracle_fraction": ev.oracle_fraction(empirical),
            },  # fmt: skip
            # Curve quality, independent of any threshold choice: the least compute within the tolerance
            # on each split's own curve (on evaluation this is hindsight, for comparing rules only).
            "best_compute_calibration": cal.at(cal.threshold_for(max_accuracy_drop=eps))["relative_compute"],
            "best_compute_evaluation": ev.at(ev.threshold_for(max_accuracy_drop=eps))["relative_compute"],
            "oracle": ev.oracle(),
        }
    # The recommended policy is chosen on the calibration split alone.
    best = min(policies, key=lambda k: policies[k]["best_compute_calibration"])
    curve, record = eval_curves[best], records[best]
    guaranteed = policies[best]["guaranteed"]["threshold"]
    empirical = policies[best]["empirical"]["threshold"]
    marks = {
        f"guaranteed (<= {100 * eps:g} pt, {100 * conf:g}%)": guaranteed,
        f"empirical (<= {100 * eps:g} pt on calibration)": empirical,
    }
    # Hold the evaluation data to the thresholds' promises as new traffic: shift check, two-way.
    ref = cal_curves[best].record.confidence
    halves = np.random.default_rng(0).permutation(len(record))
    shift = {
        "calibration_vs_evaluation": confidence_shift(ref, record.confidence, guaranteed).to_dict(),
        "evaluation_half_vs_half": confidence_shift(
            record.confidence[halves[: len(halves) // 2]], record.confidence[halves[len(halves) // 2 :]], guaranteed
        ).to_dict(),
    }
    model.policy_kind, model.temperature = best, temperature
    adaptive = calibration_metrics(adaptive_log_probs(record, guaranteed, temperature), record.labels, settings.bins)
    calibration["adaptive_at_guaranteed"] = adaptive.to_dict()

    table_thresholds = _table_thresholds(curve, marks, settings.table_rows)
    timing = _throughput(model, evaluation_loader, table_thresholds, settings) if settings.timing else None
    rows = []
    for t in table_thresholds:
        same = [k for k, v in marks.items() if curve._index_of(v) == curve._index_of(t)]
        row: dict[str, Any] = {**curve.at(t), "threshold": t, "marks": same}
        if timing is not None:
            row["throughput"] = timing["thresholds"][f"{t!r}"]["throughput"]
            row["speedup"] = timing["thresholds"][f"{t!r}"]["speedup"]
        rows.append(row)

    summary = {
        "tap": str(model.tap),
        "settings": {
            "max_accuracy_drop": eps,
            "confidence": conf,
            "bins": settings.bins,
            "policies": list(settings.policies),
        },  # fmt: skip
        "samples": {"calibration": cal_curves[best].num_samples, "evaluation": curve.num_samples},
        "mainnet": {"accuracy": curve.mainnet_accuracy, "flops": curve.mainnet_flops},
        "sidenet_accuracy": curve.sidenet_accuracy,
        "calibration": calibration,
        "policies": policies,
        "recommended": {
            "policy": best,
            "threshold": guaranteed,
            "temperature": temperature,
            "evaluation": curve.at(guaranteed),
            "oracle": curve.oracle(),
            "oracle_fraction": curve.oracle_fraction(guaranteed),
        },  # fmt: skip
        "shift": shift,
        "per_class": _per_class(record, guaranteed, class_names),
        "thresholds": rows,
        "timing": timing,
    }
    return TradeoffReport(summary, eval_curves, raw_eval, temperature, marks)
