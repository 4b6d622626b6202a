"""One pass over a dataset: the per-sample results (:class:`SweepRecord`) that every threshold's
outcome depends on, collected by :func:`collect`. :mod:`sidenet.curve` turns them into the trade-off."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import InitVar, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

from sidenet.policy import ExitPolicy
from sidenet.training import trunk_batches

if TYPE_CHECKING:
    from sidenet.routing import AdaptiveModel

__all__ = ["SweepRecord", "collect"]


class _PolicyView(dict):
    """What the deprecated ``SweepRecord.policy`` reads: ``{"kind", "temperature"}`` of the exit rule.

    A type of its own because ``dataclasses.replace`` passes every init argument, the ``policy`` alias
    included, read back from the record: ``__post_init__`` must tell that echo (ignored) from a dict a
    caller passed (applied)."""


@dataclass
class SweepRecord:
    """Per-sample results of one pass: everything a threshold's outcome depends on."""

    confidence: np.ndarray  # SideNet confidence under exit_rule
    side_correct: np.ndarray  # bool
    main_correct: np.ndarray  # bool
    agree: np.ndarray  # bool: SideNet and MainNet predict the same class
    trunk_side_flops: np.ndarray  # FLOPs spent on every sample: trunk + SideNet
    rest_flops: np.ndarray  # FLOPs of the rest of the MainNet, saved when the sample exits (see collect)
    mainnet_flops: np.ndarray  # FLOPs of the MainNet alone on the sample
    # For calibration and per-class reports (filled by collect; optional for hand-made records):
    side_logits: np.ndarray | None = None  # (N, C) raw SideNet logits (before the temperature)
    main_logits: np.ndarray | None = None  # (N, C)
    labels: np.ndarray | None = None  # (N,)
    # The exit rule the confidences were scored under (its threshold was the model's then; the
    # confidences do not depend on it). None for hand-made records. JSON: exit_rule.to_dict().
    exit_rule: ExitPolicy | None = None
    order_dependent_flops: bool = False  # rest_flops credits follow the confidence order (text; see collect)
    # Deprecated: the {"kind", "temperature"} dict that exit_rule replaces, accepted until report.py
    # passes exit_rule; it sets those two fields of exit_rule. Read back through the property below.
    policy: InitVar[Mapping[str, Any] | None] = None

    def __post_init__(self, policy: Mapping[str, Any] | None) -> None:
        if policy is None or isinstance(policy, _PolicyView):
            return
        base = self.exit_rule if self.exit_rule is not None else ExitPolicy()
        settings = {key: policy[key] for key in ("kind", "temperature") if key in policy}
        self.exit_rule = dataclasses.replace(base, **settings)

    def __len__(self) -> int:
        return len(self.confidence)

    def subset(self, index: Any) -> SweepRecord:
        """The record of the samples ``index`` (an integer array or boolean mask), e.g. to split one
        pass into calibration and test parts. Text rest FLOPs keep the credits of the whole batch."""
        index = np.asarray(index)
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return SweepRecord(
            confidence=self.confidence[index],
            side_correct=self.side_correct[index],
            main_correct=self.main_correct[index],
            agree=self.agree[index],
            trunk_side_flops=self.trunk_side_flops[index],
            rest_flops=self.rest_flops[index],
            mainnet_flops=self.mainnet_flops[index],
            side_logits=pick(self.side_logits),
            main_logits=pick(self.main_logits),
            labels=pick(self.labels),
            exit_rule=self.exit_rule,  # frozen: shared, not copied
            order_dependent_flops=self.order_dependent_flops,
        )


def _policy_view(record: SweepRecord) -> dict[str, Any]:
    """Deprecated: ``{"kind", "temperature"}`` of :attr:`SweepRecord.exit_rule` (``{}`` without one);
    read ``record.exit_rule`` instead."""
    rule = record.exit_rule
    return _PolicyView() if rule is None else _PolicyView(kind=rule.kind, temperature=rule.temperature)


# Set after the class is built: in its body, the property would be the InitVar's default.
SweepRecord.policy = property(_policy_view)  # type: ignore[assignment]


def _marginal_rest_flops(model: AdaptiveModel, state: Any, confidence: np.ndarray, profile: Any) -> np.ndarray:
    """FLOPs of the rest that each sample of a batch saves by exiting, for a split whose rest costs
    depend on which samples continue (text: the rest runs at the longest remaining length).

    Samples exit in decreasing confidence, the order :class:`TradeoffCurve` uses (a stable sort, as
    there). ``cost[j]`` is what the rest of this batch costs once its ``j`` most confident samples have
    exited, exactly as :meth:`AdaptiveModel.forward` runs it: all ``n`` samples on the untouched state
    for ``j = 0``, the ``n - j`` others on their gathered, trimmed state otherwise. The sample of rank
    ``j`` is credited ``cost[j] - cost[j + 1]``, so that at every threshold the credits of the samples
    that continue add up to the batch's actual rest cost.
    """
    n = len(confidence)
    order = np.argsort(-confidence, kind="stable")
    index = torch.as_tensor(order, dtype=torch.long, device=_state_device(state))
    cost = np.zeros(n + 1)
    cost[0] = n * model.rest_flops(state, None, profile)
    for j in range(1, n):
        cost[j] = (n - j) * model.rest_flops(state, index[j:], profile)
    marginal = np.empty(n)
    marginal[order] = cost[:-1] - cost[1:]
    return marginal


def _state_device(state: Any) -> torch.device:
    return next(t.device for t in tree_leaves(state) if isinstance(t, torch.Tensor))


@torch.no_grad()
def collect(model: AdaptiveModel, loader: Iterable, progress: bool = True) -> SweepRecord:
    """Run trunk, SideNet and the rest of the MainNet once over ``loader`` (every sample), scoring the
    SideNet under the model's exit rule. Nothing is recorded in the model's traffic monitor.

    FLOPs are those :meth:`AdaptiveModel.forward` would spend on the same batches: trunk and SideNet at
    each batch's input size, the rest at the size it would actually run at for each threshold.
    Raises ``ValueError`` for a batch whose labels are not (N,) integer class indices of the model's
    classes (see :func:`sidenet.training.validate_labels`), and when the loader yields no batches.
    """
    rule = model.policy  # one rule for the whole pass, whatever another thread installs meanwhile
    columns = (
        "confidence",
        "side_predictions",
        "main_predictions",
        "labels",
        "trunk_side_flops",
        "rest_flops",
        "mainnet_flops",
        "side_logits",
        "main_logits",
    )
    parts: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    order_dependent = False
    for batch in trunk_batches(model, loader, progress, desc="Sweeping thresholds"):
        state, profile = batch.state, model.flop_profile(batch.inputs)
        side_logits = model.side_logits(state)
        main_logits = model.split.rest(state)
        confidence = rule.confidence(side_logits).cpu().numpy().astype(np.float64)
        n = len(confidence)
        if model.split.rest_flop_key(state) is None:
            rest = np.full(n, profile.rest, dtype=np.float64)
        else:
            rest = _marginal_rest_flops(model, state, confidence, profile)
            order_dependent = True
        parts["confidence"].append(confidence)
        parts["side_predictions"].append(side_logits.argmax(1).cpu().numpy())
        parts["main_predictions"].append(main_logits.argmax(1).cpu().numpy())
        parts["labels"].append(batch.labels.numpy())
        parts["trunk_side_flops"].append(np.full(n, profile.trunk + profile.side, dtype=np.float64))
        parts["rest_flops"].append(rest)
        parts["mainnet_flops"].append(np.full(n, profile.mainnet, dtype=np.float64))
        parts["side_logits"].append(side_logits.float().cpu().numpy())
        parts["main_logits"].append(main_logits.float().cpu().numpy())
    joined = {name: np.concatenate(arrays) for name, arrays in parts.items()}
    side, main, labels = joined["side_predictions"], joined["main_predictions"], joined["labels"]
    return SweepRecord(
        confidence=joined["confidence"],
        side_correct=side == labels,
        main_correct=main == labels,
        agree=side == main,
        trunk_side_flops=joined["trunk_side_flops"],
        rest_flops=joined["rest_flops"],
        mainnet_flops=joined["mainnet_flops"],
        side_logits=joined["side_logits"],
        main_logits=joined["main_logits"],
        labels=labels.astype(np.int64),
        exit_rule=rule,
        order_dependent_flops=order_dependent,
    )
