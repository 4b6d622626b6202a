"""One pass over a dataset: the per-sample results (:class:`SweepRecord`) that every threshold's
outcome depends on, collected by :func:`collect`. :mod:`sidenet.curve` turns them into the trade-off."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from sidenet.data import batch_count, iter_batches
from sidenet.training import validate_labels

if TYPE_CHECKING:
    from sidenet.routing import AdaptiveModel

__all__ = ["SweepRecord", "collect"]


@dataclass
class SweepRecord:
    """Per-sample results of one pass: everything a threshold's outcome depends on."""

    confidence: np.ndarray  # SideNet confidence under the model's exit policy
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
    policy: dict[str, Any] = field(default_factory=dict)  # the exit policy the confidences were taken under
    order_dependent_flops: bool = False  # rest_flops credits follow the confidence order (text; see collect)

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
            policy=dict(self.policy),
            order_dependent_flops=self.order_dependent_flops,
        )


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
    """Run trunk, SideNet and the rest of the MainNet once over ``loader`` (every sample).

    FLOPs are those :meth:`AdaptiveModel.forward` would spend on the same batches: trunk and SideNet at
    each batch's input size, the rest at the size it would actually run at for each threshold.
    Raises ``ValueError`` for a batch whose labels are not (N,) integer class indices of the model's
    classes (see :func:`sidenet.training.validate_labels`), and when the loader yields no batches.
    """
    model.eval()
    keys = ("conf", "side", "main", "labels", "ts", "rest", "mainnet", "side_logits", "main_logits")
    parts: dict[str, list] = {k: [] for k in keys}
    order_dependent = False
    for inputs, labels in tqdm(
        iter_batches(loader), desc="Sweeping thresholds", total=batch_count(loader), disable=not progress, leave=False
    ):
        front = model.front_pass(inputs, "side")  # trunk and SideNet; "side" leaves the exit counts alone
        state, side_logits, profile = front.state, front.side_logits, front.profile
        n = len(side_logits)
        # Before the rest of the MainNet runs: (N, 1) labels would broadcast against (N,) predictions
        # into an (N, N) comparison, and labels out of range would score 0 without a word.
        targets = validate_labels(labels, n, model.sidenet.num_classes)
        main_logits = model.split.rest(state)
        confidence = front.confidence.cpu().numpy().astype(np.float64)
        if model.split.rest_flop_key(state) is None:
            rest = np.full(n, profile.rest, dtype=np.float64)
        else:
            rest = _marginal_rest_flops(model, state, confidence, profile)
            order_dependent = True
        parts["conf"].append(confidence)
        parts["side"].append(side_logits.argmax(1).cpu().numpy())
        parts["main"].append(main_logits.argmax(1).cpu().numpy())
        parts["labels"].append(targets.numpy())
        parts["ts"].append(np.full(n, profile.trunk + profile.side, dtype=np.float64))
        parts["rest"].append(rest)
        parts["mainnet"].append(np.full(n, profile.mainnet, dtype=np.float64))
        parts["side_logits"].append(side_logits.float().cpu().numpy())
        parts["main_logits"].append(main_logits.float().cpu().numpy())
    if not parts["conf"]:
        raise ValueError("the loader yielded no batches")
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return SweepRecord(
        confidence=cat["conf"].astype(np.float64),
        side_correct=cat["side"] == cat["labels"],
        main_correct=cat["main"] == cat["labels"],
        agree=cat["side"] == cat["main"],
        trunk_side_flops=cat["ts"],
        rest_flops=cat["rest"],
        mainnet_flops=cat["mainnet"],
        side_logits=cat["side_logits"],
        main_logits=cat["main_logits"],
        labels=cat["labels"].astype(np.int64),
        policy={"kind": model.policy.kind, "temperature": model.policy.temperature},
        order_dependent_flops=order_dependent,
    )
