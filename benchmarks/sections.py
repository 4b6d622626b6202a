"""Sections of BENCHMARKS.md beyond the two workloads: the opening summary, calibration and guarantees,
serving side by side (rendered from their JSON results); stacking with compression is in
benchmarks/sections_stacking.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.harness import pct, targets_line, thr
from benchmarks.sections_cascade import cascade_sentence
from benchmarks.sections_gpu import gpu_summary


def summary_section(results: Path) -> list[str]:
    """The opening paragraphs: what a user gains per workload, and where it does not pay."""

    def load(name: str) -> dict[str, Any] | None:
        path = results / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    fm, st, serving, stack = load("fmnist_resnet"), load("sst2_minilm"), load("serving"), load("stacking")
    compressed, distilled, pruned = load("resnet_compression"), load("distillation"), load("text_pruning")
    lines = ["## Summary", ""]
    if fm:
        a, s = fm["adaptive"], fm["speedup"]
        text = (
            f"**Vision (Fashion-MNIST, ResNet-20).** With an accuracy drop of {100 * a['accuracy_drop']:+.2f} "
            f"points (threshold chosen on validation for ≤ 0.5), {pct(a['exit_rate'])} of test images exit after "
            f"`{fm['tap']}` and the model spends {pct(a['flops_fraction'])} of the MainNet's FLOPs: "
            f"{s['batch64']:.2f}× the MainNet's throughput at batch 64 and {s['batch1']:.2f}× at batch 1."
        )
        if serving and "fmnist" in serving["workloads"]:
            w = serving["workloads"]["fmnist"]
            text += (
                " In the serving benchmark, against batch-level exit (same SideNet and threshold), per-sample "
                f"routing is {w['per_sample_over_batch_level']:.2f}× faster at batch 64: only "
                f"{pct(w['rows']['batch_level']['batch64']['exit_rate'])} of the images leave early when a batch "
                "must be confident as a whole."
            )
        text += (
            f" Where it does not pay in full: the measured speed-up reaches only {s['batch64'] / s['ideal']:.0%} of "
            f"the FLOPs ideal ({s['ideal']:.2f}×) because this ResNet is tiny: its trunk and SideNet cost "
            f"{pct(fm['trunk_flops_fraction'])} of the FLOPs but {pct(fm['trunk_time_fraction_batch64'])} of the "
            "time, and per-batch overheads do not shrink with the FLOPs."
        )
        if "batch64" in fm.get("timing", {}):
            # Measured bound: trunk + SideNet on every image (always-exit run) plus the rest on the images
            # that continue at the MainNet's full-batch cost per image, as if they were pooled into full batches.
            t = fm["timing"]["batch64"]
            t_main, t_trunk = 1 / t["mainnet"]["throughput"], 1 / t["always_exit"]["throughput"]
            bound = t_main / (t_trunk + (1 - a["exit_rate"]) * (t_main - t_trunk))
            text += (
                f" Even if the images that continue ran through the rest in full batches, the measured trunk would "
                f"cap the speed-up at {bound:.2f}× ({bound / s['ideal']:.0%} of the FLOPs ideal)."
            )
        text += _pooled_sentence(serving, "fmnist", "images") + cascade_sentence(fm, "batch64")
        if compressed:
            text += " With compression (batch 64, accuracy in brackets): " + _stacked(compressed, "batch64") + "."
        lines += [text, ""]
    if st:
        a, s = st["adaptive"], st["speedup"]
        text = (
            f"**Text (SST-2, all-MiniLM-L6-v2).** With an accuracy drop of {100 * a['accuracy_drop']:+.2f} points "
            f"(cross-fitted on dev, ≤ 1.0 allowed), {pct(a['exit_rate'])} of dev sentences exit after layer "
            f"{st['tap']}, at {pct(a['flops_fraction'])} of the MainNet's FLOPs: {s['batch32']:.2f}× at batch 32 "
            f"({s['batch32'] / s['ideal']:.0%} of the FLOPs ideal) and {s['batch1']:.2f}× at batch 1."
        )
        if serving and "sst2" in serving["workloads"]:
            w = serving["workloads"]["sst2"]
            text += (
                " In the serving benchmark batch-level exit gains nothing at batch 32 "
                f"({w['rows']['batch_level']['speedup']['batch32']:.2f}×): per-sample routing is "
                f"{w['per_sample_over_batch_level']:.2f}× faster."
            )
        text += _pooled_sentence(serving, "sst2", "sentences") + cascade_sentence(st, "batch32")
        if stack:
            m = stack["multiply"]
            text += (
                f" It stacks with int8 quantisation: int8 alone {m['int8_alone']:.2f}×, int8 + SideNet "
                f"{m['both']:.2f}× ({m['sidenet_on_int8']:.2f}× over int8 alone)."
            )
        if pruned:
            text += " With feed-forward pruning (batch 32): " + _stacked(pruned, "batch32") + "."
        if distilled:
            text += " With a distilled 3-layer student (batch 32): " + _stacked(distilled, "batch32") + "."
        text += (
            " Where it does not pay: the trunk up to layer 3 is already half of the MainNet, so no threshold at that "
            "one tap can beat 2× (the cascade, starting at layer 1, can); and a threshold chosen on SST-2's train "
            "phrases over-exits on dev sentences and loses accuracy (see the shift check below): choose thresholds "
            "on data like the traffic."
        )
        lines += [text, ""]
    lines += gpu_summary(results)
    return lines if len(lines) > 2 else []


def _stacked(r: dict[str, Any], batch: str) -> str:
    """'X alone a× (acc), with a SideNet b× (acc)' for each compressed variant of a stacking result, whose
    variants come in pairs (alone, with a SideNet), the MainNet's pair first."""
    variants = list(r["variants"].values())
    names = list(r["variants"])
    parts = [f"SideNet alone {variants[1]['speedup'][batch]:.2f}× ({pct(variants[1]['accuracy'])})"]
    for i in range(2, len(variants) - 1, 2):
        alone, side = variants[i], variants[i + 1]
        parts.append(
            f"{names[i]} alone {alone['speedup'][batch]:.2f}× ({pct(alone['accuracy'])}), with a SideNet "
            f"{side['speedup'][batch]:.2f}× ({pct(side['accuracy'])})"
        )
    return "; ".join(parts)


CALIBRATION_TITLES = {
    "fmnist": "Fashion-MNIST, tap layer1.0 (val → test)",
    "sst2": "SST-2, tap 3 (train phrases → dev sentences)",
    "sst2_dev_halves": "SST-2, tap 3 (dev half → other dev half)",
}


def calibration_section(results: dict[str, Any]) -> list[str]:
    runs = {k: v for k, v in results.items() if k in CALIBRATION_TITLES}
    if not runs:
        return []
    lines = [
        "## Calibration, exit policies, guaranteed thresholds and the oracle",
        "",
        f"Command: `{results['command']}`, which runs for each workload the CLI commands listed below "
        "(`sidenet fit`, then `sidenet report`; the full reports are linked).",
        "",
    ]
    for name, run in runs.items():
        m = run["machine"]
        lines.append(
            f"- {CALIBRATION_TITLES[name]}: `" + "`; `".join(run["commands"]) + f"` — {m['date']}, commit "
            f"{m['commit'] or 'n/a'}; [report]({run['report_markdown']})"
        )
    lines += [
        "",
        "The SideNet's temperature is fitted on the calibration split (Guo et al. 2017); ECE uses 15 "
        "equal-width bins, on the evaluation split. The guaranteed threshold keeps the accuracy drop within "
        "the tolerance with probability ≥ 90% on data exchangeable with the calibration split (Clopper–Pearson "
        "on the disagreement with the MainNet, fixed-sequence testing); the oracle exits exactly where the "
        "SideNet agrees with the MainNet, and the oracle fraction is the compute the guaranteed threshold saves "
        "as a share of what the oracle saves.",
        "",
        "| workload | SideNet ECE, T = 1 | fitted T | SideNet ECE after | MainNet ECE | policy (chosen on calibration) "
        "| tolerance | guaranteed: drop (pt) | exit | compute | oracle compute | oracle fraction | shift check "
        "calibration vs evaluation | shift check, evaluation halves |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        r = run["report"]
        c, rec = r["calibration"], r["recommended"]
        ev = rec["evaluation"]
        shift = r["shift"]

        def verdict(x: dict[str, Any]) -> str:
            return f"{'**shift**' if x['shifted'] else 'quiet'} (p = {x['p_value']:.2g})"

        lines.append(
            f"| {CALIBRATION_TITLES[name]} | {pct(c['sidenet_before']['ece'])} | {c['temperature']:.3f} | "
            f"{pct(c['sidenet_after']['ece'])} | {pct(c['mainnet']['ece'])} | {rec['policy']} | "
            f"{100 * r['settings']['max_accuracy_drop']:g} pt | {100 * ev['accuracy_drop']:+.2f} | "
            f"{pct(ev['exit_rate'])} | {pct(ev['relative_compute'])} | {pct(rec['oracle']['relative_compute'])} | "
            f"{rec['oracle_fraction']:.2f} | {verdict(shift['calibration_vs_evaluation'])} | "
            f"{verdict(shift['evaluation_half_vs_half'])} |"
        )
    lines += [
        "",
        "Every exit policy at the fitted temperature: the least compute within the tolerance on the "
        "evaluation curve itself (hindsight, to compare the curves), and what the guaranteed threshold "
        "chosen on the calibration split gives there.",
        "",
        "| workload | policy | best compute (evaluation curve) | guaranteed: drop (pt) | compute | empirical "
        "choice: drop (pt) | compute |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        for kind, p in run["report"]["policies"].items():
            g, e = p["guaranteed"]["evaluation"], p["empirical"]["evaluation"]
            lines.append(
                f"| {CALIBRATION_TITLES[name]} | {kind} | {pct(p['best_compute_evaluation'])} | "
                f"{100 * g['accuracy_drop']:+.2f} | {pct(g['relative_compute'])} | "
                f"{100 * e['accuracy_drop']:+.2f} | {pct(e['relative_compute'])} |"
            )
    lines.append("")
    for name, run in runs.items():
        policies = run["report"]["policies"]
        least = min(p["best_compute_evaluation"] for p in policies.values())
        best = [k for k, p in policies.items() if p["best_compute_evaluation"] <= least + 0.0005]
        lines.append(
            f"- Best curve, {CALIBRATION_TITLES[name]}: {', '.join(best)} ({pct(least)} of the MainNet's compute "
            f"within {100 * run['report']['settings']['max_accuracy_drop']:g} pt)"
            + (
                "; with two classes the three rules order samples alike, so their curves coincide."
                if len(best) == 3 and len(run["report"]["per_class"]) == 2
                else "."
            )
        )
    return [*lines, ""]


def _pooled_sentence(serving: dict[str, Any] | None, workload: str, samples: str) -> str:
    """What pooling the continuing samples across batches (PooledRouter) measured, for the summary."""
    if not serving or "pooled" not in serving["workloads"].get(workload, {}):
        return ""
    w = serving["workloads"][workload]
    p, big = w["pooled"], f"batch{w['batch']}"
    return (
        f" Pooling the {samples} that continue across batches (`PooledRouter`, at most {p['max_wait']} batches of "
        f"waiting) measures {w['rows']['per_sample_pooled']['speedup'][big]:.2f}× at batch {w['batch']} "
        f"({p['fraction_of_ideal']:.0%} of the FLOPs ideal, {p['over_per_sample']:.2f}× per-sample routing within "
        "each batch)."
    )


def serving_section(r: dict[str, Any]) -> list[str]:
    m = r["machine"]
    lines = [
        "## Serving side by side: per-sample routing vs batch-level exit",
        "",
        f"Command: `{r['command']}` — {m['date']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), commit {m['commit'] or 'n/a'}."
        + (" **Quick run: few samples and repeats, a smoke check only.**" if r.get("quick") else ""),
        "",
        "Same SideNet and threshold in both exit modes (the SideNets of `sidenet fit` above). Batch-level exit "
        "skips the rest of the MainNet only when every sample of the batch is confident, as existing toolkits "
        "do. Throughput: median of interleaved repeats after a warm-up, [min–max] over repeats. At batch 1 the "
        "two modes are the same.",
        "",
    ]
    for name, w in r["workloads"].items():
        big = f"batch{w['batch']}"
        lines += [
            f"### {name}: tap {w['tap']}, threshold {thr(w['threshold'])} ({w['policy']}, T = {w['temperature']:.3f})"
            f", {w['evaluation_size']} evaluation samples",
            "",
            f"| | accuracy | exit rate | FLOPs fraction | throughput, batch {w['batch']} | throughput, batch 1 | "
            "p50 / p95 latency, batch 1 |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, row in w["rows"].items():
            o = row[big]
            spread = w["timing"][big][label]["throughput_spread"]
            lat = row["latency_batch1"]
            batch1 = "–"
            if "batch1" in row["throughput"]:
                batch1 = f"{row['throughput']['batch1']:,.0f}/s ({row['speedup']['batch1']:.2f}×)"
            lines.append(
                f"| {label.replace('_', ' ')} | {pct(o['accuracy'])} | {pct(o['exit_rate'])} | "
                f"{pct(row['flops_fraction'])} | {row['throughput'][big]:,.0f}/s [{spread[0]:,.0f}–{spread[1]:,.0f}] "
                f"({row['speedup'][big]:.2f}×) | {batch1} | "
                + (f"{1e3 * lat['p50']:.2f} / {1e3 * lat['p95']:.2f} ms |" if lat else "– |")
            )
        lines += [
            "",
            f"Ideal speed-up from FLOPs (1 / FLOPs fraction of per-sample routing): {w['ideal_speedup']:.2f}×; "
            f"measured reaches {w['fraction_of_ideal'][big]:.0%} of it at batch {w['batch']} and "
            f"{w['fraction_of_ideal']['batch1']:.0%} at batch 1. Per-sample routing over batch-level exit at batch "
            f"{w['batch']}: {w['per_sample_over_batch_level']:.2f}×.",
        ]
        if "pooled" in w:
            p, o = w["pooled"], w["rows"]["per_sample_pooled"][big]
            lines.append("")
            lines.append(
                "Per-sample pooled (`sidenet.serving.PooledRouter`): the rest of the MainNet runs once "
                f"{p['rest_batch']} continuing samples wait, gathered across batches, or once the oldest has waited "
                f"{p['max_wait']} later batches; {p['over_per_sample']:.2f}× per-sample routing within each batch, "
                f"{p['fraction_of_ideal']:.0%} of the ideal. The price is latency: {pct(o['batches_waiting'])} of "
                "the batches had a sample that continued, and those were answered on average "
                f"{o['mean_wait']:.1f} later batches after they arrived "
                f"(at most {o['max_wait']}). At batch 1 it is not timed: each continuing request would wait for "
                f"{p['rest_batch'] - 1} others."
            )
        if "targets" in w:
            lines.append("")
            lines.append(
                targets_line(f"Targets (issue 5, batch {w['batch']}, per-sample routing)", w["targets"], digits=2) + "."
            )
        lines.append("")
    return lines
