"""Write a :class:`sidenet.report_data.TradeoffReport` as a self-contained HTML page (plots embedded
as base64 PNG, no external resources), a Markdown summary beside its PNG files, and ``report.json``.
It reads the report's typed fields; only ``report.json`` is the report serialised."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from sidenet.calibration import CalibrationMetrics, reliability_diagram
from sidenet.plotting import pyplot, save_figure
from sidenet.policy import format_threshold
from sidenet.report_data import ClassRow, TradeoffReport

__all__ = ["write_report", "plot_policies"]

COLORS = {"max_softmax": "#4C72B0", "entropy": "#55A868", "margin": "#C44E52"}


def pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def below(drop: float) -> str:
    """An accuracy drop (a fraction; negative: a gain) in words, for a sentence: "0.20 pt below"."""
    points = 100 * drop
    return "the same" if round(points, 2) == 0 else f"{abs(points):.2f} pt {'below' if points > 0 else 'above'}"


def plot_policies(report: TradeoffReport, path: Path, title: str) -> Path:
    """Accuracy against relative compute for every policy on the evaluation split, the MainNet point,
    the oracle point and the marked thresholds of the recommended policy."""
    plt = pyplot()

    best = report.recommended.kind
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=120)
    for kind, curve in report.curves.items():
        ax.plot(
            curve.relative_compute,
            100 * curve.accuracy,
            lw=1.8 if kind == best else 1.1,
            color=COLORS.get(kind),
            label=f"{kind}" + (" (recommended)" if kind == best else ""),
        )
    curve = report.curves[best]
    ax.scatter([1.0], [100 * curve.mainnet_accuracy], color="black", zorder=4, label="MainNet alone")
    ax.axhline(100 * curve.mainnet_accuracy, color="black", lw=0.6, ls=":")
    oracle = curve.oracle()
    ax.scatter(
        [oracle["relative_compute"]],
        [100 * oracle["accuracy"]],
        marker="*",
        s=160,
        color="#8172B2",
        zorder=5,
        label="oracle (exit iff SideNet = MainNet)",
    )
    for i, (name, threshold) in enumerate(report.marks.items()):
        point = curve.at(threshold)
        ax.scatter([point["relative_compute"]], [100 * point["accuracy"]], marker="D", zorder=6, color=f"C{i + 3}")
        ax.annotate(
            f"{name}\nexit {point['exit_rate']:.0%}, compute {point['relative_compute']:.0%}",
            (point["relative_compute"], 100 * point["accuracy"]),
            textcoords="offset points",
            xytext=(10, -24 - 22 * i),
            fontsize=7,
            arrowprops={"arrowstyle": "-", "lw": 0.5},
        )
    low = min(100 * curve.mainnet_accuracy - 4, 100 * curve.accuracy[curve.relative_compute < 1.05].min())
    top = max(max(c.accuracy.max() for c in report.curves.values()), curve.mainnet_accuracy)
    ax.set_ylim(max(low, 100 * min(c.sidenet_accuracy for c in report.curves.values()) - 1), 100 * top + 0.5)
    ax.set_xlabel("compute per sample relative to the MainNet (measured FLOPs)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    return save_figure(fig, path)


def _plot_per_class(rows: list[ClassRow], path: Path) -> Path:
    plt = pyplot()

    names = [r.name for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4.5, 0.7 * len(rows) + 2), 3.4), dpi=110)
    ax.bar(x - 0.2, [100 * r.exit_rate for r in rows], 0.4, label="exit rate", color="#4C72B0")
    ax.bar(x + 0.2, [100 * r.adaptive_accuracy for r in rows], 0.4, label="adaptive accuracy", color="#55A868")
    ax.scatter(
        x + 0.2,
        [100 * r.mainnet_accuracy for r in rows],
        color="black",
        marker="_",
        s=200,
        zorder=3,
        label="MainNet accuracy",
    )
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)


def _tables(report: TradeoffReport) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Each table as (header, rows) of strings, shared by the HTML and the Markdown."""
    calibration = report.calibration
    metrics: dict[str, CalibrationMetrics] = {
        "SideNet, T = 1": calibration.sidenet_before,
        f"SideNet, T = {calibration.temperature:.3f}": calibration.sidenet_after,
        "MainNet": calibration.mainnet,
        "adaptive (guaranteed threshold)": calibration.adaptive_at_guaranteed,
    }
    metric_rows = [
        [name, pct(m.ece), pct(m.ece_mass), pct(m.mce), f"{m.brier:.4f}", f"{m.nll:.4f}", pct(m.accuracy)]
        for name, m in metrics.items()
    ]
    policy_rows = []
    for kind, policy in report.policies.items():
        guaranteed, empirical = policy.guaranteed, policy.empirical
        policy_rows.append(
            [
                kind,
                f"{policy.best_compute_calibration:.3f}",
                f"{policy.best_compute_evaluation:.3f}",
                format_threshold(guaranteed.threshold),
                f"{100 * guaranteed.evaluation['accuracy_drop']:+.2f}",
                f"{guaranteed.evaluation['relative_compute']:.3f}",
                f"{guaranteed.oracle_fraction:.2f}",
                format_threshold(empirical.threshold),
                f"{100 * empirical.evaluation['accuracy_drop']:+.2f}",
                f"{empirical.evaluation['relative_compute']:.3f}",
            ]
        )
    threshold_rows = []
    for row in report.thresholds:
        point = row.point
        speed = (
            "not measured" if row.throughput is None or report.timing is None else report.timing.speed(row.threshold)
        )
        threshold_rows.append(
            [
                format_threshold(row.threshold),
                pct(point["accuracy"]),
                f"{100 * point['accuracy_drop']:+.2f}",
                pct(point["exit_rate"]),
                f"{point['mean_flops'] / 1e6:.2f}",
                f"{point['relative_compute']:.3f}",
                speed,
                ", ".join(row.marks),
            ]
        )
    class_rows = [
        [
            r.name,
            str(r.samples),
            pct(r.exit_rate),
            pct(r.adaptive_accuracy),
            pct(r.mainnet_accuracy),
            pct(r.sidenet_accuracy),
        ]
        for r in report.per_class
    ]
    return {
        "calibration": (["model", "ECE (width)", "ECE (mass)", "MCE", "Brier", "NLL", "accuracy"], metric_rows),
        "policies": (
            [
                "policy",
                "best compute, calibration",
                "best compute, evaluation",
                "guaranteed threshold",
                "drop (pt)",
                "compute",
                "oracle fraction",
                "empirical threshold",
                "drop (pt)",
                "compute",
            ],
            policy_rows,
        ),
        "thresholds": (
            [
                "threshold",
                "accuracy",
                "drop (pt)",
                "exit rate",
                "MFLOPs/sample",
                "compute",
                "samples/s (speed-up)",
                "point",
            ],
            threshold_rows,
        ),
        "per_class": (["class", "samples", "exit rate", "adaptive acc.", "MainNet acc.", "SideNet acc."], class_rows),
        "shift": (
            ["comparison", "verdict", "KS statistic", "p-value", "exit rate (reference)", "exit rate (new)"],
            shift_rows(report.shift),
        ),
        "audit": audit_table(report.audit),
    }


def audit_warning(audit: dict | None) -> list[str]:
    """The headline warning of a flagged live audit (``LiveAudit.to_dict()``); nothing otherwise."""
    if audit is None or not audit["flagged"]:
        return []
    return [
        f"WARNING: the live audit of logged traffic bounds the exits' disagreement with the MainNet at "
        f"{pct(audit['upper_bound'])} (at confidence {1 - audit['delta']:g}; {audit['disagreed']} of "
        f"{audit['audited']} audited samples disagreed), above the tolerance of {pct(audit['tolerance'])}."
    ]


def audit_table(audit: dict | None) -> tuple[list[str], list[list[str]]]:
    """The live audit's counts and bound (``LiveAudit.to_dict()``), one row; empty without an audit."""
    header = ["state", "samples seen", "audited", "disagreed", "observed rate", "upper bound", "tolerance", "δ"]
    if audit is None:
        return header, []
    observed = "–" if not audit["audited"] else pct(audit["disagreed"] / audit["audited"])
    row = [
        f"{audit['state']} (bound meaningful after {audit['min_audits']} audits)",
        f"{audit['samples_seen']:,}",
        f"{audit['audited']:,}",
        f"{audit['disagreed']:,}",
        observed,
        pct(audit["upper_bound"]),
        pct(audit["tolerance"]),
        f"{audit['delta']:g}",
    ]
    return header, [row]


def _headline(report: TradeoffReport) -> list[str]:
    best, calibration, settings = report.recommended, report.calibration, report.settings
    chosen = best.guaranteed
    point = chosen.evaluation
    curve = best.evaluation_curve
    shift = report.shift.calibration_vs_evaluation
    lines = [
        f"Recommended: policy {best.kind}, temperature {report.temperature:.3f}, threshold "
        f"{format_threshold(chosen.threshold)}, chosen on {best.calibration_curve.num_samples} calibration samples "
        f"so that the accuracy drop exceeds {100 * settings.max_accuracy_drop:g} points with probability at most "
        f"{100 * (1 - settings.confidence):g}% (exchangeable data assumed).",
        f"On {curve.num_samples} evaluation samples: accuracy {pct(point['accuracy'])} vs MainNet "
        f"{pct(curve.mainnet_accuracy)} ({below(point['accuracy_drop'])}), exit rate "
        f"{pct(point['exit_rate'])}, compute {pct(point['relative_compute'])} of the MainNet; the oracle needs "
        f"{pct(best.oracle['relative_compute'])}, so this threshold saves {chosen.oracle_fraction:.0%} "
        "of what the oracle saves.",
        f"SideNet ECE {pct(calibration.sidenet_before.ece)} before and {pct(calibration.sidenet_after.ece)} after "
        f"temperature scaling (MainNet {pct(calibration.mainnet.ece)}).",
    ]
    if report.timing is not None:
        # The table's row of the recommended (guaranteed) threshold, which the timing measured.
        rows = [row for row in report.thresholds if any(m.startswith("guaranteed") for m in row.marks)]
        at = rows[0].threshold if rows else None
        measured = "" if at is None else f"Measured at the recommended threshold: {report.timing.speed(at)}. "
        lines.append(measured + report.timing.describe())
    lines += audit_warning(report.audit)
    if shift.shifted:
        lines.append(
            f"WARNING: the SideNet's confidences on the evaluation data differ from the calibration data "
            f"(KS p = {shift.p_value:.2g}; exit rate {pct(shift.observed_exit_rate)} vs "
            f"{pct(shift.reference_exit_rate)}): the guarantee does not cover this data."
        )
    return lines


def shift_rows(shift: dict[str, Any]) -> list[list[str]]:
    """The rows of a shift-check table (one per comparison of :class:`~sidenet.report_data.ShiftChecks`):
    verdict, KS statistic, p-value and the exit rates of the reference and the new data."""
    rows = []
    for name, check in shift.items():
        verdict = "too few samples" if math.isnan(check.p_value) else ("SHIFT" if check.shifted else "no shift")
        rows.append(
            [
                name.replace("_", " "),
                verdict,
                f"{check.statistic:.3f}",
                f"{check.p_value:.2g}",
                pct(check.reference_exit_rate),
                pct(check.observed_exit_rate),
            ]
        )
    return rows


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


SECTIONS = [
    ("Compute-accuracy trade-off", "curve", "policies"),
    ("Thresholds", None, "thresholds"),
    ("Calibration", "reliability", "calibration"),
    ("Per class (guaranteed threshold)", "per_class", "per_class"),
    ("Shift check (two-sample Kolmogorov-Smirnov on SideNet confidences)", None, "shift"),
]
AUDIT_SECTION = ("Live audit of logged traffic (one-sided Clopper-Pearson bound on disagreement)", None, "audit")
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}
.note{background:#f7f7f2;border-left:4px solid #999;padding:.5em 1em}.warn{border-left-color:#c44e52}"""


def write_report(report: TradeoffReport, out: str | Path, title: str) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained), ``report.md``, the PNGs and ``report.json`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = report.raw_evaluation
    images = {
        "curve": plot_policies(report, out / "curve.png", f"{title}: evaluation split"),
        "reliability": reliability_diagram(
            out / "reliability.png",
            {
                "SideNet, T = 1": (raw.side_logits, raw.labels),
                f"SideNet, T = {report.temperature:.2f}": (raw.side_logits / report.temperature, raw.labels),
                "MainNet": (raw.main_logits, raw.labels),
            },
            bins=report.settings.bins,
            title="Reliability on the evaluation split",
        ),
        "per_class": _plot_per_class(report.per_class, out / "per_class.png"),
    }
    tables = _tables(report)
    headline = _headline(report)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=float) + "\n")

    sections = [*SECTIONS, *([AUDIT_SECTION] if report.audit is not None else [])]
    chosen = [(heading, image, tables[table]) for heading, image, table in sections]
    return write_pages(out, title, headline, chosen, images)


def write_pages(
    out: Path,
    title: str,
    headline: list[str],
    sections: list[tuple[str, str | None, tuple[list[str], list[list[str]]]]],
    images: dict[str, Path],
) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained: the images embedded) and ``report.md`` into ``out``: the
    ``headline`` notes (a line starting with WARNING is marked), then per section its heading, its image
    (a key of ``images``, or None) and its table (header, rows). Returns the two paths."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    for line in headline:
        warn = " warn" if line.startswith("WARNING") else ""
        parts.append(f"<p class='note{warn}'>{html.escape(line)}</p>")
    md = [f"# {title}", "", *[f"> {line}\n" for line in headline]]
    for heading, image, table in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        md += [f"## {heading}", ""]
        if image:
            data = base64.b64encode(images[image].read_bytes()).decode()
            parts.append(f"<img alt='{image}' src='data:image/png;base64,{data}'>")
            md += [f"![{image}]({images[image].name})", ""]
        parts.append(html_table(*table))
        md += [md_table(*table), ""]
    parts.append("</body></html>")
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text("\n".join(parts), encoding="utf-8")
    md_path.write_text("\n".join(md), encoding="utf-8")
    return html_path, md_path
