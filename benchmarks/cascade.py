"""SideNet cascades against the single best tap (issue 14), as a section of the SST-2 and Fashion-MNIST
steps (``sst2_minilm.py``, ``fmnist_resnet.py``), which train the candidate SideNets and hand them here.

Per fold (SST-2: two-fold cross-fitting on dev, as the single-tap choice; Fashion-MNIST: validation to
choose, test to report): one pass of the MainNet over the choosing part scores every candidate SideNet
(``sidenet.collect_cascade``); ``sidenet.choose_taps`` keeps the subset of taps and the threshold vector
(default one-knob family) with the least compute under the same rule as the single tap; the chosen
cascade (``model.with_taps``) is then routed over the reporting part, batch by batch as served, and its
answers, exits and FLOPs are what is reported (text FLOPs with the padding that routing really cuts).
Beside it: the oracle of the cascade on the reporting part (a sample exits at the first SideNet that
agrees with the MainNet), the other threshold families and the data-tuned search as evidence for the
choice, and interleaved throughput of the MainNet, the single tap, the cascade per batch and the cascade
with ``PooledRouter`` (continuing samples pooled across batches at the first tap) and, where asked, in the
compiled serving mode beside the compiled MainNet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import sidenet
from benchmarks.compiled_rows import over_best_mainnet, served_runner
from benchmarks.harness import targets
from sidenet.cascade_choice import FAMILIES, search_thresholds
from sidenet.loaders import iter_batches
from sidenet.serving import PooledRouter
from sidenet.timing import count_operations, measure_throughput


@dataclass
class Fold:
    """One choice and its report: the loader the cascade is chosen on, the one it is reported on (with
    labels), and the reporting part's input batches for timing."""

    choose: Iterable
    report: Iterable
    batches: list[Any]


def cascade_of(candidates: Sequence[sidenet.AdaptiveModel]) -> sidenet.AdaptiveModel:
    """One cascade of the candidates' SideNets (one MainNet, taps in order), sharing them."""
    return sidenet.AdaptiveModel(
        [m.split for m in candidates], [m.sidenet for m in candidates], config=[m.config for m in candidates]
    ).eval()


@torch.no_grad()
def routed(model: sidenet.AdaptiveModel, loader: Iterable) -> dict[str, Any]:
    """Route every batch of ``loader`` as served (``model(x)``); answers, exits and FLOPs summed."""
    correct = exits = samples = 0
    flops = 0.0
    stages = torch.zeros(model.num_taps + 1, dtype=torch.long)
    for inputs, labels in iter_batches(loader):
        out = model(sidenet.training.to_mainnet(model.split, inputs))
        correct += int((out.predictions.cpu() == labels).sum())
        exits += int(out.exited.sum())
        samples += len(labels)
        flops += float(out.flops.double().sum())
        stages += torch.bincount(out.exit_stage.cpu(), minlength=model.num_taps + 1)
    return {"correct": correct, "exits": exits, "samples": samples, "flops": flops, "stages": stages.tolist()}


def _fraction(point: dict[str, Any]) -> float:
    return float(point["relative_compute"])


def fold_report(full: sidenet.AdaptiveModel, fold: Fold, rule: dict[str, float]) -> dict[str, Any]:
    """Choose the cascade on ``fold.choose`` under ``rule``; route it over ``fold.report``."""
    choosing = sidenet.collect_cascade(full, fold.choose, progress=False)
    choice = sidenet.choose_taps(choosing, **rule)
    reporting = sidenet.collect_cascade(full, fold.report, progress=False)
    mainnet_flops = float(reporting.mainnet_flops.sum())
    mainnet_correct = int(reporting.main_correct.sum())
    # Evidence for the family: each family's choice (taps and thresholds) on the choosing part, and
    # what it gives on the reporting part; the data-tuned search over all taps beside them.
    families = {}
    for family in FAMILIES:
        picked = sidenet.choose_taps(choosing, **rule, family=family)
        families[family] = {"taps": list(picked.taps), "choosing": picked.point, "reporting": _on(reporting, picked)}
    searched = search_thresholds(choosing, **rule)
    families["search_all_taps"] = {
        "taps": list(full.taps),
        "thresholds": list(searched),
        "choosing": sidenet.CascadeCurve(choosing, [searched]).at(searched),
        "reporting": sidenet.CascadeCurve(reporting, [searched]).at(searched),
    }
    mainnet_alone = {"correct": mainnet_correct, "exits": 0, "samples": len(reporting), "flops": mainnet_flops}
    model, outcome = _chosen(full, choice, fold, mainnet_alone)
    # The same rule priced in time (`sidenet fit --cost time`): every part timed on a batch of the served
    # size (its inputs only) and on fewer rows, the choosing record priced by those seconds, and the subsets
    # compared by a forecast of their routed batches.
    # Text on several batches of that size, priced at their mean (one batch's lengths would set the forecast).
    served = full.split.batch_size(fold.batches[0])
    timed_on = [b for b in fold.batches if full.split.batch_size(b) == served][: sidenet.timing_batch_count(full)]
    timings = [sidenet.measure_part_seconds(full, b, rows=sidenet.batch_row_counts(served)) for b in timed_on]
    parts = sidenet.PartSeconds.mean(timings)
    timed = sidenet.choose_taps(sidenet.time_weighted(choosing, parts), **rule, rank=sidenet.batch_time_rank(parts))
    timed_model, timed_outcome = _chosen(full, timed, fold, mainnet_alone)
    # The oracle reads no thresholds: a path of the never-exit vector alone is enough to build the curve.
    everything = sidenet.CascadeCurve(reporting, [(sidenet.NEVER_EXIT,) * reporting.num_taps])
    chosen = sidenet.CascadeCurve(reporting.restrict(choice.columns), [choice.thresholds]) if choice.columns else None
    return {
        "model": model,
        "time_priced_model": timed_model,
        "time_priced": {
            "taps": list(timed.taps),
            "thresholds": list(timed.thresholds),
            "choosing_point": timed.point,
            "outcome": timed_outcome,
            "part_seconds": parts.to_dict(),
            "forecast": _forecasts(reporting, parts, timed),
            # What the mean of the timed batches is for: each batch's timing alone forecasts otherwise.
            "forecast_each_timed_batch": [_forecasts(reporting, t, timed)["batches"] for t in timings],
            "flops_shares": {
                "segments": (choosing.segment_flops.mean(0) / choosing.mainnet_flops.mean()).tolist(),
                "sides": (choosing.side_flops.mean(0) / choosing.mainnet_flops.mean()).tolist(),
            },
        },
        "taps": list(choice.taps),
        "thresholds": list(choice.thresholds),
        "choosing_point": choice.point,
        "time_forecast": _forecasts(reporting, parts, choice),
        "candidates": [
            {"taps": list(c["taps"]), "relative_compute": None if c["point"] is None else _fraction(c["point"])}
            for c in choice.candidates
        ],
        "families": families,
        "outcome": outcome,
        "mainnet_correct": mainnet_correct,
        "mainnet_flops": mainnet_flops,
        "record_point": None if chosen is None else chosen.at(choice.thresholds),
        "oracle_all_taps": everything.oracle(),
        "oracle_chosen_taps": {"relative_compute": 1.0} if chosen is None else chosen.oracle(),
    }


def _forecasts(
    record: sidenet.CascadeRecord, parts: sidenet.PartSeconds, picked: sidenet.CascadeChoice
) -> dict[str, float]:
    """A choice's time on ``record`` (the reporting part) as a fraction of the MainNet's, forecast from
    ``parts``: priced per sample (``time_weighted``) and per routed batch (``forecast_batch_time``)."""
    if not picked.columns:
        return {"per_sample": 1.0, "batches": 1.0}
    priced = sidenet.time_weighted(record, parts).restrict(picked.columns)
    return {
        "per_sample": sidenet.CascadeCurve(priced, [picked.thresholds]).at(picked.thresholds)["relative_compute"],
        "batches": sidenet.forecast_batch_time(record, parts, picked.thresholds, columns=picked.columns),
    }


def _chosen(
    full: sidenet.AdaptiveModel, choice: sidenet.CascadeChoice, fold: Fold, mainnet_alone: dict[str, Any]
) -> tuple[sidenet.AdaptiveModel | None, dict[str, Any]]:
    """The chosen cascade at its thresholds and its answers routed over ``fold.report``; None and the
    MainNet's own outcome where the choice is the MainNet alone (nothing to route)."""
    if not choice.columns:
        return None, mainnet_alone
    model = full.with_taps(choice.taps)
    model.thresholds = choice.thresholds
    return model, routed(model, fold.report)


def _on(record: sidenet.CascadeRecord, picked: sidenet.CascadeChoice) -> dict[str, Any] | None:
    if not picked.columns:
        return None
    return sidenet.CascadeCurve(record.restrict(picked.columns), [picked.thresholds]).at(picked.thresholds)


def _weighted(forecasts: list[dict[str, float]], weights: np.ndarray) -> dict[str, float]:
    """The folds' forecasts of time fractions, weighted by their samples (the timing runs every batch)."""
    return {key: float(np.dot(weights, [f[key] for f in forecasts])) for key in forecasts[0]}


def cascade_section(
    candidates: Sequence[sidenet.AdaptiveModel],
    folds: Sequence[Fold],
    rule: dict[str, float],
    mainnet_run: Callable[[Any], Any],
    singles: Sequence[sidenet.AdaptiveModel],
    batch_name: str,
    repeats: int,
    size: Callable[[Any], int] = len,
    deploy: Iterable | None = None,
    goals: dict[str, tuple[str, float]] | None = None,
    serving_backend: str | None = None,
    mainnet_compiled: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """The cascade section of a step's JSON: chosen per fold, pooled over folds, timed.

    ``candidates``: one fitted SideNet per candidate tap (same MainNet, tap order); ``singles``: per fold,
    the step's single-tap choice at its threshold (timed beside the cascade on that fold's batches);
    ``deploy``: with several folds, the data the shipped choice is made on (all of them); its taps and
    thresholds are the section's ``taps`` and ``thresholds``, the folds' own are under ``folds``;
    ``goals``: targets (as :func:`benchmarks.harness.targets` takes them) over the section's
    ``accuracy_drop``, ``flops_fraction``, ``share_of_oracle_saving`` and ``speedup_<batch_name>``;
    ``serving_backend``: also time each fold's choice in the compiled serving mode
    (``compile_for_serving`` with that backend), beside ``mainnet_compiled`` (the MainNet compiled alone,
    when given: the best MainNet alone is the faster of it and the eager MainNet).
    """
    full = cascade_of(candidates)
    reports = [fold_report(full, fold, rule) for fold in folds]
    shipped = None
    if deploy is not None:
        shipped = sidenet.choose_taps(sidenet.collect_cascade(full, deploy, progress=False), **rule)
    samples = sum(r["outcome"]["samples"] for r in reports)
    accuracy = sum(r["outcome"]["correct"] for r in reports) / samples
    mainnet_accuracy = sum(r["mainnet_correct"] for r in reports) / samples
    flops_fraction = sum(r["outcome"]["flops"] for r in reports) / sum(r["mainnet_flops"] for r in reports)
    weights = np.array([r["outcome"]["samples"] for r in reports], dtype=float) / samples
    oracle = float(np.dot(weights, [r["oracle_all_taps"]["relative_compute"] for r in reports]))
    oracle_chosen = float(np.dot(weights, [r["oracle_chosen_taps"]["relative_compute"] for r in reports]))
    section: dict[str, Any] = {
        "candidate_taps": [str(t) for t in full.taps],
        "rule": rule,
        "folds": [{k: v for k, v in r.items() if k not in ("model", "time_priced_model")} for r in reports],
        "taps": list(shipped.taps) if shipped is not None else reports[0]["taps"],
        "thresholds": list(shipped.thresholds) if shipped is not None else reports[0]["thresholds"],
        "accuracy": accuracy,
        "mainnet_accuracy": mainnet_accuracy,
        "accuracy_drop": mainnet_accuracy - accuracy,
        "exit_rate": sum(r["outcome"]["exits"] for r in reports) / samples,
        "flops_fraction": flops_fraction,
        "oracle_flops_fraction": oracle,
        "oracle_chosen_taps_flops_fraction": oracle_chosen,
        # The share of the oracle's saving (over all candidate taps) that the chosen vector achieves.
        "share_of_oracle_saving": (1 - flops_fraction) / (1 - oracle) if oracle < 1 else float("nan"),
    }
    timed = [r["time_priced"]["outcome"] for r in reports]
    timed_accuracy = sum(t["correct"] for t in timed) / samples
    section["time_priced"] = {
        "taps": [r["time_priced"]["taps"] for r in reports],
        "accuracy": timed_accuracy,
        "accuracy_drop": mainnet_accuracy - timed_accuracy,
        "exit_rate": sum(t["exits"] for t in timed) / samples,
        "flops_fraction": sum(t["flops"] for t in timed) / sum(r["mainnet_flops"] for r in reports),
        "time_fraction_choosing": [r["time_priced"]["choosing_point"]["relative_compute"] for r in reports],
        "forecast": _weighted([r["time_priced"]["forecast"] for r in reports], weights),
        # Each fold's choice forecast from each of its timed batches alone (on that fold's reporting part).
        "forecast_each_timed_batch": [f for r in reports for f in r["time_priced"]["forecast_each_timed_batch"]],
        "timed_batches": reports[0]["time_priced"]["part_seconds"]["batches"],
    }
    section["time_forecast"] = _weighted([r["time_forecast"] for r in reports], weights)
    # Throughput: each fold's batches answered by that fold's choice, interleaved with the MainNet and the
    # single tap; the pooled router keeps one pool per fold (as two deployments would).
    items = [(i, batch) for i, fold in enumerate(folds) for batch in fold.batches]
    chosen = [r["model"] for r in reports]
    time_priced = [r["time_priced_model"] for r in reports]
    routers = [PooledRouter(m, rest_batch=None, max_wait=4) if m is not None else None for m in chosen]

    def per_fold(models: list[sidenet.AdaptiveModel | None]) -> Callable[[tuple[int, Any]], Any]:
        """A runner answering each fold's batches by that fold's model (the MainNet where it chose none)."""

        def run(item: tuple[int, Any]) -> Any:
            model = models[item[0]]
            return model(item[1]).logits if model is not None else mainnet_run(item[1])

        return run

    def run_pooled(item: tuple[int, Any]) -> Any:
        router = routers[item[0]]
        return router.submit(item[1]) if router is not None else mainnet_run(item[1])

    def flush() -> None:
        for router in routers:
            if router is not None:
                router.flush()

    runners = {
        "mainnet": lambda item: mainnet_run(item[1]),
        "single_tap": lambda item: singles[item[0]](item[1]).logits,
        "cascade": per_fold(chosen),
        "cascade_pooled": run_pooled,
        "cascade_time_priced": per_fold(time_priced),
    }
    if serving_backend is not None:
        examples = {i: fold.batches[0] for i, fold in enumerate(folds)}
        runners["cascade_compiled"], section["compiled"] = served_runner(
            dict(enumerate(chosen)), examples, serving_backend, mainnet_run
        )
        if mainnet_compiled is not None:
            runners["mainnet_compiled"] = lambda item: mainnet_compiled(item[1])
    timing = measure_throughput(
        runners, items, repeats=repeats, batch_size=lambda item: size(item[1]), finish={"cascade_pooled": flush}
    )
    base = timing["mainnet"].throughput
    section["timing"] = {batch_name: {k: v.to_dict() for k, v in timing.items()}}
    # Tensor operations per batch (after the timing: FLOPs are measured on first sight), beside what the batch
    # forecast leaves out: routing's bookkeeping runs operations of its own.
    section["operations_per_batch"] = {
        name: sum(count_operations(lambda run=runners[name]: [run(item) for item in items]).values()) / len(items)
        for name in ("mainnet", "cascade")
    }
    section["speedup"] = {
        batch_name: timing["cascade"].throughput / base,
        f"{batch_name}_pooled": timing["cascade_pooled"].throughput / base,
        f"{batch_name}_single_tap": timing["single_tap"].throughput / base,
        f"{batch_name}_time_priced": timing["cascade_time_priced"].throughput / base,
        "ideal": 1.0 / flops_fraction,
    }
    if serving_backend is not None:
        best = over_best_mainnet(section["timing"][batch_name], ["cascade_compiled"])
        section["compiled"]["best_mainnet"] = best["best_mainnet"]
        section["speedup"][f"{batch_name}_compiled"] = timing["cascade_compiled"].throughput / base
        over = best["speedup_over_best_mainnet"]["cascade_compiled"]
        section["speedup"][f"{batch_name}_compiled_over_best_mainnet"] = over
    values = {key: section[key] for key in ("accuracy_drop", "flops_fraction", "share_of_oracle_saving")}
    section["targets"] = targets(goals or {}, {**values, f"speedup_{batch_name}": section["speedup"][batch_name]})
    print(
        f"cascade: taps {section['taps']}, drop {100 * section['accuracy_drop']:+.2f} pt, exit "
        f"{section['exit_rate']:.3f}, FLOPs {flops_fraction:.3f} (oracle {oracle:.3f}); {batch_name} speed-up "
        f"{section['speedup'][batch_name]:.2f}x, pooled {section['speedup'][f'{batch_name}_pooled']:.2f}x, "
        f"single tap {section['speedup'][f'{batch_name}_single_tap']:.2f}x; chosen for time: taps "
        f"{section['time_priced']['taps']}, {section['speedup'][f'{batch_name}_time_priced']:.2f}x"
    )
    return section
