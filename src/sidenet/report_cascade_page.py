"""Write a :class:`sidenet.report_cascade.CascadeReport` as a self-contained HTML page (plots embedded as
base64 PNG), a Markdown summary beside its PNG files, and ``report.json``; with the page pieces of
:mod:`sidenet.report_page` (tables, style, number formats). Also the ``sidenet report`` run of a
cascade folder, :func:`cascade_report_files`."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sidenet.calibration import reliability_diagram
from sidenet.policy import format_threshold
from sidenet.report_cascade import CascadeReport, build_cascade_report
from sidenet.report_data import ReportSettings
from sidenet.report_page import AUDIT_SECTION, audit_table, audit_warning, below, pct, shift_rows, write_pages
from sidenet.routing import AdaptiveModel

__all__ = ["write_cascade_report", "cascade_report_files"]

Table = tuple[list[str], list[list[str]]]


def _vector(thresholds: Iterable[float]) -> str:
    return " / ".join(format_threshold(t) for t in thresholds)


def _rates(point: dict[str, Any]) -> str:
    return " / ".join(pct(rate) for rate in point["exit_rates"])


def _mflops(flops: float, mainnet: float) -> str:
    return f"{flops / 1e6:.3f} ({flops / mainnet:.1%})"


def _cascade_table(report: CascadeReport) -> Table:
    mainnet = report.evaluation_curve.mainnet_flops
    rows = [
        [
            s.tap,
            str(s.hidden),
            f"{s.parameters:,}",
            _mflops(s.segment_flops, mainnet),
            _mflops(s.side_flops, mainnet),
            s.policy,
            format_threshold(s.threshold),
            f"{s.temperature:.3f}",
        ]
        for s in report.sidenets
    ]
    rows.append(["rest of the MainNet", "", "", _mflops(report.rest_flops, mainnet), "", "", "", ""])
    header = ["tap", "hidden", "parameters", "MainNet segment to it, MFLOPs", "SideNet, MFLOPs", "exit rule"]
    return [*header, "saved threshold", "saved temperature"], rows


def _sidenet_table(report: CascadeReport) -> Table:
    rows = [
        [
            s.tap,
            pct(s.accuracy),
            pct(s.agreement),
            pct(s.ece_raw.ece),
            f"{pct(s.ece_saved.ece)} (T {s.temperature:.3f})",
            f"{pct(s.ece_fitted.ece)} (T {s.fitted_temperature:.3f})",
        ]
        for s in report.sidenets
    ]
    header = ["tap", "accuracy", "agrees with MainNet", "ECE, T = 1", "ECE, saved T", "ECE, T fitted on calibration"]
    return header, rows


def _tradeoff_table(report: CascadeReport) -> Table:
    rows = []
    for point, marks in report.table:
        rows.append(
            [
                _vector(point["thresholds"]),
                pct(point["accuracy"]),
                f"{100 * point['accuracy_drop']:+.2f}",
                pct(point["disagreement"]),
                pct(point["exit_rate"]),
                _rates(point),
                f"{point['mean_flops'] / 1e6:.3f}",
                f"{point['relative_compute']:.3f}",
                ", ".join([*marks, *(["MainNet answers all"] if all(map(math.isinf, point["thresholds"])) else [])]),
            ]
        )
    oracle = report.oracle
    rows.append(["oracle", pct(oracle["accuracy"]), f"{100 * oracle['accuracy_drop']:+.2f}", "0.00%"])
    rows[-1] += [pct(oracle["exit_rate"]), _rates(oracle), f"{oracle['mean_flops'] / 1e6:.3f}"]
    rows[-1] += [f"{oracle['relative_compute']:.3f}", "exit at the first SideNet that agrees with the MainNet"]
    header = ["thresholds", "accuracy", "drop (pt)", "disagreement", "exit rate", "exits per SideNet", "MFLOPs"]
    return [*header, "compute", "point"], rows


def _points_table(report: CascadeReport) -> Table:
    rows = []
    for name, point in report.points.items():
        there, here = point.calibration, point.evaluation
        speed = "not measured"
        if report.timing is not None:
            speed = report.timing.speed(name)
        rows.append(
            [
                name,
                _vector(point.thresholds),
                point.how,
                f"{100 * there['accuracy_drop']:+.2f}",
                f"{there['relative_compute']:.3f}",
                f"{100 * here['accuracy_drop']:+.2f}",
                pct(here["exit_rate"]),
                _rates(here),
                f"{here['relative_compute']:.3f}",
                "n/a" if math.isnan(point.oracle_fraction) else f"{point.oracle_fraction:.2f}",
                speed,
            ]
        )
    header = ["point", "thresholds", "chosen", "drop (pt), calibration", "compute, calibration", "drop (pt)"]
    header += ["exit rate", "exits per SideNet", "compute", "oracle fraction", "samples/s (speed-up)"]
    return header, rows


def _shift_table(report: CascadeReport) -> Table:
    header = ["comparison", "verdict", "KS statistic", "p-value", "first exit rate (reference)"]
    return [*header, "first exit rate (new)"], shift_rows(report.shift)


def _headline(report: CascadeReport) -> list[str]:
    curve, settings = report.evaluation_curve, report.settings
    saved, guaranteed = report.points["saved"], report.points["guaranteed"]
    point, oracle = saved.evaluation, report.oracle
    fraction = "n/a" if math.isnan(saved.oracle_fraction) else f"{saved.oracle_fraction:.0%}"
    lines = [
        f"Cascade of {len(report.taps)} SideNets at taps {' -> '.join(report.taps)}; thresholds "
        f"{_vector(saved.thresholds)} as saved, scored at the saved temperatures.",
        f"On {curve.num_samples} evaluation samples at the saved thresholds: accuracy {pct(point['accuracy'])} vs "
        f"MainNet {pct(curve.mainnet_accuracy)} ({below(point['accuracy_drop'])}), exit rate "
        f"{pct(point['exit_rate'])} ({_rates(point)} per SideNet), compute {pct(point['relative_compute'])} of the "
        f"MainNet; the oracle needs {pct(oracle['relative_compute'])}, so these thresholds save {fraction} of what "
        "the oracle saves.",
        f"Guaranteed thresholds {_vector(guaranteed.thresholds)} (accuracy drop above "
        f"{100 * settings.max_accuracy_drop:g} points with probability at most {100 * (1 - settings.confidence):g}%, "
        f"exchangeable data assumed): drop {100 * guaranteed.evaluation['accuracy_drop']:+.2f} pt, compute "
        f"{pct(guaranteed.evaluation['relative_compute'])} on the evaluation data.",
        "SideNet ECE at the saved temperatures: "
        + ", ".join(f"tap {s.tap}: {pct(s.ece_saved.ece)}" for s in report.sidenets)
        + " (temperatures refitted on the calibration data are shown beside them; the saved model is unchanged).",
    ]
    if report.timing is not None:
        forecast = report.timing.forecast_speedup("saved")
        beside = "" if forecast is None else f" (forecast from its parts' timing per routed batch: {forecast:.2f}x)"
        lines.append(
            f"Measured throughput at the saved thresholds: {report.timing.speedup('saved'):.2f}x the best MainNet "
            f"alone's{beside}. {report.timing.describe()}"
        )
    lines += audit_warning(report.audit)
    shift = report.shift.calibration_vs_evaluation
    if shift.shifted:
        lines.append(
            f"WARNING: the first SideNet's scores on the evaluation data differ from the calibration data (KS p = "
            f"{shift.p_value:.2g}): the guarantee does not cover this data."
        )
    return lines


def write_cascade_report(report: CascadeReport, out: str | Path, title: str) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained), ``report.md``, the PNGs and ``report.json`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    taps = " -> ".join(report.taps)
    # One mark per distinct vector (the saved and the empirical one often coincide), named by all its points.
    same: dict[tuple[float, ...], list[str]] = {}
    for name, point in report.points.items():
        same.setdefault(tuple(point.thresholds), []).append(name)
    marks = {", ".join(names): vector for vector, names in same.items()}
    panels = {
        f"tap {s.tap}, T = {s.temperature:.2f}": (logits / s.temperature, report.labels)
        for s, logits in zip(report.sidenets, report.side_logits, strict=True)
    }
    images = {
        "curve": report.evaluation_curve.plot(out / "curve.png", marks=marks, title=f"Evaluation data, taps {taps}"),
        "reliability": reliability_diagram(
            out / "reliability.png",
            {**panels, "MainNet": (report.main_logits, report.labels)},
            bins=report.settings.bins,
            title="Reliability on the evaluation data (saved temperatures)",
        ),
    }
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    path_note = f"path: family {report.family} ({report.family_source}), built on the calibration data"
    sections: list[tuple[str, str | None, Table]] = [
        ("The cascade (FLOPs per sample on the evaluation data)", None, _cascade_table(report)),
        ("SideNets on the evaluation data (every sample, exit or not)", "reliability", _sidenet_table(report)),
        (f"Compute-accuracy trade-off on the evaluation data ({path_note})", "curve", _tradeoff_table(report)),
        ("Chosen thresholds, reported on the evaluation data", None, _points_table(report)),
        ("Shift check (two-sample Kolmogorov-Smirnov on the first SideNet's scores)", None, _shift_table(report)),
    ]
    if report.audit is not None:  # the live audit runs the whole cascade on its drawn samples
        sections.append((AUDIT_SECTION[0], None, audit_table(report.audit)))
    return write_pages(out, title, _headline(report), sections, images)


def cascade_report_files(
    model: AdaptiveModel,
    loaders: tuple[Iterable, Iterable],
    settings: ReportSettings,
    out: Path,
    title: str,
    progress: bool = True,
    audit: dict | None = None,
) -> tuple[Path, Path]:
    """``sidenet report`` of a cascade: build the report on the (calibration, evaluation) ``loaders`` and
    write it into ``out``, with ``audit`` (the live audit of logged traffic, ``LiveAudit.to_dict()``) when
    given; returns the HTML and Markdown paths."""
    report = build_cascade_report(model, *loaders, settings, progress=progress)
    report.audit = audit
    return write_cascade_report(report, out, title)
