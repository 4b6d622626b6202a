"""``TrafficMonitor``: what the routed traffic looked like, for watching a deployed threshold.

It counts the samples routed and those that exited, keeps the latest confidences in a window, and
compares them with reference confidences (those of the data the threshold was chosen on) in
:meth:`TrafficMonitor.shift_check`. :class:`~sidenet.AdaptiveModel` and
:class:`~sidenet.serving.PooledRouter` record every adaptive batch into the model's monitor.

Threads sharing one model share its monitor: the counts and the window are updated under a lock.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import torch

__all__ = ["TrafficMonitor", "TrafficStatistics"]


class TrafficMonitor:
    """Exit counts, a window of recent confidences and the reference for the shift check.

    Args:
        window: how many of the latest confidences to keep for :meth:`shift_check`.

    Attributes:
        window: as above; may be changed at any time (the next batch recorded trims to it).
        reference: confidences of the data the threshold was chosen on (see :meth:`set_reference`),
            float64 on the CPU; ``None`` until set, and assigning ``None`` forgets them.
    """

    def __init__(self, window: int = 4096) -> None:
        self.window = window
        self.reference: torch.Tensor | None = None
        # Guards the counts and the window when threads share the model (see record).
        self._lock = threading.Lock()
        self.reset()

    # -- copies ----------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # A lock can be neither pickled nor deep-copied; every copy gets a fresh one.
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- recording -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Zero the counts of samples seen and exited and forget their confidences (not the reference)."""
        with self._lock:
            self.samples_seen = 0
            self._exited: torch.Tensor | int = 0  # a device tensor once a batch is recorded
            self._exited_counted = 0  # exits the caller counted on the host (see record)
            self._recent: deque[torch.Tensor] = deque()
            self._recent_count = 0

    def record(self, exited: torch.Tensor, confidence: torch.Tensor, exits: int | None = None) -> None:
        """Count a routed batch (its exit mask) and keep its confidences for :meth:`shift_check`.

        Reads no device value: the exit count is summed where the mask lives and the confidences are
        kept there (a copy, so that a caller editing its output does not edit the window); both are
        read when asked for (:attr:`samples_exited`, :attr:`recent`). On a GPU, reading them here would
        be a host wait per batch on the routed path. ``exits``, where the caller already counted them on
        the host (routing reads how many samples continue), saves the device sum: two kernels a batch.
        Inside the lock, only the read-modify-writes that threads sharing the model would otherwise
        interleave and lose.
        """
        seen = len(exited)
        summed = exited.sum() if exits is None else None
        scores = confidence.detach().clone()
        with self._lock:
            self.samples_seen += seen
            if summed is not None:
                self._add_exits(summed)
            else:
                self._exited_counted += exits
            self._recent.append(scores)
            self._recent_count += len(scores)
            # Drop whole old batches once the rest still fills the window.
            while self._recent and self._recent_count - len(self._recent[0]) >= self.window:
                self._recent_count -= len(self._recent.popleft())

    def count_exits(self, exited: torch.Tensor) -> None:
        """Add the exits of samples already counted by :meth:`record` that exited later (at a later
        SideNet of a cascade, answered by a :class:`~sidenet.serving.PooledRouter`); reads no device value."""
        with self._lock:
            self._add_exits(exited.sum())

    def _add_exits(self, exits: torch.Tensor) -> None:
        """Add a device count of exits to the running total, where it lives (hold the lock)."""
        total = self._exited
        if isinstance(total, torch.Tensor) and total.device != exits.device:
            total = total.to(exits.device)  # the model moved: one copy, then on the new device
        self._exited = total + exits

    # -- reading ---------------------------------------------------------------------------------
    @property
    def samples_exited(self) -> int:
        """Of :attr:`samples_seen`, those that exited (read from the device on asking)."""
        with self._lock:
            total, counted = self._exited, self._exited_counted
        return int(total) + counted

    @property
    def exit_rate(self) -> float:
        """Fraction of the samples recorded since :meth:`reset` that exited (NaN before any)."""
        with self._lock:  # a consistent pair of counts
            seen, exited, counted = self.samples_seen, self._exited, self._exited_counted
        return (int(exited) + counted) / seen if seen else float("nan")

    @property
    def recent(self) -> torch.Tensor:
        """The latest (at most ``window``) confidences recorded, float64 on the CPU."""
        with self._lock:  # another thread may be appending to the window
            recent = list(self._recent)
        if not recent:
            return torch.empty(0, dtype=torch.float64)
        kept = [scores.to("cpu", torch.float64) for scores in recent]
        return torch.cat(kept)[-self.window :]

    def set_reference(self, confidence: Any) -> None:
        """Remember the SideNet confidences (under the deployed exit rule) of the data the threshold was
        chosen on, e.g. ``curve.record.confidence``; :meth:`shift_check` compares new traffic with them."""
        reference = torch.as_tensor(confidence, dtype=torch.float64).flatten().cpu()
        if reference.numel() == 0 or not torch.isfinite(reference).all():
            raise ValueError("the reference confidences must be a non-empty array of finite numbers")
        self.reference = reference

    def shift_check(self, threshold: float, alpha: float = 0.01, min_samples: int = 100) -> Any:
        """Compare the recent confidences with the reference (two-sample Kolmogorov-Smirnov) around
        ``threshold``; returns a :class:`sidenet.shift.ShiftReport` (see :func:`sidenet.shift.confidence_shift`).
        Needs :meth:`set_reference` first."""
        # Imported here: the shift test (scipy) is analysis, above the core that routes.
        from sidenet.shift import confidence_shift

        if self.reference is None:
            raise ValueError("no reference confidences: call set_reference(curve.record.confidence) first")
        return confidence_shift(self.reference.numpy(), self.recent.numpy(), threshold, alpha, min_samples)


class TrafficStatistics:
    """The traffic statistics of a routed model, kept by its ``monitor`` (a :class:`TrafficMonitor`):
    the :class:`~sidenet.AdaptiveModel` methods and properties that hand over to it. The shift check
    compares the first SideNet's scores, the ones every sample gets, at its threshold."""

    monitor: TrafficMonitor
    policies: tuple[Any, ...]

    @property
    def samples_seen(self) -> int:
        """Samples routed in adaptive mode (here and by a :class:`~sidenet.serving.PooledRouter`)."""
        return self.monitor.samples_seen

    @property
    def samples_exited(self) -> int:
        """Of :attr:`samples_seen`, those that exited at the SideNet."""
        return self.monitor.samples_exited

    @property
    def observed_exit_rate(self) -> float:
        """Fraction of the samples seen in adaptive mode since :meth:`reset_stats` that exited."""
        return self.monitor.exit_rate

    @property
    def stats_window(self) -> int:
        """How many of the latest confidences :attr:`recent_confidence` keeps."""
        return self.monitor.window

    @stats_window.setter
    def stats_window(self, value: int) -> None:
        self.monitor.window = value

    @property
    def recent_confidence(self) -> torch.Tensor:
        """The latest (at most ``stats_window``) confidences seen in adaptive mode."""
        return self.monitor.recent

    @property
    def reference_confidence(self) -> torch.Tensor | None:
        """Confidences of the data the threshold was chosen on (see :meth:`set_reference`); saved with
        the SideNet. Assign ``None`` to forget them."""
        return self.monitor.reference

    @reference_confidence.setter
    def reference_confidence(self, value: Any) -> None:
        if value is None:
            self.monitor.reference = None
        else:
            self.monitor.set_reference(value)

    def reset_stats(self) -> None:
        """Zero the counts of samples seen and exited in adaptive mode and forget their confidences."""
        self.monitor.reset()

    def set_reference(self, confidence: Any) -> None:
        """Remember the SideNet confidences (under this policy) of the data the threshold was chosen on,
        e.g. ``curve.record.confidence``; :meth:`shift_check` compares new traffic with them."""
        self.monitor.set_reference(confidence)

    def shift_check(self, alpha: float = 0.01, min_samples: int = 100) -> Any:
        """Compare the confidences of recent traffic with the reference (two-sample Kolmogorov-Smirnov).

        Returns a :class:`sidenet.shift.ShiftReport`; ``report.shifted`` is True when the p-value is
        below ``alpha``: the threshold's promises, made on the reference data, may not hold on this
        traffic. Needs :meth:`set_reference` first.
        """
        return self.monitor.shift_check(self.policies[0].threshold, alpha, min_samples)
