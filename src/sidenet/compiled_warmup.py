"""The warm-up of :class:`~sidenet.compiled.CompiledAdaptiveModel`: its stages compiled or captured ahead of
traffic at every served batch size and row bucket, and on the CPU each compiled stage kept only where it
measures faster than eager. A mixin, so that the serving class keeps to routing."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from sidenet.compiled_stages import GRAPH_BACKENDS, bucket_for, padded_text
from sidenet.splits import select_samples

__all__ = ["StageWarmUp"]


class StageWarmUp:
    """Warm-up methods of :class:`~sidenet.compiled.CompiledAdaptiveModel` (which has the attributes and
    routing methods used here: ``model``, ``backend``, ``rest_buckets``, ``length_buckets``, ``_stages``,
    ``_kept``, ``_stage``, ``_step``, ``_at_bucket``, ``_threshold``, ``_valid_rows``, ``front_pass``,
    ``finish``)."""

    model: Any
    backend: str
    rest_buckets: tuple[int, ...] | None
    length_buckets: tuple[int, ...] | None
    _stages: dict
    _kept: dict[str, str]
    _warmup_seconds: float

    def warm_up(self, example: Any, batch_sizes: Sequence[int]) -> None:
        """Compile or capture the stages for every batch size and row bucket up to it; on the CPU,
        keep each compiled stage only where it measures faster than eager."""
        start = time.perf_counter()
        model = self.model
        n = model.split.batch_size(example)
        for size in batch_sizes:
            index = torch.arange(size, device=model.split.input_device(example)) % n
            batch = select_samples(example, index)
            # Both copies of a captured front (they alternate: see stream()), not one left for traffic.
            for _ in range(2 if self.backend in GRAPH_BACKENDS else 1):
                self.finish(self.front_pass(batch))
            states = self._tap_states(padded_text(batch, self.length_buckets))
            for rows in sorted({bucket_for(r, self.rest_buckets, size) for r in (self.rest_buckets or (size,))}):
                if rows <= size:
                    for part, state in enumerate(states, start=1):
                        first = model.splits[part - 1].select_sized(state, torch.arange(rows, device=index.device), ())
                        self._run_stage(part, first)
        if self.backend == "inductor":
            self._keep_faster(padded_text(example, self.length_buckets))
        self._warmup_seconds += time.perf_counter() - start

    @torch.no_grad()
    def _tap_states(self, x: Any) -> list[Any]:
        """The MainNet's state at each tap for the whole batch ``x`` (eager)."""
        splits = self.model.splits
        states = [splits[0].trunk(x)]
        for before, split in zip(splits, splits[1:], strict=False):
            states.append(before.advance(states[-1], split))
        return states

    @torch.no_grad()
    def _run_stage(self, part: int, state: Any) -> Any:
        """Stage ``part`` (a step to tap ``part``, or the rest after the last tap) on every row of ``state``."""
        if part == self.model.num_taps:
            return self._stage("rest", None)(state)
        stage, inputs = self._step(part, state)
        return stage(inputs)

    @torch.no_grad()  # as served: Dynamo guards on grad mode (timed with grad, each stage would recompile)
    def _keep_faster(self, x: Any) -> None:
        """On the CPU, fall back to eager for each stage whose compiled form is not faster (kept per
        stage name, so that the stages of a new exit rule are built on the backend kept)."""
        model, n = self.model, self.model.split.batch_size(x)
        # The later stages are timed at their largest row bucket: a shape they serve (with static rest
        # shapes, one already compiled).
        rows = max([b for b in self.rest_buckets or () if b <= n], default=n)
        at_bucket = self._at_bucket
        states = [at_bucket(s, rows, split) for s, split in zip(self._tap_states(x), model.splits, strict=True)]
        rule = model.policies[0]
        device = model.split.input_device(x)
        front_inputs = (x, self._valid_rows(n, n, device), self._threshold(rule, device))
        self._kept["front"] = self._stage("front", rule).keep_if_faster(front_inputs)
        for part in range(1, model.num_taps):
            stage, inputs = self._step(part, states[part - 1])
            self._kept[f"step-{part}"] = stage.keep_if_faster(inputs)
        self._kept["rest"] = self._stage("rest", None).keep_if_faster(states[-1])
        for (name, _), stage in self._stages.items():
            stage.backend = self._kept.get(name, stage.backend)
