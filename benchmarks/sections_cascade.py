"""The cascade rows of the two workloads' sections of BENCHMARKS.md (issue 14; measured by
``benchmarks/cascade.py`` inside the Fashion-MNIST and SST-2 steps), rendered from their ``cascade`` key."""

from __future__ import annotations

from typing import Any

from benchmarks.harness import pct

FAMILY_NOTES = {
    "shared": "one threshold for every SideNet",
    "equal_disagreement": "per SideNet, the lowest threshold whose exits disagree with the MainNet at most ε "
    "(on all samples); one ε for all (default)",
    "equal_disagreement_reached": "the same, counted on the samples that reach the SideNet",
    "geometric": "a share q of the samples reaching each SideNet exits there (MSDNet-style)",
    "search_all_taps": "coordinate descent over all candidate SideNets' thresholds, tuned on the choosing data",
}


def _taps(taps: list[Any]) -> str:
    return " → ".join(f"`{t}`" for t in taps) if taps else "none (the MainNet)"


def _thresholds(values: list[float]) -> str:
    return ", ".join(f"{v:.4f}" for v in values)


def _rule(rule: dict[str, float]) -> str:
    if "max_accuracy_drop" in rule:
        return f"at most {100 * rule['max_accuracy_drop']:g} points below the MainNet"
    return f"at most {pct(rule['max_disagreement'])} of the samples exiting with another answer than the MainNet's"


def _compiled_rows(c: dict[str, Any], batch: str) -> list[str]:
    """The cascade's row in the compiled serving mode, where the step timed it."""
    compiled, cs = c.get("compiled"), c["speedup"]
    if not compiled:
        return []
    stages = "; ".join(", ".join(f"{k} {v}" for k, v in kept.items()) for kept in compiled["stage_backends"] if kept)
    best = "the eager MainNet" if compiled["best_mainnet"] == "mainnet" else "the `torch.compile`d MainNet"
    return [
        f"| cascade, compiled serving mode (`compile_for_serving`, backend {compiled['backend']}: {stages}) | same | "
        f"same | same | same | same | {cs[batch + '_compiled']:.2f}× ({cs[batch + '_compiled_over_best_mainnet']:.2f}× "
        f"over the best MainNet alone, {best}) |"
    ]


def _time_priced_row(c: dict[str, Any], batch: str) -> list[str]:
    """The cascade chosen by the same rule with its parts priced in time (``sidenet fit --cost time``)."""
    t = c.get("time_priced")
    if not t:
        return []
    return [
        f"| cascade chosen for time (`--cost time`) | {' / '.join(_taps(taps) for taps in t['taps'])} | "
        f"{pct(t['accuracy'])} | {100 * t['accuracy_drop']:+.2f} | {pct(t['exit_rate'])} | {t['flops_fraction']:.3f} | "
        f"{c['speedup'][batch + '_time_priced']:.2f}× |"
    ]


def _time_priced_lines(c: dict[str, Any], folds: list[dict[str, Any]], batch: str) -> list[str]:
    """Each part's share of the MainNet's time against its share of the FLOPs (the first fold's timing), and
    the time forecast of both choices against what they measure."""
    if not c.get("time_priced"):
        return []
    first = folds[0]["time_priced"]
    timed, counted = first["part_seconds"]["shares"], first["flops_shares"]
    ends = [*(f"`{t}`" for t in c["candidate_taps"]), "logits"]
    segments = ", ".join(
        f"→ {end} {pct(time_share)} ({pct(flops_share)})"
        for end, time_share, flops_share in zip(ends, timed["segments"], counted["segments"], strict=True)
    )
    # Timings of earlier runs lack routing's once-per-batch work (`batch_calls`): their forecasts left it out.
    per_batch = bool(first["part_seconds"].get("batch_calls"))
    routing_per_batch = "; routing's work once per batch, input checks and monitor, one call" if per_batch else ""
    lines = [
        f"Chosen for time (`sidenet fit --taps ... --cost time`): the same rule with each part priced by its time, "
        f"measured on {_timed_on(c, batch)} on this machine and on 1, 2, 4, ... of "
        f"{'its' if c['time_priced'].get('timed_batches', 1) == 1 else 'their'} rows "
        "(`sidenet.measure_part_seconds_over`, eager parts), and the subsets compared by a forecast of their routed "
        "batches (`sidenet.forecast_batch_time`: each part, and the routing at each tap, one call on the rows that "
        f"reach it{routing_per_batch}). Each segment's share of the MainNet's time (of its FLOPs): {segments}; "
        f"all candidate SideNets together {pct(sum(timed['sides']))} ({pct(sum(counted['sides']))})."
    ]
    forecasts = [(name, f, c["speedup"][key]) for name, f, key in _forecast_rows(c, batch) if f]
    if forecasts:
        lines[0] += (
            " Forecast on the reporting data, as a fraction of the MainNet's time, against what the rows above "
            "measure there: "
            + "; ".join(
                f"{name}: priced per sample {f['per_sample']:.3f} ({1 / f['per_sample']:.2f}×), per routed batch "
                f"{f['batches']:.3f} ({1 / f['batches']:.2f}×), measured {measured:.2f}×"
                for name, f, measured in forecasts
            )
            + (
                "."
                if per_batch
                else ". What the batch forecast leaves out: input checks and bookkeeping once per batch."
            )
        )
        if ops := c.get("operations_per_batch"):
            lines[0] += (
                f" Tensor operations per routed batch (`sidenet.timing.count_operations`): the cascade chosen in "
                f"FLOPs {ops['cascade']:.0f}, the MainNet alone {ops['mainnet']:.0f}."
            )
    each = c["time_priced"].get("forecast_each_timed_batch") or []
    if len(each) > 1:
        lines[0] += (
            f" Why text is timed on several batches: the time choice forecast from each timed batch alone (both "
            f"folds) ranges {1 / max(each):.2f}× to {1 / min(each):.2f}× ({len(each)} batches), as one batch's "
            "lengths set the calls on few rows against the MainNet's."
        )
    return [*lines, ""]


def _timed_on(c: dict[str, Any], batch: str) -> str:
    """'one batch of 64', or for text '4 batches of 32 (priced at their mean)'."""
    size, count = batch.removeprefix("batch"), c["time_priced"].get("timed_batches", 1)
    return f"one batch of {size}" if count == 1 else f"{count} batches of {size} (priced at their mean)"


def _forecast_rows(c: dict[str, Any], batch: str) -> list[tuple[str, dict[str, float] | None, str]]:
    return [
        ("chosen for time", c["time_priced"].get("forecast"), batch + "_time_priced"),
        ("chosen in FLOPs", c.get("time_forecast"), batch),
    ]


def cascade_lines(r: dict[str, Any], batch: str, samples: str) -> list[str]:
    """The cascade subsection of a workload section; nothing when the step measured no cascade."""
    c = r.get("cascade")
    if not c:
        return []
    a, s, cs = r["adaptive"], r["speedup"], c["speedup"]
    folds = c["folds"]
    crossfit = len(folds) > 1
    how = (
        "two-fold cross-fitted on dev as the single tap (chosen on one half, routed on the other, pooled)"
        if crossfit
        else "chosen on validation, routed over the test set"
    )
    lines = [
        "### Cascade of SideNets (auto-chosen taps)",
        "",
        f"Candidates: one SideNet at each of {', '.join(f'`{t}`' for t in c['candidate_taps'])}"
        + (
            f" (pooling grid per tap, the one of lower validation compute: "
            f"{', '.join(f'`{t}` {p}' for t, p in c['candidate_pools'].items())})"
            if "candidate_pools" in c
            else ""
        )
        + ", all fitted in the step above. `sidenet.choose_taps` keeps the subset of taps and the threshold "
        f"vector with the least compute, {_rule(c['rule'])} ({how}); every subset is tried (exhaustive for "
        "at most 6 candidates), each along every one-knob family of threshold vectors listed below, keeping the "
        'family that does best on the choosing data (`family="auto"`, the default). The cascade is '
        f"then routed batch by batch as served: accuracy, exits and FLOPs are those of its answers on the "
        f"{samples} it did not choose on. Shipped choice: taps {_taps(c['taps'])} at thresholds "
        f"{_thresholds(c['thresholds'])}" + (" (the same rule on all of dev)." if crossfit else "."),
        "",
        f"| model | taps | accuracy | drop (pt) | exit rate | FLOPs fraction | {batch} speed-up |",
        "|---|---|---|---|---|---|---|",
        f"| single best tap (above) | `{r['tap']}` | {pct(a['accuracy'])} | {100 * a['accuracy_drop']:+.2f} | "
        f"{pct(a['exit_rate'])} | {a['flops_fraction']:.3f} | {s[batch]:.2f}× |",
        f"| cascade, per-sample routing | {' / '.join(_taps(f['taps']) for f in folds)} | {pct(c['accuracy'])} | "
        f"{100 * c['accuracy_drop']:+.2f} | {pct(c['exit_rate'])} | **{c['flops_fraction']:.3f}** | "
        f"**{cs[batch]:.2f}×** |",
        f"| cascade, `PooledRouter` | same | same | same | same | same | {cs[batch + '_pooled']:.2f}× |",
        *_compiled_rows(c, batch),
        *_time_priced_row(c, batch),
        f"| oracle of the cascade (all candidates; exit at the first SideNet agreeing with the MainNet) | all | "
        f"{pct(c['mainnet_accuracy'])} | 0 | — | {c['oracle_flops_fraction']:.3f} | — |",
        "",
        f"In the same timing run the single tap gave {cs[batch + '_single_tap']:.2f}× (its row above comes from "
        f"the step's own timing run); the cascade's FLOPs ideal is {cs['ideal']:.2f}×. The chosen vector saves "
        f"{pct(c['share_of_oracle_saving'])} of what the oracle of all candidate SideNets saves (oracle of the "
        f"chosen taps alone: {c['oracle_chosen_taps_flops_fraction']:.3f} of the FLOPs).",
        "",
    ]
    lines += _time_priced_lines(c, folds, batch)
    lines += _gap_lines(c, folds)
    targets = c.get("targets", {})
    if targets:
        met = [
            f"{k} {v['target']}: {v['value']:.3f} ({'met' if v['met'] else '**not met**'})" for k, v in targets.items()
        ]
        lines += ["Targets (issue 14): " + "; ".join(met) + ".", ""]
    first = folds[0]
    lines += [
        "Choice evidence"
        + (" (fold 1: chosen on the first half of dev, reported on the second)" if crossfit else "")
        + ": the FLOPs fraction on the choosing data of the best vector of each subset of taps, and of each family "
        "of threshold vectors (with its own best subset) on both parts.",
        "",
        "| taps | FLOPs fraction (choosing) |",
        "|---|---|",
    ]
    ranked = sorted(first["candidates"], key=lambda x: (x["relative_compute"] is None, x["relative_compute"] or 0))
    for cand in ranked[:8]:
        value = "no point meets the rule" if cand["relative_compute"] is None else f"{cand['relative_compute']:.3f}"
        lines.append(f"| {_taps(cand['taps'])} | {value} |")
    if len(ranked) > 8:
        lines.append(f"| … {len(ranked) - 8} more subsets | |")
    lines += [
        "",
        "| family | taps | FLOPs (choosing) | FLOPs (reporting) | drop on reporting (pt) | what it is |",
        "|---|---|---|---|---|---|",
    ]
    for name, fam in first["families"].items():
        choosing, reporting = fam["choosing"], fam["reporting"]
        lines.append(
            f"| {name} | {_taps(fam['taps'])} | {choosing['relative_compute']:.3f} | "
            + (
                f"{reporting['relative_compute']:.3f} | {100 * reporting['accuracy_drop']:+.2f} |"
                if reporting
                else "— | — |"
            )
            + f" {FAMILY_NOTES.get(name, '')} |"
        )
    lines.append("")
    return lines


def _pooled_rates(folds: list[dict[str, Any]], key: str) -> list[float]:
    """Exits per SideNet of ``key`` (a point of each fold over all candidate taps, or the chosen taps'
    record point mapped onto the candidates), pooled over folds by their sample counts."""
    total = sum(f["outcome"]["samples"] for f in folds)
    pooled: dict[str, float] = {}
    for f in folds:
        weight = f["outcome"]["samples"] / total
        point = f[key]
        taps = f["taps"] if key == "record_point" else [c for c in f["candidates"][-1]["taps"]]
        for tap, rate in zip(taps, point["exit_rates"], strict=True):
            pooled[str(tap)] = pooled.get(str(tap), 0.0) + weight * rate
    return [pooled.get(str(tap), 0.0) for tap in folds[0]["candidates"][-1]["taps"]]


def _gap_lines(c: dict[str, Any], folds: list[dict[str, Any]]) -> list[str]:
    """Where the chosen thresholds' exits fall short of the oracle's, per SideNet (on the reporting data)."""
    if any(f["record_point"] is None for f in folds):
        return []
    taps = folds[0]["candidates"][-1]["taps"]  # the last subset tried by exhaustive search: all candidates
    if len(taps) != len(c["candidate_taps"]):
        return []
    chosen, oracle = _pooled_rates(folds, "record_point"), _pooled_rates(folds, "oracle_all_taps")
    share = " | ".join(f"`{t}` {pct(a)} (oracle {pct(b)})" for t, a, b in zip(taps, chosen, oracle, strict=True))
    disagreement = sum(f["record_point"]["disagreement"] * f["outcome"]["samples"] for f in folds) / sum(
        f["outcome"]["samples"] for f in folds
    )
    text = f"Exits per SideNet on the reporting data, chosen thresholds against the oracle: {share}."
    if c["share_of_oracle_saving"] < 0.8:  # what stands in the way of the oracle's saving
        text += (
            " What stands in the way: the oracle answers most samples at the first SideNet, whose answer agrees "
            "with the MainNet's there; the chosen thresholds must keep the samples whose early answer disagrees "
            f"within {_rule(c['rule'])} on the choosing data, and the early SideNets' scores do not separate "
            "agreeing from disagreeing samples well enough to exit as many there, so more samples pay for deeper "
            f"taps. Disagreement of the chosen thresholds on the reporting data: {pct(disagreement)}."
        )
    return [text, ""]


def cascade_sentence(r: dict[str, Any], batch: str) -> str:
    """One sentence for the opening summary: the auto-chosen cascade against the single tap."""
    c = r.get("cascade")
    if not c:
        return ""
    return (
        f" A cascade of SideNets at auto-chosen taps ({len(c['taps'])} of {len(c['candidate_taps'])} candidates) "
        f"spends {pct(c['flops_fraction'])} of the MainNet's FLOPs at a drop of {100 * c['accuracy_drop']:+.2f} "
        f"points: {c['speedup'][batch]:.2f}× at {batch.replace('batch', 'batch ')} against "
        f"{c['speedup'][batch + '_single_tap']:.2f}× for the single tap in the same run."
    )
