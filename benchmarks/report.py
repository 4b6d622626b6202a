"""Regenerate BENCHMARKS.md entirely from the JSON files of a results folder (and the compression
figures beside them); the two workloads' sections are here, the others in benchmarks/sections.py,
benchmarks/sections_stacking.py and benchmarks/sections_gpu.py (GPU serving; the CPU compiled rows).

Run: ``python -m benchmarks report [--quick | --results-dir DIR]`` (``python -m benchmarks run`` calls it
once, after its last step; ``python -m benchmarks.report`` also works).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.compression_plot import WORKLOADS, plot_compression
from benchmarks.harness import RESULTS, link, markdown_path, pct, targets_line, thr
from benchmarks.sections import calibration_section, serving_section, summary_section
from benchmarks.sections_cascade import cascade_lines
from benchmarks.sections_cascade_training import cascade_training_section
from benchmarks.sections_compiled_cpu import fmnist_compiled_lines, sst2_compiled_lines
from benchmarks.sections_cpu_memory import cpu_memory_section
from benchmarks.sections_design import design_section
from benchmarks.sections_gpu import gpu_section
from benchmarks.sections_serve import serve_section
from benchmarks.sections_stacking import (
    distillation_section,
    resnet_compression_section,
    stacking_section,
    text_pruning_section,
)


def fmnist_section(r: dict[str, Any]) -> list[str]:
    m, a, s = r["mainnet"], r["adaptive"], r["speedup"]
    t = r["targets"]
    lines = [
        "## Fashion-MNIST, ResNet-20 MainNet (vision)",
        "",
        f"Command: `{r['command']}` — {r['machine']['date']}, {r['machine']['cpu']}, "
        f"{r['machine']['cores']} cores, torch {r['machine']['torch']} ({r['machine']['torch_threads']} threads), "
        f"commit {r['machine']['commit'] or 'n/a'}.",
        "",
        f"MainNet: {r['mainnet_description']}; test accuracy {pct(m['accuracy'])}, "
        f"{m['flops'] / 1e6:.2f} MFLOPs per image (FlopCounterMode).",
        f"Thresholds and the tap are chosen on the validation split ({r['choice']['split']}), for at most "
        f"{100 * r['choice']['max_accuracy_drop']:.1f} points below the MainNet; every figure below is on the "
        f"{r['test_size']:,} test images.",
        "",
        "### Chosen operating point",
        "",
        "| | MainNet alone | SideNet + MainNet |",
        "|---|---|---|",
        f"| tap / SideNet pooling / threshold | – | `{r['tap']}` / {r['pool']}x{r['pool']} / {thr(r['threshold'])} |",
        f"| accuracy | {pct(m['accuracy'])} | {pct(a['accuracy'])} ({100 * a['accuracy_drop']:+.2f} pt drop) |",
        f"| exit rate | 0 | {pct(a['exit_rate'])} |",
        f"| FLOPs per image | {m['flops'] / 1e6:.2f} M | {a['mean_flops'] / 1e6:.2f} M "
        f"({pct(a['flops_fraction'])} of the MainNet) |",
    ]
    for b in ("batch1", "batch64"):
        mt, at = r["timing"][b]["mainnet"], r["timing"][b]["adaptive"]
        lines.append(
            f"| throughput, {b.replace('batch', 'batch ')} (img/s, median of {mt['repeats']}) | "
            f"{mt['throughput']:,.0f} [{mt['throughput_spread'][0]:,.0f}–{mt['throughput_spread'][1]:,.0f}] | "
            f"{at['throughput']:,.0f} [{at['throughput_spread'][0]:,.0f}–{at['throughput_spread'][1]:,.0f}] "
            f"(**{s[b]:.2f}×**) |"
        )
    lines += [
        f"| ideal speed-up from FLOPs (1 / FLOPs fraction) | | {s['ideal']:.2f}× "
        f"(measured batch 64 reaches {s['batch64'] / s['ideal']:.0%} of it) |",
        f"| cost of routing when nothing exits (threshold never, batch 64; SideNet included) | | "
        f"{100 * r['zero_exit_overhead_batch64']:.1f}% lower throughput than the MainNet |",
    ]
    if "trunk_time_fraction_batch64" in r:
        lines.append(
            f"| trunk + SideNet alone (every image exits), batch 64 | | {pct(r['trunk_flops_fraction'])} of the "
            f"MainNet's FLOPs but {pct(r['trunk_time_fraction_batch64'])} of its time |"
        )
    lines += [
        "",
        targets_line("Targets (issue 2)", t),
        "",
        *fmnist_compiled_lines(r),
        "### Every candidate (threshold chosen on validation, reported on test)",
        "",
        "| tap | pool | SideNet acc. | threshold | val exit | val compute | test acc. | drop (pt) | test exit "
        "| FLOPs fraction |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["taps"]:
        v, te = row["val"], row["test"]
        lines.append(
            f"| `{row['tap']}` | {row['pool']} | {pct(row['sidenet_test_accuracy'])} | {thr(row['threshold'])} | "
            f"{pct(v['exit_rate'])} | {pct(v['relative_compute'])} | {pct(te['accuracy'])} | "
            f"{100 * te['accuracy_drop']:+.2f} | "
            f"{pct(te['exit_rate'])} | {pct(te['relative_compute'])} |"
        )
    lines += ["", f"![curve]({r['plot']})", ""]
    lines += cascade_lines(r, "batch64", "test images")
    return lines


def sst2_section(r: dict[str, Any]) -> list[str]:
    m, a, s, c = r["mainnet"], r["adaptive"], r["speedup"], r["choice"]
    folds = "; ".join(
        f"{name}: tap {v['tap']}, threshold {thr(v['threshold'])}" for name, v in r["threshold_folds"].items()
    )
    lines = [
        "## SST-2, all-MiniLM-L6-v2 MainNet (text)",
        "",
        f"Command: `{r['command']}` — {r['machine']['date']}, {r['machine']['cpu']}, "
        f"{r['machine']['cores']} cores, torch {r['machine']['torch']} ({r['machine']['torch_threads']} threads), "
        f"commit {r['machine']['commit'] or 'n/a'}.",
        "",
        f"MainNet: {r['mainnet_description']}; SST-2 dev accuracy {pct(m['accuracy'])}, "
        f"{m['flops'] / 1e6:.1f} MFLOPs per sentence on average at the batches' padded lengths (FlopCounterMode).",
        f"SideNets read the {c['features']!r} features (chosen on phrases held out of train). Tap and threshold "
        f"are chosen by {c['split']}: the least compute at which at most {pct(c['max_disagreement'])} of the "
        f"choosing half exits with another answer than the MainNet's ({folds}); every figure is pooled over the "
        f"{r['test_size']} dev sentences, each reported by the choice made on the other half. Batches of 32 are "
        "padded to their longest sentence; the rest of the MainNet runs on the samples that continue, cut to the "
        "longest of them.",
        f"For deployment the same rule on all of dev picks tap {r['tap']}, threshold {thr(r['threshold'])}. "
        "Caveat: the disagreement rule itself was adopted after the accuracy rule (below) was seen to transfer "
        "badly on dev, so the rule, though not the thresholds, was chosen with dev in view.",
        "",
        "### Chosen operating point (cross-fitted on dev)",
        "",
        "| | MainNet alone | SideNet + MainNet |",
        "|---|---|---|",
        f"| accuracy | {pct(m['accuracy'])} | {pct(a['accuracy'])} ({100 * a['accuracy_drop']:+.2f} pt drop) |",
        f"| exit rate | 0 | {pct(a['exit_rate'])} |",
        f"| FLOPs per sentence | {m['flops'] / 1e6:.1f} M | {a['mean_flops'] / 1e6:.1f} M "
        f"({pct(a['flops_fraction'])} of the MainNet) |",
    ]
    for b in ("batch1", "batch32"):
        if b not in r["timing"]:
            continue
        mt, at = r["timing"][b]["mainnet"], r["timing"][b]["adaptive"]
        lines.append(
            f"| throughput, {b.replace('batch', 'batch ')} (sentences/s, median of {mt['repeats']}) | "
            f"{mt['throughput']:,.1f} [{mt['throughput_spread'][0]:,.1f}–{mt['throughput_spread'][1]:,.1f}] | "
            f"{at['throughput']:,.1f} [{at['throughput_spread'][0]:,.1f}–{at['throughput_spread'][1]:,.1f}] "
            f"(**{s[b]:.2f}×**) |"
        )
    t = r["train_split_choice"]
    ideal = f"| ideal speed-up from FLOPs (1 / FLOPs fraction) | | {s['ideal']:.2f}× "
    reached = f"(measured batch 32 reaches {s['batch32'] / s['ideal']:.0%} of it) |" if "batch32" in s else "|"
    lines.append(ideal + reached)
    if "zero_exit_overhead_batch32" in r:
        lines += [
            f"| cost of routing when nothing exits (threshold never, batch 32; SideNet included) | | "
            f"{100 * r['zero_exit_overhead_batch32']:.1f}% lower throughput than the MainNet |",
            f"| trunk + SideNet alone (every sentence exits), batch 32 | | {pct(r['trunk_flops_fraction'])} of the "
            f"MainNet's FLOPs, {pct(r['trunk_time_fraction_batch32'])} of its time |",
        ]
    lines += [
        "",
        targets_line("Targets (issue 3)", r["targets"]),
        "",
        f"Tap and threshold chosen on phrases held out of SST-2 train instead (same rule; tap {t['tap']}, "
        f"threshold {thr(t['threshold'])}, {100 * t['on_val']['accuracy_drop']:+.2f} pt there): on dev "
        f"{pct(t['on_dev']['accuracy'])} ({100 * t['on_dev']['accuracy_drop']:+.2f} pt), exit rate "
        f"{pct(t['on_dev']['exit_rate'])}, {pct(t['on_dev']['flops_fraction'])} of the MainNet's FLOPs.",
    ]
    if "accuracy_rule" in r:
        q = r["accuracy_rule"]
        x, v = q["crossfit"], q["train_split"]["on_dev"]
        lines += [
            "",
            f"Choosing by accuracy instead (least compute within "
            f"{100 * q['rule']['max_accuracy_drop']:.1f} points of the MainNet on the choosing half; taps "
            f"{', '.join(str(f['tap']) for f in q['folds'])}): cross-fitted on dev {100 * x['accuracy_drop']:+.2f} pt, "
            f"exit rate {pct(x['exit_rate'])}, {pct(x['flops_fraction'])} of the FLOPs; chosen on train phrases: "
            f"{100 * v['accuracy_drop']:+.2f} pt on dev. On a half of 436 sentences the accuracy rule counts the "
            "SideNet's chance wins where the MainNet errs; the disagreement bound does not.",
        ]
    lines += ["", *sst2_compiled_lines(r)]
    lines += [
        "### Every tap (dev, cross-fitted; and the train-split choice on dev)",
        "",
        "| tap | SideNet dev acc. | cross-fit acc. | drop (pt) | exit | FLOPs fraction | train-split choice: "
        "drop (pt) | exit | FLOPs fraction |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["taps"]:
        x, v = row["disagreement"]["crossfit"], row["disagreement"]["train_split_on_dev"]
        lines.append(
            f"| {row['tap']} | {pct(row['sidenet_dev_accuracy'])} | {pct(x['accuracy'])} | "
            f"{100 * x['accuracy_drop']:+.2f} | {pct(x['exit_rate'])} | {pct(x['flops_fraction'])} | "
            f"{100 * v['accuracy_drop']:+.2f} | {pct(v['exit_rate'])} | {pct(v['flops_fraction'])} |"
        )
    lines += ["", f"![curve]({r['plot']})", ""]
    lines += cascade_lines(r, "batch32", "dev sentences")
    return lines


SECTIONS = {
    "fmnist_resnet": fmnist_section,
    "sst2_minilm": sst2_section,
    "calibration": calibration_section,
    "serving": serving_section,
    "stacking": stacking_section,
    "text_pruning": text_pruning_section,
    "distillation": distillation_section,
    "resnet_compression": resnet_compression_section,
    "serve": serve_section,
    "sidenet_design": design_section,
    "cascade_training": cascade_training_section,
    "cpu_memory": cpu_memory_section,
}


def memory_note(results: Path) -> list[str]:
    """Which results were timed with freed CPU memory retained (``sidenet.host_memory``, what the runner
    sets since it exists) and which with glibc's defaults (results from before: no record)."""
    settings = {}
    for path in sorted(results.glob("*.json")):
        recorded = json.loads(path.read_text()).get("machine", {})
        if path.stem != "cpu_memory" and isinstance(recorded, dict) and "cpu" in recorded:  # it times both
            settings[path.stem] = recorded.get("cpu_memory", "default")
    retained = [name for name, setting in settings.items() if setting == "retained"]
    default = [name for name, setting in settings.items() if setting != "retained"]
    if not retained:
        return []
    return [
        'CPU times with freed memory kept for the next batch (`sidenet.host_memory`, section "CPU memory"; '
        f"the runner sets it): {', '.join(retained)}; with glibc's defaults, before it existed: "
        f"{', '.join(default) or 'none'}.",
    ]


def render(results: Path = RESULTS) -> str:
    """BENCHMARKS.md of ``results`` as text, from the JSON files present."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`; do not edit by hand.",
        "Each section names the command that produced its numbers.",
        *memory_note(results),
        "",
        *summary_section(results),
    ]
    for name, section in SECTIONS.items():
        path = results / f"{name}.json"
        if path.is_file():
            lines += section(json.loads(path.read_text()))
    lines += gpu_section(results)  # present without gpu.json too: it says the GPU is not measured yet
    figures = [(w, results / spec[2]) for w, spec in WORKLOADS.items() if (results / spec[2]).is_file()]
    if figures:
        lines += ["## Compression side by side", ""]
        lines += [
            "Every variant of the stacking sections above on one figure per workload: ○ the MainNet or its "
            "compressed version alone, ★ the same with its SideNet; left is faster, up is more accurate.",
            "",
        ]
        lines += [f"![compression, {w}]({link(path, results)})" for w, path in figures]
    return "\n".join(lines).rstrip() + "\n"


def write(results: Path = RESULTS) -> Path:
    """Draw the compression figures from the JSON results of ``results``, then write its BENCHMARKS.md
    (see :func:`benchmarks.harness.markdown_path`); returns that path."""
    results = results.resolve()
    for workload in WORKLOADS:
        plot_compression(results, workload)
    markdown = markdown_path(results)
    markdown.write_text(render(results))
    return markdown


if __name__ == "__main__":
    print(f"wrote {write()}")
