"""One pass of a cascade over a dataset: every SideNet scored on every sample, with the FLOPs of each
MainNet segment and each SideNet, as a :class:`~sidenet.cascade_curve.CascadeRecord` that the
threshold and tap choices read without running a network again (see :func:`collect_cascade`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sidenet.policy import ExitPolicy
from sidenet.training import trunk_batches

if TYPE_CHECKING:
    from sidenet.routing import AdaptiveModel

__all__ = ["CascadeRecord", "collect_cascade", "part_flops", "states_at_taps"]


@dataclass
class CascadeRecord:
    """Per-sample results of one MainNet pass with K SideNets (in tap order): everything the outcome of
    a threshold vector depends on. Every SideNet is scored on every sample, exit or not.

    Attributes:
        confidence: (N, K) each SideNet's exit score under its own exit rule.
        side_predictions: (N, K) each SideNet's class.
        main_predictions: (N,) the MainNet's class.
        labels: (N,) or None (then accuracies are NaN; disagreement with the MainNet still works).
        segment_flops: (N, K + 1) FLOPs of MainNet segment j on the sample: j = 0 input -> tap 0,
            j = k tap k-1 -> tap k, j = K last tap -> logits. A row sums to the MainNet's FLOPs.
        side_flops: (N, K) FLOPs of SideNet k on the sample.
        taps: the K tap names (default 0..K-1); exit_rules: K exit rules or None.
    """

    confidence: np.ndarray
    side_predictions: np.ndarray
    main_predictions: np.ndarray
    labels: np.ndarray | None
    segment_flops: np.ndarray
    side_flops: np.ndarray
    taps: tuple[str | int, ...] | None = None
    exit_rules: tuple[ExitPolicy | None, ...] | None = None

    def __post_init__(self) -> None:
        self.confidence = np.asarray(self.confidence, dtype=np.float64)
        if self.confidence.ndim != 2 or self.confidence.shape[1] == 0:
            raise ValueError(f"confidence must be (N, K) with K >= 1 SideNets, got shape {self.confidence.shape}")
        n, k = self.confidence.shape
        expected = {
            "side_predictions": (n, k),
            "main_predictions": (n,),
            "segment_flops": (n, k + 1),
            "side_flops": (n, k),
        }
        if self.labels is not None:
            expected["labels"] = (n,)
        for name, shape in expected.items():
            value = np.asarray(getattr(self, name))
            if value.shape != shape:
                raise ValueError(
                    f"{name} must have shape {shape} for N={n} samples and K={k} SideNets, got {value.shape}"
                )
            dtype = np.float64 if name.endswith("flops") else np.int64
            setattr(self, name, value.astype(dtype))
        if not np.all(np.isfinite(self.confidence)) or np.any((self.confidence < 0) | (self.confidence > 1)):
            raise ValueError("confidence must hold exit scores in [0, 1] (no NaN)")
        for name in ("segment_flops", "side_flops"):
            value = getattr(self, name)
            if not np.all(np.isfinite(value)) or np.any(value < 0):
                raise ValueError(f"{name} must be finite and >= 0")
        self.taps = tuple(range(k)) if self.taps is None else tuple(self.taps)
        self.exit_rules = (None,) * k if self.exit_rules is None else tuple(self.exit_rules)
        for name in ("taps", "exit_rules"):
            if len(getattr(self, name)) != k:
                raise ValueError(f"{name} must name the K={k} SideNets, got {len(getattr(self, name))}")

    def __len__(self) -> int:
        return len(self.confidence)

    @property
    def num_taps(self) -> int:
        return self.confidence.shape[1]

    @property
    def mainnet_flops(self) -> np.ndarray:
        """(N,) the MainNet's FLOPs alone (no SideNet)."""
        return self.segment_flops.sum(axis=1)

    @property
    def agree(self) -> np.ndarray:
        """(N, K) whether SideNet k answers as the MainNet does."""
        return self.side_predictions == self.main_predictions[:, None]

    @property
    def side_correct(self) -> np.ndarray | None:
        """(N, K) whether SideNet k is right; None without labels."""
        return None if self.labels is None else self.side_predictions == self.labels[:, None]

    @property
    def main_correct(self) -> np.ndarray | None:
        """(N,) whether the MainNet is right; None without labels."""
        return None if self.labels is None else self.main_predictions == self.labels

    def stage_costs(self) -> np.ndarray:
        """(N, K + 1): column k < K is :meth:`exit_cost` (k), column K is :attr:`main_cost`."""
        exits = np.cumsum(self.segment_flops[:, :-1] + self.side_flops, axis=1)
        return np.concatenate([exits, exits[:, -1:] + self.segment_flops[:, -1:]], axis=1)

    def exit_cost(self, k: int) -> np.ndarray:
        """(N,) FLOPs of a sample that exits at SideNet k: MainNet segments 0..k and SideNets 0..k."""
        if not 0 <= k < self.num_taps:
            raise ValueError(f"SideNet index must lie in [0, {self.num_taps - 1}], got {k}")
        return self.segment_flops[:, : k + 1].sum(axis=1) + self.side_flops[:, : k + 1].sum(axis=1)

    @property
    def main_cost(self) -> np.ndarray:
        """(N,) FLOPs of a sample that exits nowhere: the whole MainNet and every SideNet."""
        return self.segment_flops.sum(axis=1) + self.side_flops.sum(axis=1)

    def subset(self, index: Any) -> CascadeRecord:
        """The record of the samples ``index`` (an integer array or a boolean mask)."""
        index = np.asarray(index)
        return CascadeRecord(
            confidence=self.confidence[index],
            side_predictions=self.side_predictions[index],
            main_predictions=self.main_predictions[index],
            labels=None if self.labels is None else self.labels[index],
            segment_flops=self.segment_flops[index],
            side_flops=self.side_flops[index],
            taps=self.taps,
            exit_rules=self.exit_rules,
        )

    def restrict(self, columns: Sequence[int]) -> CascadeRecord:
        """The record of the sub-cascade made of the SideNets ``columns`` (sorted distinct indices).

        The MainNet is the same, cut at fewer taps: each segment of the sub-cascade is the sum of the
        original segments between its taps, so segment rows still add up to the MainNet's FLOPs.
        """
        cols = checked_columns(columns, self.num_taps)
        # Segment j of the sub-cascade runs from just after its tap j-1 to its tap j (summed, not
        # differenced from a cumulative sum, so that keeping every tap changes no bit).
        segments = np.add.reduceat(self.segment_flops, [0, *(c + 1 for c in cols)], axis=1)
        return CascadeRecord(
            confidence=self.confidence[:, cols],
            side_predictions=self.side_predictions[:, cols],
            main_predictions=self.main_predictions,
            labels=self.labels,
            segment_flops=segments,
            side_flops=self.side_flops[:, cols],
            taps=tuple(self.taps[c] for c in cols),
            exit_rules=tuple(self.exit_rules[c] for c in cols),
        )


def checked_columns(columns: Sequence[int], k: int) -> list[int]:
    """``columns`` as a list of ints, or ``ValueError`` unless they are sorted distinct indices of K SideNets."""
    cols = [int(c) for c in columns]
    if not cols or cols != sorted(set(cols)) or cols[0] < 0 or cols[-1] >= k:
        raise ValueError(f"columns must be sorted distinct SideNet indices in [0, {k - 1}], got {list(columns)}")
    return cols


def states_at_taps(model: AdaptiveModel, state: Any) -> list[Any]:
    """The MainNet's state at each of ``model``'s taps, from ``state`` at the first (its trunk's output)."""
    splits = model.splits
    states = [state]
    for k in range(1, len(splits)):
        states.append(splits[k - 1].advance(states[-1], splits[k]))
    return states


def part_flops(model: AdaptiveModel, inputs: Any, states: list[Any]) -> tuple[list[float], list[float]]:
    """FLOPs per sample of each MainNet segment (input -> tap 0, tap k-1 -> tap k, last tap -> logits) and
    of each SideNet, on the batch ``inputs`` whose state at each tap is ``states`` (:func:`states_at_taps`):
    the trunk and the first SideNet at the inputs' size, later parts on the state (text: its padded length)."""
    profile, ledger = model.flop_profile(inputs), model.flop_ledger
    segments, sides = [float(profile.trunk)], [float(profile.side)]
    for k in range(1, len(states)):
        segment, side = ledger.step_parts(k, states[k - 1], profile)
        segments.append(float(segment))
        sides.append(float(side))
    segments.append(float(ledger.rest(states[-1], None, profile, part=len(states) - 1)))
    return segments, sides


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
    splits, rules = model.splits, model.policies
    columns: dict[str, list[np.ndarray]] = {
        name: [] for name in ("confidence", "side", "main", "labels", "segments", "sides")
    }
    for batch in trunk_batches(model, loader, progress, desc="Scoring the cascade"):
        states = states_at_taps(model, batch.state)
        segments, sides = part_flops(model, batch.inputs, states)
        n = len(batch.labels)
        scores, answers = [], []
        for k, state in enumerate(states):
            logits = model.side_logits(state, k)
            scores.append(rules[k].confidence(logits).cpu().numpy().astype(np.float64))
            answers.append(logits.argmax(1).cpu().numpy())
        columns["confidence"].append(np.stack(scores, 1))
        columns["side"].append(np.stack(answers, 1))
        columns["main"].append(splits[-1].rest(states[-1]).argmax(1).cpu().numpy())
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
