"""What routing returns: :class:`AdaptiveOutput` for a classified batch and :class:`FrontPass` for the
trunk and SideNet run on one (see :class:`sidenet.AdaptiveModel`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from sidenet.flops import FlopProfile

__all__ = ["AdaptiveOutput", "FrontPass", "state_rows"]


def state_rows(state: Any) -> int:
    """The rows of a MainNet state (its first tensor's first dimension): its samples, and after them any
    rows that pad it to a served size (see :class:`~sidenet.compiled.CompiledAdaptiveModel`)."""
    return int(tree_leaves(state)[0].shape[0])


Lazy = torch.Tensor | Callable[[], torch.Tensor]


class _ComputedWhenRead:
    """An attribute set to a tensor or to a function computing it (``None`` stays ``None``); a function is
    called on the first reading and its tensor kept."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, output: object, owner: type | None = None) -> Any:
        if output is None:
            return self
        value = getattr(output, self.slot)
        if value is not None and not isinstance(value, torch.Tensor):
            value = value()
            setattr(output, self.slot, value)
        return value

    def __set__(self, output: object, value: Lazy | None) -> None:
        setattr(output, self.slot, value)


class AdaptiveOutput:
    """What the adaptive model returns for a batch.

    Attributes:
        logits: (N, C) the SideNet's logits for samples that exited, the MainNet's for the others.
        exited: (N,) True where the SideNet answered.
        confidence: (N,) the score of the last SideNet each sample reached (NaN in ``main`` mode, where
            none runs).
        flops: (N,) FLOPs actually spent on each sample (measured per part, see ``sidenet.flops``).
        exit_stage: (N,) int64, which SideNet answered (0 the first, ...), or the number of SideNets
            where the MainNet answered; ``None`` where only ``exited`` is known.
        answered_by_rest_count: how many samples the rest of the MainNet answered, as routing counted them
            on the host (it reads that count anyway); ``None`` where it was not counted.

    ``confidence``, ``flops`` and ``exit_stage`` may be given as functions that compute them: routing
    passes them so, and they are computed on first reading. On a GPU at serving batch sizes every kernel
    launch counts, and a server that reads only the answers launches none for this bookkeeping (a cascade's
    answers are assembled from each tap's: eagerly, five operations more per tap reached).
    """

    confidence = _ComputedWhenRead()
    flops = _ComputedWhenRead()
    exit_stage = _ComputedWhenRead()

    def __init__(
        self,
        logits: torch.Tensor,
        exited: torch.Tensor,
        confidence: Lazy,
        flops: Lazy,
        exit_stage: Lazy | None = None,
    ) -> None:
        self.logits = logits
        self.exited = exited
        self.confidence = confidence
        self.flops = flops
        self.exit_stage = exit_stage
        self.answered_by_rest_count: int | None = None

    @classmethod
    def at_tap(
        cls, logits: torch.Tensor, exited: torch.Tensor, confidence: Lazy, cost: float, part: int, num_taps: int
    ) -> AdaptiveOutput:
        """The answers of SideNet ``part`` (its ``logits``, ``exited`` and ``confidence``; past the last SideNet,
        ``part`` is ``num_taps`` and the rest of the MainNet's logits take their place) on samples that
        cost ``cost`` FLOPs each so far, in a model of ``num_taps`` SideNets: those that did not exit are
        to be completed by the rest of the model (exit stage ``num_taps`` until then). The FLOPs and exit
        stages are computed when read, by functions that hold only these tensors and numbers."""
        device = logits.device
        return cls(
            logits,
            exited,
            confidence,
            lambda: torch.full((len(exited),), cost, device=device),
            lambda: torch.where(exited, part, num_taps),
        )

    def __repr__(self) -> str:  # shapes only: reading values would wait for the device
        n, classes = self.logits.shape[0], self.logits.shape[-1]
        return f"AdaptiveOutput({n} samples, {classes} classes, {self.logits.dtype}, on {self.logits.device})"

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)

    def completed(self, rows: torch.Tensor | None, later: AdaptiveOutput, rescored: bool) -> AdaptiveOutput:
        """These answers with the samples ``rows`` (all of them where ``None``) answered by ``later``,
        what the rest of the model (later SideNets, the rest of the MainNet) gave them: their logits and
        exit stage replaced, their FLOPs added, and their score replaced where ``rescored`` (a later
        SideNet ran). A new output.

        The logits and exit flags now; the exit stages, scores and FLOPs when read (from these answers'
        and ``later``'s, which the new output holds until then: answers, never MainNet state).
        """

        def stage() -> torch.Tensor:
            return _scatter(self.exit_stage, rows, later.exit_stage)

        def confidence() -> torch.Tensor:
            return _scatter(self.confidence, rows, later.confidence)

        def flops() -> torch.Tensor:
            added = later.flops.to(self.flops.dtype)
            return self.flops + added if rows is None else self.flops.index_add(0, rows, added)

        done = AdaptiveOutput(
            _scatter(self.logits, rows, later.logits),
            _scatter(self.exited, rows, later.exited),
            confidence if rescored else self._confidence,
            flops,
            stage,
        )
        done.answered_by_rest_count = later.answered_by_rest_count
        return done

    def sliced(self, part: slice) -> AdaptiveOutput:
        """The answers of the samples ``part`` (a slice of the batch): logits and exit flags as views, the
        scores, FLOPs and exit stages sliced when read (a :class:`~sidenet.serving.PooledRouter` files the
        answers of pooled samples back into their batches so). The rest's count is not kept."""
        stage = self._exit_stage  # None stays None: not read here
        return AdaptiveOutput(
            self.logits[part],
            self.exited[part],
            lambda: self.confidence[part],
            lambda: self.flops[part],
            None if stage is None else (lambda: self.exit_stage[part]),
        )

    def answered_by_rest(self, rows: torch.Tensor | None, logits: torch.Tensor, cost: float) -> AdaptiveOutput:
        """These answers (at the last SideNet) with the samples that did not exit, ``rows`` (all of them
        where ``None``), answered by the rest of the MainNet: its ``logits``, its ``cost`` FLOPs per sample
        added. Their exit stage (the number of SideNets), exit flag and last score stay as they are. What
        :meth:`completed` gives for the rest's answers, in one operation (the scatter of the logits; the
        FLOPs are computed when read): this runs on every routed batch."""

        def flops() -> torch.Tensor:  # when the new output's FLOPs are read (these answers' then too, once)
            return torch.where(self.exited, self.flops, self.flops + cost)

        done = AdaptiveOutput(
            _scatter(self.logits, rows, logits), self.exited, self.confidence, flops, self._exit_stage
        )
        done.answered_by_rest_count = len(logits)
        return done


def _scatter(values: torch.Tensor, rows: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """``values`` with the rows ``rows`` replaced by ``new`` (all of them when ``rows`` is None), in
    the wider dtype of the two: a new tensor, the caller's stay untouched."""
    dtype = torch.promote_types(values.dtype, new.dtype)
    if rows is None:
        return new.to(dtype)
    return values.to(dtype).index_copy(0, rows, new.to(dtype))


@dataclass
class FrontPass:
    """Trunk and SideNet run on a batch (see :meth:`AdaptiveModel.front_pass`).

    Attributes:
        state: the MainNet's state at the tap, for the rest of the MainNet (rows past ``len(exited)``, where
            a compiled front padded the batch, are padding).
        side_logits: (N, C) the SideNet's logits.
        confidence: (N,) the exit policy's score.
        exited: (N,) True where the SideNet answers.
        profile: FLOPs per sample of trunk, SideNet and rest for this batch's inputs.
    """

    state: Any
    side_logits: torch.Tensor
    confidence: torch.Tensor
    exited: torch.Tensor
    profile: FlopProfile

    def answers(self, num_taps: int) -> AdaptiveOutput:
        """The batch's answers as far as the front pass goes: the first SideNet's where it exited (exit
        stage 0), its logits for now elsewhere (stage ``num_taps``, to be completed by the rest of the
        model), the FLOPs spent so far (both computed when read)."""
        # AdaptiveOutput.at_tap's functions hold what they read, never this pass: through it an answer unread
        # would keep the batch's MainNet state alive (a ResNet-50's layer1 at batch 256 in bfloat16: 411 MB),
        # for as long as the caller keeps the answer or a PooledRouter its batch waiting.
        cost = float(self.profile.trunk + self.profile.side)
        return AdaptiveOutput.at_tap(self.side_logits, self.exited, self.confidence, cost, 0, num_taps)
