"""Routing's own work, as calls to time apart from the MainNet's parts and the SideNets.

:func:`~sidenet.measure_part_seconds` (with ``rows``) times each of these beside the parts, for
:func:`~sidenet.forecast_batch_time`: a routed batch pays them besides its parts, and on few rows or a small
MainNet they are not small (a count read from the device, gathers and scatters, Python per call). Each
runs the calls routing makes (:class:`~sidenet.AdaptiveModel`), on tensors made once beforehand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from sidenet.monitor import TrafficMonitor
from sidenet.outputs import AdaptiveOutput

if TYPE_CHECKING:
    from sidenet.flops import FlopProfile
    from sidenet.routing import AdaptiveModel

__all__ = ["batch_step", "routing_step"]


def routing_step(model: AdaptiveModel, k: int, state: Any, profile: FlopProfile) -> tuple[Callable[[Any], Any], Any]:
    """What routing does at tap ``k`` on the rows of ``state`` besides running parts, as one call of the
    state (the calls of :meth:`~sidenet.AdaptiveModel.continue_from` and its ``_go_on``): the SideNet's scores,
    exit mask and answers, the continuing rows found and their count read (the host wait), half of the rows
    gathered, their FLOPs looked up and their answers filed back into the batch's."""
    split, rule, count = model.splits[k], model.policies[k], model.num_taps
    logits = model.side_logits(state, k)
    exited = torch.arange(len(logits), device=logits.device) % 2 == 0  # half go on (one row: it exits)
    going = len(logits) // 2  # the odd rows (read from no device)
    # The later parts' answers on the rows going on, made by their own routing steps: made once here.
    later = AdaptiveOutput.at_tap(logits[:going], exited[:going], logits[:going, 0], 0.0, k + 1, count)

    def step(state: Any) -> Any:
        confidence = rule.confidence(logits)
        answers = AdaptiveOutput.at_tap(logits, exited, confidence, 0.0, k, count)
        rule.exits(confidence)
        rows, sizes = model._continuing(split, state, exited)  # routing's own: its one host wait at the tap
        if len(rows) == 0:
            return answers
        kept = split.select_sized(state, rows, sizes)
        if k + 1 == count:  # past the last SideNet: the rest's answers filed back
            return answers.answered_by_rest(rows, later.logits, model.flop_ledger.rest(kept, None, profile, part=k))
        model.flop_ledger.step(k + 1, kept, profile)
        return answers.completed(rows, later, rescored=k + 2 < count)

    return step, state


def batch_step(model: AdaptiveModel, inputs: Any, state: Any) -> tuple[Callable[[Any], Any], Any]:
    """What routing does once per batch of ``inputs`` besides its taps, as one call of them (the calls of
    :meth:`~sidenet.AdaptiveModel.forward` and ``front_pass`` around the parts): the batch admitted (input
    checks, eval-mode check: :meth:`~sidenet.AdaptiveModel.admit`), its FLOPs profile looked up, and the batch
    counted in a monitor, a scratch one (the model's counts stay those of its traffic)."""
    rule = model.policies[0]
    confidence = rule.confidence(model.side_logits(state, 0))
    exited = torch.arange(len(confidence), device=confidence.device) % 2 == 0
    monitor = TrafficMonitor(model.monitor.window)

    def step(inputs: Any) -> None:
        model.admit(inputs)
        model.flop_profile(inputs)
        monitor.record(exited, confidence, len(exited) // 2)

    return step, inputs
