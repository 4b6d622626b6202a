"""``AdaptiveModel``: MainNet trunk, SideNet, exit policy, and the rest of the MainNet run only on
the samples that did not exit.

Routing is this module's one job; the FLOPs bookkeeping lives in :class:`~sidenet.flops.FlopLedger`,
the traffic statistics in :class:`~sidenet.monitor.TrafficMonitor`, training in :mod:`sidenet.training`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import nn

from sidenet.config import SideNetConfig, config_for_parts
from sidenet.errors import ClassCountMismatchError
from sidenet.flops import FlopLedger, FlopProfile
from sidenet.head import SideNet
from sidenet.monitor import TrafficMonitor
from sidenet.outputs import AdaptiveOutput, FrontPass
from sidenet.policy import ExitPolicy
from sidenet.splits import MainNetSplit

__all__ = ["AdaptiveModel", "AdaptiveOutput", "FrontPass", "Mode", "continuing_first"]

Mode = Literal["adaptive", "main", "side", "batch"]
MODES = ("adaptive", "main", "side", "batch")


class _FromConfig(enum.Enum):
    """The default of AdaptiveModel's exit-rule arguments: the config's value. Not None, which stays
    a bad threshold (a caller's unset variable) rather than a silent default."""

    FROM_CONFIG = "the config's"


FROM_CONFIG = _FromConfig.FROM_CONFIG


def continuing_first(split: MainNetSplit, state: Any, exited: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """On the device, reading nothing: the batch's indices with the continuing samples first (in
    ascending order, by a stable sort of the exit mask) and a 1-D integer tensor of their count followed
    by the sizes :meth:`MainNetSplit.select_sized` needs for them (:meth:`MainNetSplit.selection_sizes`).
    Reading that tensor is the one host wait of a routed batch."""
    order = torch.argsort(exited.to(torch.uint8), stable=True)
    keep = ~exited
    counts = keep.sum().reshape(1)
    extra = split.selection_sizes(state, keep)
    if extra is not None:
        counts = torch.cat([counts, extra.reshape(-1).to(counts.dtype)])
    return order, counts


class AdaptiveModel(nn.Module):
    """A MainNet with a SideNet attached at a tap, answering early for confident samples.

    Args:
        split: the MainNet cut at the tap (see :func:`sidenet.split_mainnet`).
        sidenet: the classifier reading the tap features.
        threshold: exit when the SideNet's confidence is at least this (0..1, or :data:`sidenet.NEVER_EXIT`).
        temperature: divides the SideNet's logits before the softmax of the exit rule.
        policy: the exit rule's score, ``max_softmax`` (the paper's), ``entropy`` or ``margin``.
        check_inputs: validate every batch: its structure (type, shape, emptiness, device, dtype) and,
            where :attr:`check_values` says, its values (NaN/inf; token ids, masks).
        check_values: read the input's values in those checks: ``None`` (default) only for inputs on
            the CPU, where reading them costs no host wait; ``True`` everywhere (on a GPU, one more host
            wait per batch); ``False`` never.
        stats_window: how many of the latest adaptive-mode confidences to keep for :meth:`shift_check`.
        config: the settings the model was attached or loaded with (see :attr:`config`); threshold,
            temperature and policy default to its exit rule (``FROM_CONFIG``), or without one to
            0.9, 1.0 and ``max_softmax``. ``None``: the rest is read from ``split`` and ``sidenet``.

    The MainNet is frozen: its parameters stop requiring gradients (as peft freezes its base model),
    it runs in eval mode and without autograd even after a user's ``mainnet.train()``; call :meth:`fit`
    to train the SideNet. One model may serve several threads: the traffic statistics are locked.

    Parts: the exit rule (:attr:`policy`, a frozen :class:`ExitPolicy`), the FLOPs bookkeeping
    (:attr:`flop_ledger`, a :class:`~sidenet.flops.FlopLedger`) and the traffic statistics
    (:attr:`monitor`, a :class:`~sidenet.monitor.TrafficMonitor`); the model's own methods of the
    same names hand over to them.
    """

    def __init__(
        self,
        split: MainNetSplit,
        sidenet: SideNet,
        threshold: float | _FromConfig = FROM_CONFIG,
        temperature: float | _FromConfig = FROM_CONFIG,
        policy: str | _FromConfig = FROM_CONFIG,
        check_inputs: bool = True,
        check_values: bool | None = None,
        stats_window: int = 4096,
        config: SideNetConfig | None = None,
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
        # The settings fixed at attach or load. Its exit-rule fields only seed the rule: from then on
        # the rule (self.policy) is their one truth, and :attr:`config` reads them from it.
        self._config = config_for_parts(split, sidenet, config)
        given = {"threshold": threshold, "temperature": temperature, "kind": policy}
        chosen = {name: value for name, value in given.items() if value is not FROM_CONFIG}
        self.policy = replace(self._config.exit_rule(), **chosen)
        self.check_inputs = check_inputs
        self.check_values = check_values
        self.flop_ledger = FlopLedger(split, sidenet)
        self.monitor = TrafficMonitor(stats_window)
        self.history_: list[dict[str, float]] = []

    # -- settings -------------------------------------------------------------------------------
    @property
    def config(self) -> SideNetConfig:
        """The model's :class:`SideNetConfig`, as :func:`sidenet.save_sidenet` writes it (less the
        checksums and fingerprint, computed on saving): the settings it was attached or loaded with and
        the live exit rule. A new frozen object on every read; change the rule through the setters."""
        return self._config.with_exit_rule(self.policy)

    @property
    def policy(self) -> ExitPolicy:
        """The exit rule, frozen; assign a new one (or use the setters below) to change it."""
        return self._policy

    @policy.setter
    def policy(self, rule: ExitPolicy) -> None:
        if not isinstance(rule, ExitPolicy):
            raise ValueError(f"the exit policy must be a sidenet.ExitPolicy, got {type(rule).__name__}")
        self._policy = rule

    # The setters install a new rule, not an edit of the old one: callers may hold the old one to
    # restore it, and a thread routing a batch keeps the rule it started with.
    @property
    def threshold(self) -> float:
        return self.policy.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.policy = replace(self.policy, threshold=value)

    @property
    def temperature(self) -> float:
        return self.policy.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.policy = replace(self.policy, temperature=value)

    @property
    def policy_kind(self) -> str:
        """Name of the exit rule (``max_softmax``, ``entropy`` or ``margin``)."""
        return self.policy.kind

    @policy_kind.setter
    def policy_kind(self, value: str) -> None:
        self.policy = replace(self.policy, kind=value)

    @property
    def tap(self) -> str | int:
        return self.split.tap

    def train(self, mode: bool = True) -> AdaptiveModel:
        """Only the SideNet ever trains: the MainNet (and its batch-norm statistics) stays frozen."""
        super().train(mode)
        self.split.eval()
        return self

    # -- traffic statistics (kept by self.monitor) -----------------------------------------------
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
        return self.monitor.shift_check(self.threshold, alpha, min_samples)

    # -- FLOPs (kept by self.flop_ledger) --------------------------------------------------------
    def count_flops_with(self, mainnet: nn.Module | None) -> AdaptiveModel:
        """Count FLOPs on ``mainnet``, a float model of the same architecture and shapes, instead of the
        MainNet itself; ``None`` goes back to the MainNet. For quantised MainNets: FlopCounterMode counts
        no int8 kernel (``quantize_dynamic``'s linear layers), so their work is reported as the
        FLOP-equivalents of the float twin. Returns self."""
        self.flop_ledger.count_with(mainnet)
        return self

    def flop_profile(self, x: Any) -> FlopProfile:
        """FLOPs per sample of trunk, SideNet and rest for inputs like ``x`` (measured once per shape;
        for text, once per padded length)."""
        return self.flop_ledger.profile(x)

    def rest_flops(self, state: Any, index: torch.Tensor | None, profile: FlopProfile, selected: Any = None) -> float:
        """FLOPs per sample of the rest run on ``select(state, index)`` (see :meth:`FlopLedger.rest`)."""
        return self.flop_ledger.rest(state, index, profile, selected)

    # -- compute ---------------------------------------------------------------------------------
    def forward(self, x: Any, mode: Mode = "adaptive") -> AdaptiveOutput:
        """Classify a batch.

        ``mode="main"`` runs the MainNet alone (as before attaching), ``"side"`` lets the SideNet
        answer every sample, ``"adaptive"`` routes each sample by the exit policy (and counts it in
        :attr:`monitor`). ``"batch"`` is the batch-level exit of other toolkits, for comparison: the
        SideNet answers only when every sample of the batch is confident, otherwise the MainNet
        answers them all.

        The MainNet runs in eval mode and under ``torch.no_grad()``: gradients reach only the SideNet.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "main":
            return self._mainnet_alone(x)
        front = self.front_pass(x, mode)
        if mode == "adaptive":
            self.monitor.record(front.exited, front.confidence)
        state, side_logits, exited, n = front.state, front.side_logits, front.exited, len(front.exited)
        remaining, sizes = self.continuing(front)
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
                selected = self.split.select_sized(state, remaining, sizes)
                rest_logits = self.split.rest(selected)
            # Charged on the selected state (its own size), which reads no device value.
            rest_cost = self.rest_flops(selected, None, front.profile)
            dtype = torch.promote_types(side_logits.dtype, rest_logits.dtype)
            logits = side_logits.to(dtype).index_copy(0, remaining, rest_logits.to(dtype))
        return AdaptiveOutput(logits, exited, front.confidence, front.flops_with_rest(rest_cost))

    def continuing(self, front: FrontPass) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The samples of a front pass that continue to the rest of the MainNet: their indices in the
        batch (ascending) and the sizes :meth:`MainNetSplit.select_sized` needs (text: the kept length).

        The routed path's one host wait: the count of continuing samples (and those sizes) is read
        from the device in one transfer. The indices come from a stable sort of the exit mask queued
        before that read, so that finding them reads nothing more (``nonzero`` would be a second wait).
        """
        order, counts = continuing_first(self.split, front.state, front.exited)
        read = counts.tolist()  # the one host wait of a routed batch
        return order[: read[0]], tuple(read[1:])

    def check_input(self, x: Any) -> None:
        """The input checks of :attr:`check_inputs` and :attr:`check_values` (see the class docstring)."""
        if not self.check_inputs:
            return
        values = self.check_values
        if values is None:
            values = self.split.input_device(x).type == "cpu"
        if values:
            self.split.validate_input(x)
        else:
            self.split.check_structure(x)

    def _mainnet_alone(self, x: Any) -> AdaptiveOutput:
        """``mode="main"``: the MainNet as before attaching; no SideNet, no confidence (NaN)."""
        self.check_input(x)
        self.split.ensure_eval()
        profile = self.flop_profile(x)
        with torch.no_grad():
            logits = self.split.rest(self.split.trunk(x))
        n = self.split.batch_size(x)
        flops = torch.full((n,), float(profile.mainnet), device=logits.device)
        nan = torch.full((n,), float("nan"), device=logits.device)
        return AdaptiveOutput(logits, torch.zeros(n, dtype=torch.bool, device=logits.device), nan, flops)

    def side_logits(self, state: Any) -> torch.Tensor:
        """The SideNet's logits on a tap state. The features are taken without autograd (no graph
        through the MainNet, even for inputs that require grad); the SideNet keeps its own graph."""
        with torch.no_grad():
            features = self.split.features(state)
        return self.sidenet(features)

    def front_pass(self, x: Any, mode: Mode = "adaptive") -> FrontPass:
        """Trunk, SideNet and exit decision for a batch, without the rest of the MainNet.

        ``mode`` is ``"adaptive"`` (per-sample exits), ``"side"`` (everyone exits) or ``"batch"`` (all
        exit or none). No side effects: the callers that route traffic (:meth:`forward`,
        :class:`sidenet.serving.PooledRouter`, which runs the rest later on continuing samples pooled
        from several batches) record it in :attr:`monitor` themselves.
        """
        if mode not in ("adaptive", "side", "batch"):
            raise ValueError(f"front_pass mode must be 'adaptive', 'side' or 'batch', got {mode!r}")
        self.check_input(x)
        self.split.ensure_eval()
        rule = self.policy  # read once: another thread may install a new rule meanwhile
        profile = self.flop_profile(x)
        with torch.no_grad():
            state = self.split.trunk(x)
        side_logits = self.side_logits(state)
        confidence = rule.confidence(side_logits)
        if mode == "side":
            exited = torch.ones(len(side_logits), dtype=torch.bool, device=side_logits.device)
        else:
            exited = rule.exits(confidence)
            if mode == "batch" and not bool(exited.all()):
                exited = torch.zeros_like(exited)
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
