"""One pass of a cascade over a dataset: every SideNet scored on every sample, with the FLOPs of each
MainNet segment and each SideNet, as a :class:`~sidenet.cascade_curve.CascadeRecord` that the
threshold and tap choices read without running a network again (see :func:`collect_cascade`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from sidenet.cascade_curve import CascadeRecord
from sidenet.training import trunk_batches

if TYPE_CHECKING:
    from sidenet.routing import AdaptiveModel

__all__ = ["collect_cascade"]


@torch.no_grad()
def collect_cascade(model: AdaptiveModel, loader: Iterable, progress: bool = True) -> CascadeRecord:
    """Run the MainNet once over ``loader``, every segment on every sample, and score each SideNet of
    ``model`` (one SideNet or a cascade) under its own exit rule. Nothing is recorded in the model's
    traffic monitor.

    FLOPs per sample are measured per part at each batch's size: the trunk and the first SideNet on
    the batch's inputs, each later segment and SideNet on the batch's state (text: at its padded
    length), the rest of the MainNet after the last tap likewise. Routing gathers the continuing samples
    of a text batch and cuts their padding at each tap, so a routed text batch costs at most what the
    record says; vision costs exactly that. Raises ``ValueError`` for bad labels (see
    :func:`sidenet.training.validate_labels`) and when the loader yields no batches.
    """
    splits, rules, ledger = model.splits, model.policies, model.flop_ledger
    count = model.num_taps
    columns: dict[str, list[np.ndarray]] = {
        name: [] for name in ("confidence", "side", "main", "labels", "segments", "sides")
    }
    for batch in trunk_batches(model, loader, progress, desc="Scoring the cascade"):
        state, profile = batch.state, model.flop_profile(batch.inputs)
        n = len(batch.labels)
        scores, answers = [], []
        segments, sides = [float(profile.trunk)], [float(profile.side)]
        for k in range(count):
            if k:
                segment, side = ledger.step_parts(k, state, profile)
                segments.append(float(segment))
                sides.append(float(side))
                state = splits[k - 1].advance(state, splits[k])
            logits = model.side_logits(state, k)
            scores.append(rules[k].confidence(logits).cpu().numpy().astype(np.float64))
            answers.append(logits.argmax(1).cpu().numpy())
        segments.append(ledger.rest(state, None, profile, part=count - 1))
        columns["confidence"].append(np.stack(scores, 1))
        columns["side"].append(np.stack(answers, 1))
        columns["main"].append(splits[-1].rest(state).argmax(1).cpu().numpy())
        columns["labels"].append(batch.labels.numpy())
        columns["segments"].append(np.tile(np.asarray(segments, dtype=np.float64), (n, 1)))
        columns["sides"].append(np.tile(np.asarray(sides, dtype=np.float64), (n, 1)))
    joined = {name: np.concatenate(parts) for name, parts in columns.items()}
    return CascadeRecord(
        confidence=joined["confidence"],
        side_predictions=joined["side"],
        main_predictions=joined["main"],
        labels=joined["labels"].astype(np.int64),
        segment_flops=joined["segments"],
        side_flops=joined["sides"],
        taps=model.taps,
        exit_rules=rules,
    )
