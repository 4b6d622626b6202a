"""``PooledRouter``: per-sample routing over a stream of batches, with the rest of the MainNet run on
continuing samples pooled across batches.

Per-sample routing inside one batch leaves the rest of the MainNet with the few samples that did not
exit (at a 96% exit rate, two or three of 64), and a small batch costs far more per sample than a
full one. A serving loop that sees many batches can instead keep the tap states of the continuing
samples until ``rest_batch`` of them wait, and finish them together. The answers are the same as
:meth:`AdaptiveModel.forward`'s (up to float rounding); the price is latency for the samples that
continue: their batch is answered when its last sample is, at most ``max_wait`` batches later.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sidenet.flops import FlopProfile
from sidenet.outputs import state_rows
from sidenet.routing import AdaptiveModel, AdaptiveOutput

if TYPE_CHECKING:
    from sidenet.audit import LiveAudit

__all__ = ["PooledRouter", "RoutedBatch"]


@dataclass
class RoutedBatch:
    """A submitted batch, answered in full.

    Attributes:
        batch_id: its place in the order of submission (0, 1, ...), as :meth:`PooledRouter.submit`
            numbers them; batches may be answered out of that order.
        output: logits, exits, confidences and FLOPs per sample, as :meth:`AdaptiveModel.forward` gives.
        waited: how many later batches were submitted before its last sample was answered (0: answered
            by its own ``submit`` call).
    """

    batch_id: int
    output: AdaptiveOutput
    waited: int


@dataclass
class _OpenBatch:
    """A batch some of whose samples still wait for the rest of the MainNet."""

    output: AdaptiveOutput
    profile: FlopProfile
    missing: int


@dataclass
class _Waiting:
    """Continuing samples of one batch: their positions in it and their tap state."""

    batch_id: int
    positions: torch.Tensor
    state: Any

    def __len__(self) -> int:
        return len(self.positions)


class PooledRouter:
    """Route a stream of batches sample by sample, running the rest of the MainNet on full batches of
    continuing samples gathered across input batches.

    Args:
        model: the adaptive model (its threshold, policy and temperature decide the exits).
        rest_batch: run the rest as soon as this many samples wait; ``None`` takes the size of the
            first batch submitted.
        max_wait: run the rest on whatever waits once the oldest waiting sample has seen this many
            later batches submitted; bounds the extra latency. 0 finishes every batch in its own call
            (per-batch routing, as :meth:`AdaptiveModel.forward`).
        stages: what runs the two stages: ``None`` (the model itself, eagerly) or a
            :class:`~sidenet.compiled.CompiledAdaptiveModel` (its ``front_pass``, ``continuing`` and
            ``continue_from``), as :meth:`CompiledAdaptiveModel.pooled_router` builds it.
        audit: a :class:`~sidenet.audit.LiveAudit` given every batch's front pass: a random share of the
            samples also runs the rest of the MainNet, off the answer path, to bound live disagreement.

    Use :meth:`submit` per incoming batch and :meth:`flush` when the stream pauses or ends, or
    :meth:`run` for a whole list of batches. Every batch is recorded in the model's traffic monitor
    (``model.monitor``: ``model.observed_exit_rate``, the shift check) as in adaptive mode; exits are
    decided when a batch is submitted. One router serves one stream: it is not thread-safe.
    """

    def __init__(
        self,
        model: AdaptiveModel,
        rest_batch: int | None = None,
        max_wait: int = 4,
        stages: Any = None,
        audit: LiveAudit | None = None,
    ) -> None:
        if rest_batch is not None and (isinstance(rest_batch, bool) or int(rest_batch) != rest_batch or rest_batch < 1):
            raise ValueError(f"rest_batch must be a positive integer or None, got {rest_batch!r}")
        if isinstance(max_wait, bool) or int(max_wait) != max_wait or max_wait < 0:
            raise ValueError(f"max_wait must be a non-negative integer, got {max_wait!r}")
        self.model = model
        self.stages = stages
        self.audit = audit
        self.rest_batch = None if rest_batch is None else int(rest_batch)
        self.max_wait = int(max_wait)
        self._submitted = 0
        self._open: dict[int, _OpenBatch] = {}
        self._pool: deque[_Waiting] = deque()
        self._pooled = 0

    @property
    def pending(self) -> int:
        """Samples waiting for the rest of the MainNet."""
        return self._pooled

    @torch.no_grad()
    def submit(self, x: Any) -> list[RoutedBatch]:
        """Run trunk and SideNet on the batch ``x`` (numbered by submission order); returns every batch
        answered in full by this call, in submission order, this one included when none of its samples
        waits."""
        model, stages = self.model, self.stages or self.model
        front = stages.front_pass(x, "adaptive")
        if self.audit is not None:
            self.audit.check(model, front)
        batch_id = self._submitted
        self._submitted += 1
        if self.rest_batch is None:
            self.rest_batch = len(front.exited)
        output = front.answers(model.num_taps)
        remaining, sizes = stages.continuing(front)  # the batch's one host wait
        # Its first SideNet's exits, counted from that read (a cascade's later ones: once they have run).
        model.monitor.record(front.exited, front.confidence, len(front.exited) - len(remaining))
        self._open[batch_id] = _OpenBatch(output, front.profile, len(remaining))
        if len(remaining):
            # A captured stage's state is overwritten by its next replay, and a padded batch's state has
            # more rows than samples (see CompiledAdaptiveModel.batch_sizes): keep a copy of the samples then.
            everyone = len(remaining) == state_rows(front.state) and not getattr(stages, "reuses_outputs", False)
            state = front.state if everyone else model.split.select_sized(front.state, remaining, sizes)
            self._pool.append(_Waiting(batch_id, remaining, state))
            self._pooled += len(remaining)
        while self._pooled >= self.rest_batch:
            self._finish(self.rest_batch)
        if self._pool and self._submitted - 1 - self._pool[0].batch_id >= self.max_wait:
            self._finish_all()
        return self._answered()

    @torch.no_grad()
    def flush(self) -> list[RoutedBatch]:
        """Run the rest on every waiting sample; returns the batches this answers, in submission order."""
        self._finish_all()
        return self._answered()

    def run(self, batches: Iterable[Any]) -> list[RoutedBatch]:
        """Submit every batch, flush, and return all answers in submission order."""
        answered = [routed for batch in batches for routed in self.submit(batch)]
        answered += self.flush()
        return sorted(answered, key=lambda routed: routed.batch_id)

    # -- internals -------------------------------------------------------------------------------
    def _finish_all(self) -> None:
        while self._pooled:
            self._finish(min(self._pooled, self.rest_batch or self._pooled))

    def _take(self, count: int) -> list[_Waiting]:
        """The oldest ``count`` waiting samples, splitting a batch's group when it straddles the cut."""
        split = self.model.split
        taken: list[_Waiting] = []
        while count:
            head = self._pool[0]
            if len(head) <= count:
                taken.append(self._pool.popleft())
            else:
                front = torch.arange(count, device=head.positions.device)
                back = torch.arange(count, len(head), device=head.positions.device)
                # No sizes: both parts keep the group's size (text: its length), so cutting reads nothing.
                first, later = head.positions[:count], head.positions[count:]
                taken.append(_Waiting(head.batch_id, first, split.select_sized(head.state, front, ())))
                self._pool[0] = _Waiting(head.batch_id, later, split.select_sized(head.state, back, ()))
            count -= len(taken[-1])
        return taken

    def _finish(self, count: int) -> None:
        """Run the rest of the model on the oldest ``count`` waiting samples and file their answers: the
        later SideNets of a cascade and the rest of the MainNet (one SideNet: the rest of the MainNet)."""
        model = self.model
        taken = self._take(count)
        self._pooled -= count
        state = taken[0].state if len(taken) == 1 else model.split.concat([group.state for group in taken])
        profile = self._open[taken[0].batch_id].profile  # the pooled inputs share one size (concat checks)
        later = (self.stages or model).continue_from(state, profile)
        if model.num_taps > 1:
            model.monitor.count_exits(later.exited)  # their first-tap pass was recorded on submitting
        offset = 0
        for group in taken:
            waiting = self._open[group.batch_id]
            part = later.sliced(slice(offset, offset + len(group)))
            # Their logits and exit flags filed now; FLOPs, exit stages and (a cascade: a later SideNet's score
            # is the latest these samples got) scores when read: no operation for them while serving.
            waiting.output = waiting.output.completed(group.positions, part, rescored=model.num_taps > 1)
            waiting.missing -= len(group)
            offset += len(group)

    def _answered(self) -> list[RoutedBatch]:
        done = sorted(batch_id for batch_id, batch in self._open.items() if batch.missing == 0)
        newest = self._submitted - 1
        return [RoutedBatch(batch_id, self._open.pop(batch_id).output, newest - batch_id) for batch_id in done]
