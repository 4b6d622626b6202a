"""``AdaptiveModel``: MainNet trunk, SideNet, exit policy, and the rest of the MainNet run only on
the samples that did not exit."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from sidenet.flops import FlopProfile, count_flops, profile_flops
from sidenet.head import SideNet
from sidenet.policy import ExitPolicy
from sidenet.splits import MainNetSplit, split_mainnet

__all__ = ["AdaptiveModel", "AdaptiveOutput", "FrontPass", "Mode", "ClassCountMismatchError"]

Mode = Literal["adaptive", "main", "side", "batch"]
MODES = ("adaptive", "main", "side", "batch")


class ClassCountMismatchError(ValueError):
    """The SideNet and the MainNet predict different numbers of classes."""


@dataclass
class AdaptiveOutput:
    """What the adaptive model returns for a batch.

    Attributes:
        logits: (N, C) the SideNet's logits for samples that exited, the MainNet's for the others.
        exited: (N,) True where the SideNet answered.
        confidence: (N,) the SideNet's confidence (NaN in ``main`` mode, where it is not run).
        flops: (N,) FLOPs actually spent on each sample (measured per part, see ``sidenet.flops``).
    """

    logits: torch.Tensor
    exited: torch.Tensor
    confidence: torch.Tensor
    flops: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)


@dataclass
class FrontPass:
    """Trunk and SideNet run on a batch (see :meth:`AdaptiveModel.front_pass`).

    Attributes:
        state: the MainNet's state at the tap, for the rest of the MainNet.
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

    def front_flops(self) -> torch.Tensor:
        """(N,) FLOPs spent on each sample so far: trunk and SideNet."""
        cost = float(self.profile.trunk + self.profile.side)
        return torch.full((len(self.exited),), cost, device=self.side_logits.device)


def _eval_if_training(module: nn.Module) -> nn.Module:
    """``module``, put back in eval mode if any part of it is training (a scan of the modules' flags:
    cheap beside a forward pass, and it catches ``mainnet.layer1.train()`` as well)."""
    if any(part.training for part in module.modules()):
        module.eval()
    return module


class AdaptiveModel(nn.Module):
    """A MainNet with a SideNet attached at a tap, answering early for confident samples.

    Args:
        split: the MainNet cut at the tap (see :func:`sidenet.split_mainnet`).
        sidenet: the classifier reading the tap features.
        threshold: exit when the SideNet's max softmax probability is at least this (0..1, or
            :data:`sidenet.NEVER_EXIT`).
        temperature: divides the SideNet's logits before the softmax of the exit rule.
        policy: the exit rule's score, ``max_softmax`` (the paper's), ``entropy`` or ``margin``.
        check_inputs: validate every batch (shape, emptiness, NaN/inf); costs one pass over the input.
        stats_window: how many of the latest adaptive-mode confidences to keep for :meth:`shift_check`.

    The MainNet is frozen: its parameters stop requiring gradients (as peft freezes its base model),
    it runs in eval mode and without autograd even after a user's ``mainnet.train()``; call :meth:`fit`
    to train the SideNet. One model may serve several threads: the running statistics are locked.
    """

    def __init__(
        self,
        split: MainNetSplit,
        sidenet: SideNet,
        threshold: float = 0.9,
        temperature: float = 1.0,
        policy: str = "max_softmax",
        check_inputs: bool = True,
        stats_window: int = 4096,
    ) -> None:
        super().__init__()
        if split.num_classes is not None and split.num_classes != sidenet.num_classes:
            raise ClassCountMismatchError(
                f"the SideNet predicts {sidenet.num_classes} classes but the MainNet predicts {split.num_classes}"
            )
        self.split = split.eval()
        # Frozen like peft's base model: no MainNet gradient is ever wanted, so optimisers and
        # parameter counts see only the SideNet.
        self.split.requires_grad_(False)
        self.sidenet = sidenet
        self.policy = ExitPolicy(threshold, temperature, policy)
        self.check_inputs = check_inputs
        # A float twin of the MainNet for counting FLOPs (see count_flops_with); None: the MainNet itself.
        self.flops_split: MainNetSplit | None = None
        self.stats_window = stats_window
        # Confidences of the data the threshold was chosen on (see set_reference); None until set.
        self.reference_confidence: torch.Tensor | None = None
        self._flop_profiles: dict[tuple, FlopProfile] = {}
        self._rest_flops: dict[tuple, int] = {}
        self.history_: list[dict[str, float]] = []
        # Guards the running statistics below when threads share the model (see _record).
        self._stats_lock = threading.Lock()
        self.reset_stats()

    # -- settings -------------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return self.policy.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        # A new policy, not an edit of the old one: callers may hold the old one to restore it.
        self.policy = replace(self.policy, threshold=value)

    @property
    def temperature(self) -> float:
        return self.policy.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        # A new policy, not an edit of the old one: callers may hold the old one to restore it.
        self.policy = replace(self.policy, temperature=value)

    @property
    def policy_kind(self) -> str:
        """Name of the exit rule (``max_softmax``, ``entropy`` or ``margin``)."""
        return self.policy.kind

    @policy_kind.setter
    def policy_kind(self, value: str) -> None:
        # A new policy, not an edit of the old one: callers may hold the old one to restore it.
        self.policy = replace(self.policy, kind=value)

    @property
    def tap(self) -> str | int:
        return self.split.tap

    def train(self, mode: bool = True) -> AdaptiveModel:
        """Only the SideNet ever trains: the MainNet (and its batch-norm statistics) stays frozen."""
        super().train(mode)
        self.split.eval()
        return self

    def _keep_mainnet_in_eval(self) -> None:
        """Undo a ``train()`` called on the MainNet or one of its parts since: in train mode its
        batch norms would update their statistics and its dropout would change the answers."""
        _eval_if_training(self.split)

    # -- copies ----------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # A lock can be neither pickled nor deep-copied; every copy gets a fresh one.
        state = dict(super().__getstate__())
        state.pop("_stats_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._stats_lock = threading.Lock()

    # -- running statistics ----------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero the counts of samples seen and exited in adaptive mode and forget their confidences."""
        with self._stats_lock:
            self.samples_seen = 0
            self.samples_exited = 0
            self._recent: deque[torch.Tensor] = deque()
            self._recent_count = 0

    def set_reference(self, confidence: Any) -> None:
        """Remember the SideNet confidences (under this policy) of the data the threshold was chosen on,
        e.g. ``curve.record.confidence``; :meth:`shift_check` compares new traffic with them."""
        reference = torch.as_tensor(confidence, dtype=torch.float64).flatten().cpu()
        if reference.numel() == 0 or not torch.isfinite(reference).all():
            raise ValueError("the reference confidences must be a non-empty array of finite numbers")
        self.reference_confidence = reference

    @property
    def recent_confidence(self) -> torch.Tensor:
        """The latest (at most ``stats_window``) confidences seen in adaptive mode."""
        with self._stats_lock:  # another thread may be appending to the window
            recent = list(self._recent)
        if not recent:
            return torch.empty(0, dtype=torch.float64)
        return torch.cat(recent)[-self.stats_window :]

    def _record(self, exited: torch.Tensor, confidence: torch.Tensor) -> None:
        """Count an adaptive-mode batch and keep its confidences for :meth:`shift_check`.

        The device work (the sum, the copy to the CPU) happens outside the lock; inside it, only the
        read-modify-writes that threads sharing the model would otherwise interleave and lose.
        """
        seen, exits = len(exited), int(exited.sum())
        scores = confidence.detach().to("cpu", torch.float64)
        with self._stats_lock:
            self.samples_seen += seen
            self.samples_exited += exits
            self._recent.append(scores)
            self._recent_count += len(scores)
            # Drop whole old batches once the rest still fills the window.
            while self._recent and self._recent_count - len(self._recent[0]) >= self.stats_window:
                self._recent_count -= len(self._recent.popleft())

    def shift_check(self, alpha: float = 0.01, min_samples: int = 100) -> Any:
        """Compare the confidences of recent traffic with the reference (two-sample Kolmogorov-Smirnov).

        Returns a :class:`sidenet.shift.ShiftReport`; ``report.shifted`` is True when the p-value is
        below ``alpha``: the threshold's promises, made on the reference data, may not hold on this
        traffic. Needs :meth:`set_reference` first.
        """
        from sidenet.shift import confidence_shift

        if self.reference_confidence is None:
            raise ValueError("no reference confidences: call set_reference(curve.record.confidence) first")
        return confidence_shift(
            self.reference_confidence.numpy(), self.recent_confidence.numpy(), self.threshold, alpha, min_samples
        )

    @property
    def observed_exit_rate(self) -> float:
        """Fraction of the samples seen in adaptive mode since :meth:`reset_stats` that exited."""
        with self._stats_lock:  # a consistent pair of counts
            seen, exited = self.samples_seen, self.samples_exited
        return exited / seen if seen else float("nan")

    # -- compute ---------------------------------------------------------------------------------
    def count_flops_with(self, mainnet: nn.Module | None) -> AdaptiveModel:
        """Count FLOPs on ``mainnet``, a float model of the same architecture and shapes, instead of the
        MainNet itself; ``None`` goes back to the MainNet. For quantised MainNets: FlopCounterMode counts
        no int8 kernel (``quantize_dynamic``'s linear layers), so their work is reported as the
        FLOP-equivalents of the float twin. Returns self."""
        self.flops_split = None if mainnet is None else split_mainnet(mainnet, self.tap, **self.split.options()).eval()
        self._flop_profiles.clear()
        self._rest_flops.clear()
        return self

    def flop_profile(self, x: Any) -> FlopProfile:
        """FLOPs per sample of trunk, SideNet and rest for inputs like ``x`` (measured once per shape;
        for text, once per padded length)."""
        key = self.split.flop_key(x)
        if key not in self._flop_profiles:
            counted = _eval_if_training(self.flops_split or self.split)  # counting must not train it
            self._flop_profiles[key] = profile_flops(counted, self.sidenet, self.split.example(x))
        return self._flop_profiles[key]

    def rest_flops(self, state: Any, index: torch.Tensor | None, profile: FlopProfile, selected: Any = None) -> float:
        """FLOPs per sample of the rest run on ``select(state, index)`` (on ``state`` when ``index`` is None).

        ``profile.rest`` unless the split says the rest's cost depends on the samples kept (text: the
        rest runs at the longest remaining length); then it is measured once per
        :meth:`MainNetSplit.rest_flop_key` and cached. ``selected``, when the caller has it, spares a
        second ``select`` for the measurement.
        """
        key = self.split.rest_flop_key(state, index)
        if key is None:
            return float(profile.rest)
        if key not in self._rest_flops:
            part = state if index is None else (selected if selected is not None else self.split.select(state, index))
            counted = _eval_if_training(self.flops_split or self.split)
            self._rest_flops[key] = count_flops(counted.rest, self.split.example_state(part))[0]
        return float(self._rest_flops[key])

    def forward(self, x: Any, mode: Mode = "adaptive") -> AdaptiveOutput:
        """Classify a batch.

        ``mode="main"`` runs the MainNet alone (as before attaching), ``"side"`` lets the SideNet
        answer every sample, ``"adaptive"`` routes each sample by the exit policy. ``"batch"`` is the
        batch-level exit of other toolkits, for comparison: the SideNet answers only when every sample
        of the batch is confident, otherwise the MainNet answers them all.

        The MainNet runs in eval mode and under ``torch.no_grad()``: gradients reach only the SideNet.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "main":
            if self.check_inputs:
                self.split.validate_input(x)
            self._keep_mainnet_in_eval()
            profile = self.flop_profile(x)
            with torch.no_grad():
                logits = self.split.rest(self.split.trunk(x))
            n = self.split.batch_size(x)
            flops = torch.full((n,), float(profile.mainnet), device=logits.device)
            nan = torch.full((n,), float("nan"), device=logits.device)
            return AdaptiveOutput(logits, torch.zeros(n, dtype=torch.bool, device=logits.device), nan, flops)

        front = self.front_pass(x, mode)
        state, side_logits, exited, n = front.state, front.side_logits, front.exited, len(front.exited)
        remaining = (~exited).nonzero().squeeze(1)
        # Skip the gather when nobody or everybody continues: at zero exits the routed model must
        # cost what the MainNet costs (plus the SideNet), not an extra copy of the state.
        rest_cost = 0.0
        if len(remaining) == 0:
            logits = side_logits
        elif len(remaining) == n:
            with torch.no_grad():
                logits = self.split.rest(state)
            rest_cost = self.rest_flops(state, None, front.profile)
        else:
            with torch.no_grad():
                selected = self.split.select(state, remaining)
                rest_logits = self.split.rest(selected)
            rest_cost = self.rest_flops(state, remaining, front.profile, selected)
            dtype = torch.promote_types(side_logits.dtype, rest_logits.dtype)
            logits = side_logits.to(dtype).index_copy(0, remaining, rest_logits.to(dtype))
        flops = front.front_flops()
        flops += (~exited).to(flops.dtype) * rest_cost
        return AdaptiveOutput(logits, exited, front.confidence, flops)

    def front_pass(self, x: Any, mode: Mode = "adaptive") -> FrontPass:
        """Trunk, SideNet and exit decision for a batch, without the rest of the MainNet.

        ``mode`` is ``"adaptive"`` (per-sample exits; counted in :attr:`observed_exit_rate` and the
        shift-check window), ``"side"`` (everyone exits) or ``"batch"`` (all exit or none). Used by
        :meth:`forward` and by :class:`sidenet.serving.PooledRouter`, which runs the rest later, on
        continuing samples pooled from several batches.
        """
        if mode not in ("adaptive", "side", "batch"):
            raise ValueError(f"front_pass mode must be 'adaptive', 'side' or 'batch', got {mode!r}")
        if self.check_inputs:
            self.split.validate_input(x)
        self._keep_mainnet_in_eval()
        profile = self.flop_profile(x)
        # No graph through the MainNet, even for inputs that require grad; the SideNet keeps its own.
        with torch.no_grad():
            state = self.split.trunk(x)
            features = self.split.features(state)
        side_logits = self.sidenet(features)
        confidence = self.policy.confidence(side_logits)
        if mode == "side":
            exited = torch.ones(len(side_logits), dtype=torch.bool, device=side_logits.device)
        else:
            exited = self.policy.exits(confidence)
            if mode == "batch" and not bool(exited.all()):
                exited = torch.zeros_like(exited)
        if mode == "adaptive":
            self._record(exited, confidence)
        return FrontPass(state, side_logits, confidence, exited, profile)

    @torch.no_grad()
    def predict(self, x: Any) -> torch.Tensor:
        """Predicted class per sample (adaptive routing, eval mode)."""
        self.eval()
        return self.forward(x).predictions

    def fit(self, loader: Iterable, **options: Any) -> AdaptiveModel:
        """Train the SideNet only; options go to :func:`sidenet.training.fit_sidenet`. Returns self."""
        from sidenet.training import fit_sidenet

        self.history_ = fit_sidenet(self, loader, **options)
        return self
