"""What ``sidenet fit`` (and ``sidenet demo``) run: train the SideNet, or the candidate SideNets of a
cascade, choose the threshold (or the taps and thresholds) on the validation data, and save."""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path
from typing import Any

from sidenet.attach import attach, save_sidenet
from sidenet.calibration import calibrate
from sidenet.cascade_choice import choose_taps
from sidenet.cascade_curve import CascadeCurve
from sidenet.cascade_record import collect_cascade
from sidenet.cli_options import FitSettings
from sidenet.curve import sweep
from sidenet.loaders import iter_batches, prefix_loader
from sidenet.part_costs import batch_row_counts, time_weighted
from sidenet.placement import placed
from sidenet.routing import AdaptiveModel
from sidenet.splits import candidate_taps, split_mainnet
from sidenet.tasks import get_task
from sidenet.time_forecast import batch_time_rank, forecast_batch_time, measure_part_seconds_over, timing_batch_count
from sidenet.training import to_mainnet

__all__ = ["fit_and_save", "choose_cascade"]


def fit_and_save(settings: FitSettings, progress: bool = True) -> tuple[Path, dict]:
    """Train the SideNet ``settings`` describe, choose its threshold on ``val`` and save it; returns
    the folder and the threshold choice (also saved in the SideNet's metadata)."""
    task = get_task(settings.task)
    mainnet = task.mainnet(settings.data, progress=progress)
    mainnet = placed(mainnet, settings.device, settings.dtype, settings.channels_last)
    loaders = task.loaders(settings.data)
    loaders["train"] = prefix_loader(loaders["train"], settings.max_train_samples)
    loaders["val"] = prefix_loader(loaders["val"], settings.max_val_samples)
    taps: Any = settings.tap
    if settings.taps == ("auto",):
        taps = candidate_taps(split_mainnet(mainnet, settings.tap, **(settings.split_options or {})))
    elif settings.taps is not None:
        taps = list(settings.taps)
    try:
        model = attach(
            mainnet,
            taps,
            input_shape=task.input_shape,
            hidden=settings.hidden,
            pool_size=settings.pool,
            seed=settings.seed,
            split_options=settings.split_options,
            policy=settings.policy,
        )
    except TypeError as exc:
        if not settings.split_options:
            raise
        # A splitter without those options rejects them as unexpected keyword arguments.
        raise ValueError(f"split options {settings.split_options} do not apply to this MainNet: {exc}") from exc
    started = time.perf_counter()
    model.fit(
        loaders["train"],
        val_loader=loaders["val"],
        epochs=settings.epochs,
        distill_weight=settings.distill,
        seed=settings.seed,
        progress=progress,
    )
    seconds = time.perf_counter() - started
    if settings.temperature_scaling:
        calibrate(model, loaders["val"], progress=progress)
    if settings.taps is not None:
        # --cost time times the parts on one validation batch: of the served size where given.
        timing = (
            loaders["val"]
            if settings.serve_batch is None
            else task.loaders(settings.data, batch_size=settings.serve_batch)["val"]
        )
        return choose_cascade(model, loaders["val"], settings, task.name, seconds, progress, timing)
    val_curve = sweep(model, loaders["val"], progress=progress)
    model.threshold = val_curve.threshold_for(max_accuracy_drop=settings.max_drop, confidence=settings.confidence)
    model.set_reference(val_curve.record.confidence)  # for the shift check on later traffic
    choice = {
        "max_accuracy_drop": settings.max_drop,
        "confidence": settings.confidence,
        "chosen_on": "val",
        "validation_samples": val_curve.num_samples,
        "temperature": model.temperature,
        "policy": settings.policy,
        **val_curve.at(model.threshold),
    }
    metadata = {"task": task.name, "fit_seconds": seconds, "threshold_choice": choice}
    save_sidenet(model, settings.out, metadata=metadata)
    return settings.out, choice


def choose_cascade(
    model: AdaptiveModel,
    val: Any,
    settings: FitSettings,
    task: str,
    seconds: float,
    progress: bool,
    timing: Any = None,
) -> tuple[Path, dict]:
    """Keep the taps and thresholds of the fitted candidates that ``choose_taps`` picks on ``val``, and
    save that cascade (or the one SideNet it keeps); returns the folder and the choice. ``--cost time``
    times the parts on the first batch of ``timing`` (default: of ``val``; text: the first four)."""
    record = collect_cascade(model, val, progress=progress)
    priced: dict[str, Any] = {"cost": settings.cost}
    counted, parts = record, None
    if settings.cost == "time":  # every part timed on a validation batch, where and as the MainNet runs now
        # Text: on a few batches, priced at their mean (one batch's lengths would set the forecast).
        loaded = islice(iter_batches(val if timing is None else timing), timing_batch_count(model))
        batches = [to_mainnet(model.split, inputs) for inputs, _ in loaded]
        # Also on fewer rows, as routed batches run their later parts: for the forecast below.
        rows = batch_row_counts(model.split.batch_size(batches[0]))
        parts = measure_part_seconds_over(model, batches, rows=rows)
        record = time_weighted(record, parts)
        priced["part_seconds"] = parts.to_dict()
    # With a guarantee, half of val chooses the taps and the path, the other half certifies the thresholds.
    holdout = 0.5 if settings.confidence is not None else None
    # Priced in time, subsets compete by what their routed batches will cost: each part one call on the rows
    # that reach it (a call on few rows costs more than their share of a full batch), routing included.
    rank = None if parts is None else batch_time_rank(parts)
    choice = choose_taps(
        record, max_accuracy_drop=settings.max_drop, confidence=settings.confidence, holdout=holdout, rank=rank
    )
    if not choice.columns:
        raise ValueError(
            f"no SideNet among the taps {', '.join(map(str, model.taps))} saves compute within --max-drop "
            f"{settings.max_drop} on the validation data: the MainNet alone is the best choice"
        )
    if parts is not None:  # the same forecast on all of val (with a guarantee, the subset was ranked on half)
        forecast = forecast_batch_time(counted, parts, choice.thresholds, columns=choice.columns)
        priced["time_forecast"] = {"batch_size": parts.batch_size, "time_fraction": forecast}
        # The point's compute is in seconds here: name it so, and keep the FLOPs fraction beside it.
        in_flops = CascadeCurve(counted.restrict(choice.columns), [choice.thresholds]).at(choice.thresholds)
        priced["flops_fraction"] = in_flops["relative_compute"]
    chosen = model.with_taps(choice.taps)
    chosen.thresholds = choice.thresholds
    chosen.set_reference(record.confidence[:, choice.columns[0]])  # the first SideNet's scores, for the shift check
    summary = {
        "max_accuracy_drop": settings.max_drop,
        "confidence": settings.confidence,
        "chosen_on": "val" if holdout is None else "val, halves (taps | thresholds)",
        "validation_samples": len(counted),
        "candidate_taps": [str(tap) for tap in model.taps],
        "taps": [str(tap) for tap in choice.taps],
        "thresholds": list(choice.thresholds),
        "temperatures": [rule.temperature for rule in chosen.policies],
        "policy": settings.policy,
        "family": choice.family,
        **priced,
        "evidence": [
            {
                "taps": [str(t) for t in c["taps"]],
                "relative_compute": c["point"] and c["point"]["relative_compute"],
                "time_forecast": c["point"] and c["point"].get("ranked_compute"),
            }
            for c in choice.candidates
        ],
        **{k: v for k, v in choice.point.items() if k not in ("thresholds", "mean_flops")},
        **{"mean_seconds" if parts is not None else "mean_flops": choice.point["mean_flops"]},
    }
    metadata = {"task": task, "fit_seconds": seconds, "threshold_choice": summary}
    chosen.history_ = model.history_
    save_sidenet(chosen, settings.out, metadata=metadata)
    return settings.out, summary
