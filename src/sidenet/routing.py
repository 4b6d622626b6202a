"""``AdaptiveModel``: MainNet trunk, SideNet, exit policy, and the rest of the MainNet run only on
the samples that did not exit.

Long because :class:`AdaptiveModel` is the library's one model class: its settings (the taps, one exit
rule per SideNet, sub-cascades), the hand-overs to its FLOPs ledger and the routing of one SideNet or a
cascade through the same recursion belong together. Routing is this module's one job; the FLOPs
bookkeeping lives in :class:`~sidenet.flops.FlopLedger`, the traffic statistics in
:class:`~sidenet.monitor.TrafficMonitor` (the model's hand-overs to it in
:class:`~sidenet.monitor.TrafficStatistics`), training in :mod:`sidenet.training`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import nn

from sidenet.config import SideNetConfig, config_for_parts
from sidenet.errors import ClassCountMismatchError
from sidenet.flops import FlopLedger, FlopProfile
from sidenet.head import SideNet
from sidenet.monitor import TrafficMonitor, TrafficStatistics
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


def _stages(value: Any, kind: type, name: str) -> tuple:
    """``value`` as a tuple of one or more ``kind`` (one object, or a list or tuple of them)."""
    items = tuple(value) if isinstance(value, (list, tuple, nn.ModuleList)) else (value,)
    if not items or any(not isinstance(item, kind) for item in items):
        got = ", ".join(type(item).__name__ for item in items) or "nothing"
        raise ValueError(f"{name} must be a {kind.__name__} or a list of them (one per tap), got {got}")
    return items


def _stage_value(value: Any, k: int, count: int, name: str) -> Any:
    """The ``k``-th SideNet's value of a setting given as one value for all or a sequence of ``count``."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} needs one value per SideNet ({count}), got {len(value)}: {value!r}")
        return value[k]
    return value


class AdaptiveModel(TrafficStatistics, nn.Module):
    """A MainNet with a SideNet attached at a tap (or a cascade of SideNets at several taps), answering
    early for confident samples.

    Args:
        split: the MainNet cut at the tap (see :func:`sidenet.split_mainnet`); for a cascade, a list of
            splits of one MainNet, each tap deeper than the one before (see :meth:`MainNetSplit.check_follows`).
        sidenet: the classifier reading the tap features; for a cascade, one per split.
        threshold: exit when the SideNet's confidence is at least this (0..1, or :data:`sidenet.NEVER_EXIT`);
            for a cascade one value for all SideNets or one per SideNet (so too ``temperature``, ``policy``).
        temperature: divides the SideNet's logits before the softmax of the exit rule.
        policy: the exit rule's score, ``max_softmax`` (the paper's), ``entropy`` or ``margin``.
        check_inputs: validate every batch: its structure (type, shape, emptiness, device, dtype) and,
            where :attr:`check_values` says, its values (NaN/inf; token ids, masks).
        check_values: read the input's values in those checks: ``None`` (default) only for inputs on
            the CPU, where reading them costs no host wait; ``True`` everywhere (on a GPU, one more host
            wait per batch); ``False`` never.
        stats_window: how many of the latest adaptive-mode confidences to keep for :meth:`shift_check`.
        config: the settings the model was attached or loaded with (see :attr:`config`; a cascade: one
            per SideNet, :attr:`configs`); threshold, temperature and policy default to its exit rule
            (``FROM_CONFIG``), or without one to 0.9, 1.0 and ``max_softmax``. ``None``: the rest is read
            from ``split`` and ``sidenet``.

    The MainNet is frozen: its parameters stop requiring gradients (as peft freezes its base model),
    it runs in eval mode and without autograd even after a user's ``mainnet.train()``; call :meth:`fit`
    to train the SideNet. One model may serve several threads: the traffic statistics are locked.

    One SideNet is the cascade of length one: :attr:`splits`, :attr:`sidenets` and :attr:`policies` hold
    one item, and routing runs the same loop (:meth:`finish`). The one-SideNet settings
    (:attr:`threshold`, :attr:`temperature`, :attr:`policy_kind`) refuse on a longer cascade; use
    :attr:`thresholds` and :attr:`policies` there.

    Parts: the exit rules (:attr:`policies`, frozen :class:`ExitPolicy` objects), the FLOPs bookkeeping
    (:attr:`flop_ledger`, a :class:`~sidenet.flops.FlopLedger`) and the traffic statistics
    (:attr:`monitor`, a :class:`~sidenet.monitor.TrafficMonitor`); the model's own methods of the
    same names hand over to them.
    """

    def __init__(
        self,
        split: MainNetSplit | Sequence[MainNetSplit],
        sidenet: SideNet | Sequence[SideNet],
        threshold: float | Sequence[float] | _FromConfig = FROM_CONFIG,
        temperature: float | Sequence[float] | _FromConfig = FROM_CONFIG,
        policy: str | Sequence[str] | _FromConfig = FROM_CONFIG,
        check_inputs: bool = True,
        check_values: bool | None = None,
        stats_window: int = 4096,
        config: SideNetConfig | Sequence[SideNetConfig] | None = None,
    ) -> None:
        super().__init__()
        splits = _stages(split, MainNetSplit, "split")
        sidenets = _stages(sidenet, SideNet, "sidenet")
        if len(splits) != len(sidenets):
            raise ValueError(
                f"a cascade needs one SideNet per split: got {len(splits)} splits and {len(sidenets)} SideNets"
            )
        configs = _stages(config, SideNetConfig, "config") if config is not None else (None,) * len(splits)
        if len(configs) != len(splits):
            raise ValueError(f"a cascade of {len(splits)} SideNets needs as many configs, got {len(configs)}")
        for part, head in zip(splits, sidenets, strict=True):
            if part.num_classes is not None and part.num_classes != head.num_classes:
                raise ClassCountMismatchError(
                    f"the SideNet at tap {part.tap!r} predicts {head.num_classes} classes but the MainNet "
                    f"predicts {part.num_classes}"
                )
        for part, later in zip(splits[:-1], splits[1:], strict=True):
            part.check_follows(later)  # a cascade that cannot run fails here, not at its first batch
        for part in splits:
            # Frozen like peft's base model: no MainNet gradient is ever wanted, so optimisers and
            # parameter counts see only the SideNets.
            part.eval().requires_grad_(False)
        self.split = splits[0]
        # The later taps' splits cut the same MainNet, registered once (under ``split``): held in a
        # tuple so that the state dict and ``.parameters()`` see its weights once.
        self._later_splits = splits[1:]
        self.sidenet = sidenets[0]
        # The later SideNets of a cascade; empty for one SideNet (whose state dict is as it always was).
        self.later_sidenets = nn.ModuleList(sidenets[1:])
        # The settings fixed at attach or load. Their exit-rule fields only seed the rules: from then on
        # the rules (self.policies) are their one truth, and :attr:`configs` reads them from there.
        self._configs = tuple(config_for_parts(*parts) for parts in zip(splits, sidenets, configs, strict=True))
        given = {"threshold": threshold, "temperature": temperature, "kind": policy}
        rules = []
        for k, settings in enumerate(self._configs):
            chosen = {name: _stage_value(value, k, len(splits), name) for name, value in given.items()}
            chosen = {name: value for name, value in chosen.items() if value is not FROM_CONFIG}
            rules.append(replace(settings.exit_rule(), **chosen))
        self.policies = tuple(rules)
        self.check_inputs = check_inputs
        self.check_values = check_values
        self.flop_ledger = FlopLedger(splits, sidenets)
        self.monitor = TrafficMonitor(stats_window)
        self.history_: list[dict[str, float]] = []

    # -- settings -------------------------------------------------------------------------------
    @property
    def config(self) -> SideNetConfig:
        """The first SideNet's :class:`SideNetConfig` (see :attr:`configs` for a cascade's), as
        :func:`sidenet.save_sidenet` writes it (less the checksums and fingerprint, computed on saving):
        the settings it was attached or loaded with and its live exit rule. A new frozen object on every
        read; change the rule through the setters."""
        return self.configs[0]

    @property
    def configs(self) -> tuple[SideNetConfig, ...]:
        """One :class:`SideNetConfig` per SideNet, in tap order, each with its live exit rule."""
        return tuple(settings.with_exit_rule(rule) for settings, rule in zip(self._configs, self.policies, strict=True))

    # -- the cascade -----------------------------------------------------------------------------
    @property
    def splits(self) -> tuple[MainNetSplit, ...]:
        """The MainNet cut at each tap, in tap order: ``splits[0]`` is :attr:`split`."""
        return (self.split, *self._later_splits)

    @property
    def sidenets(self) -> tuple[SideNet, ...]:
        """The SideNets in tap order: ``sidenets[0]`` is :attr:`sidenet`."""
        return (self.sidenet, *self.later_sidenets)

    @property
    def taps(self) -> tuple[str | int, ...]:
        """The taps of the SideNets, in order (one for a single SideNet)."""
        return tuple(part.tap for part in self.splits)

    @property
    def num_taps(self) -> int:
        """How many SideNets the model has: 1, or the length of a cascade."""
        return 1 + len(self._later_splits)

    def with_taps(self, taps: Sequence[str | int] | str | int) -> AdaptiveModel:
        """A model of some of this model's SideNets (``taps``, a subsequence of :attr:`taps`, or one tap;
        taps compare as text), sharing its MainNet and those SideNets (not copies) with their exit rules: a
        chosen sub-cascade (see :func:`sidenet.cascade_choice.choose_taps`), or one SideNet of a cascade."""
        names = [str(tap) for tap in self.taps]
        wanted = [str(taps)] if isinstance(taps, (str, int)) else [str(tap) for tap in taps]
        if not wanted:  # e.g. a choice that kept no SideNet: nothing to attach
            raise ValueError(
                "no taps given: a model needs at least one SideNet (a tap choice that kept none says the MainNet "
                "alone is the cheapest within its limit; serve the MainNet)"
            )
        if any(name not in names for name in wanted) or sorted(wanted, key=names.index) != wanted:
            raise ValueError(f"taps must be some of this model's taps {list(self.taps)}, in order; got {list(taps)}")
        if len(set(wanted)) != len(wanted):
            raise ValueError(f"taps must not repeat, got {list(taps)}")
        keep = [names.index(name) for name in wanted]
        splits, sidenets, configs = ([values[k] for k in keep] for values in (self.splits, self.sidenets, self.configs))
        model = AdaptiveModel(
            splits, sidenets, config=configs, check_inputs=self.check_inputs, check_values=self.check_values
        )
        if self.flop_ledger.twin is not None:
            model.count_flops_with(self.flop_ledger.twin.mainnet)
        return model.train(self.training)

    @property
    def policies(self) -> tuple[ExitPolicy, ...]:
        """The exit rule of each SideNet, in tap order, frozen; assign a new tuple to change them."""
        return self._policies

    @policies.setter
    def policies(self, rules: Sequence[ExitPolicy]) -> None:
        rules = tuple(rules)
        if any(not isinstance(rule, ExitPolicy) for rule in rules):
            kinds = ", ".join(type(rule).__name__ for rule in rules)
            raise ValueError(f"exit policies must be sidenet.ExitPolicy objects, got {kinds}")
        expected = self.num_taps if hasattr(self, "_policies") else len(rules)
        if len(rules) != expected or not rules:
            raise ValueError(f"the model has {expected} SideNet(s) and needs as many exit policies, got {len(rules)}")
        self._policies = rules

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The threshold of each SideNet, in tap order. Assign a sequence (one per SideNet) or one
        number for all of them."""
        return tuple(rule.threshold for rule in self.policies)

    @thresholds.setter
    def thresholds(self, values: float | Sequence[float]) -> None:
        count = self.num_taps
        self.policies = tuple(
            replace(rule, threshold=_stage_value(values, k, count, "threshold")) for k, rule in enumerate(self.policies)
        )

    @property
    def policy(self) -> ExitPolicy:
        """The first SideNet's exit rule, frozen; assign a new one (or use the setters below) to change
        it. A cascade's other rules are in :attr:`policies`."""
        return self.policies[0]

    @policy.setter
    def policy(self, rule: ExitPolicy) -> None:
        if not isinstance(rule, ExitPolicy):
            raise ValueError(f"the exit policy must be a sidenet.ExitPolicy, got {type(rule).__name__}")
        self.policies = (rule, *self.policies[1:])

    # The setters install a new rule, not an edit of the old one: callers may hold the old one to
    # restore it, and a thread routing a batch keeps the rule it started with. On a cascade these
    # one-SideNet settings would be ambiguous (the first SideNet's? all of them?), so they refuse and
    # name the per-SideNet ones instead.
    @property
    def threshold(self) -> float:
        return self._single("threshold").threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.policy = replace(self._single("threshold"), threshold=value)

    @property
    def temperature(self) -> float:
        return self._single("temperature").temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.policy = replace(self._single("temperature"), temperature=value)

    @property
    def policy_kind(self) -> str:
        """Name of the exit rule (``max_softmax``, ``entropy`` or ``margin``)."""
        return self._single("policy_kind").kind

    @policy_kind.setter
    def policy_kind(self, value: str) -> None:
        self.policy = replace(self._single("policy_kind"), kind=value)

    def _single(self, setting: str) -> ExitPolicy:
        """The one exit rule of a single SideNet; ``ValueError`` on a cascade, which has one per SideNet."""
        if self.num_taps > 1:
            plural = "thresholds" if setting == "threshold" else "policies"
            raise ValueError(
                f"this model is a cascade of {self.num_taps} SideNets (taps {', '.join(map(str, self.taps))}), "
                f"each with its own exit rule: use model.{plural} instead of model.{setting}"
            )
        return self.policy

    @property
    def tap(self) -> str | int:
        return self.split.tap

    def train(self, mode: bool = True) -> AdaptiveModel:
        """Only the SideNet ever trains: the MainNet (and its batch-norm statistics) stays frozen."""
        super().train(mode)
        self.split.eval()
        return self

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

        ``mode="main"`` runs the MainNet alone (as before attaching), ``"side"`` lets the (first)
        SideNet answer every sample, ``"adaptive"`` routes each sample by the exit policies (and counts
        it in :attr:`monitor`): at each tap in turn, the samples whose score clears that SideNet's
        threshold exit, the others go on to the next tap, and the rest of the MainNet answers those
        that pass the last. ``"batch"`` is the batch-level exit of other toolkits, for comparison: a
        SideNet answers only when every sample still in the batch is confident, otherwise they all go on.

        The MainNet runs in eval mode and under ``torch.no_grad()``: gradients reach only the SideNets.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "main":
            return self._mainnet_alone(x)
        front = self.front_pass(x, mode)
        output = self.finish(front, mode)
        if mode == "adaptive":
            self.record_batch(output, front.confidence)
        return output

    def record_batch(self, output: AdaptiveOutput, confidence: torch.Tensor) -> None:
        """Count a routed batch's answers in :attr:`monitor`, with its first SideNet's ``confidence``: its
        exits from the count of samples the rest answered where routing read it (no device sum), else
        summed where they live."""
        rest = output.answered_by_rest_count
        self.monitor.record(output.exited, confidence, None if rest is None else len(output.exited) - rest)

    def finish(self, front: FrontPass, mode: Mode = "adaptive") -> AdaptiveOutput:
        """The answers of a batch whose :meth:`front_pass` has run: the samples that continue past the
        first SideNet are gathered and go on through :meth:`continue_from` (the later SideNets of a
        cascade, then the rest of the MainNet; for one SideNet, the rest).

        Each tap reads one value from the device, the count of samples going on (see
        :meth:`continuing`); the samples are gathered (text: their padding cut) only when some, not all,
        go on, so that at zero exits the routed model costs what the MainNet costs (plus the SideNets).
        """
        return self._go_on(front.answers(self.num_taps), front.state, front.profile, front.exited, 0, mode)

    def continue_from(self, state: Any, profile: FlopProfile, mode: Mode = "adaptive", part: int = 1) -> AdaptiveOutput:
        """Answers for samples that continue past SideNet ``part - 1``, from their MainNet ``state`` at its
        tap: the later SideNets from ``part`` on, then the rest of the MainNet for those that pass them
        all. ``profile`` is the FLOPs profile of their inputs (:meth:`flop_profile`); the ``flops`` of the
        answer count only what is spent from that tap on, and ``confidence`` is NaN where no SideNet runs
        (one SideNet: the rest of the MainNet answers everyone). :class:`~sidenet.serving.PooledRouter`
        calls it on continuing samples pooled from several batches."""
        count, splits = self.num_taps, self.splits
        if part == count:  # past the last SideNet: the rest of the MainNet answers
            with torch.no_grad():
                return self.mainnet_answers(splits[-1].rest(state), state, profile)
        cost = self.flop_ledger.step(part, state, profile)
        with torch.no_grad():
            state = splits[part - 1].advance(state, splits[part])
        logits = self.side_logits(state, part)
        rule = self.policies[part]
        confidence = rule.confidence(logits)
        exited = rule.exits(confidence)
        if mode == "batch" and not bool(exited.all()):
            exited = torch.zeros_like(exited)
        output = AdaptiveOutput.at_tap(logits, exited, confidence, cost, part, count)
        return self._go_on(output, state, profile, exited, part, mode)

    def mainnet_answers(self, logits: torch.Tensor, state: Any, profile: FlopProfile) -> AdaptiveOutput:
        """The answers of samples that the rest of the MainNet answered after the last tap, given its
        ``logits`` on their ``state``: no exit, no SideNet score (NaN), the rest's FLOPs per sample
        (charged on the state's own size, which reads no device value), exit stage :attr:`num_taps`."""
        cost = self.flop_ledger.rest(state, None, profile, part=self.num_taps - 1)
        n, device, count = len(logits), logits.device, self.num_taps
        no_exit = torch.zeros(n, dtype=torch.bool, device=device)
        # Answers past the last tap (stage num_taps); their NaN scores, FLOPs and stages computed when read.
        return AdaptiveOutput.at_tap(
            logits, no_exit, lambda: torch.full((n,), float("nan"), device=device), cost, count, count
        )

    def _go_on(
        self, output: AdaptiveOutput, state: Any, profile: FlopProfile, exited: torch.Tensor, part: int, mode: Mode
    ) -> AdaptiveOutput:
        """``output`` (answers at SideNet ``part``) completed for the samples that do not exit there."""
        remaining, sizes = self._continuing(self.splits[part], state, exited)
        if len(remaining) == 0:
            output.answered_by_rest_count = 0
            return output
        rows = None if len(remaining) == len(exited) else remaining
        if rows is not None:
            state = self.splits[part].select_sized(state, remaining, sizes)
        if part + 1 == self.num_taps:  # past the last SideNet: the rest of the MainNet answers
            with torch.no_grad():
                logits = self.splits[-1].rest(state)
            return output.answered_by_rest(rows, logits, self.flop_ledger.rest(state, None, profile, part=part))
        later = self.continue_from(state, profile, mode, part + 1)
        # Where a later SideNet ran, its score is the latest these samples got.
        return output.completed(rows, later, rescored=part + 1 < self.num_taps)

    def continuing(self, front: FrontPass) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The samples of a front pass that continue past the first SideNet: their indices in the batch
        (ascending) and the sizes :meth:`MainNetSplit.select_sized` needs (text: the kept length).

        A routed batch's one host wait per tap: the count of continuing samples (and those sizes) is
        read from the device in one transfer. The indices come from a stable sort of the exit mask
        queued before that read, so that finding them reads nothing more (``nonzero`` would be a second
        wait).
        """
        return self._continuing(self.split, front.state, front.exited)

    @staticmethod
    def _continuing(split: MainNetSplit, state: Any, exited: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        order, counts = continuing_first(split, state, exited)
        read = counts.tolist()  # the one host wait of a routed batch at this tap
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

    def admit(self, x: Any) -> None:
        """What every batch passes before it runs, routed or not: the input checks (:meth:`check_input`) and
        the MainNet put back in eval mode should anything have set it training."""
        self.check_input(x)
        self.split.ensure_eval()

    def _mainnet_alone(self, x: Any) -> AdaptiveOutput:
        """``mode="main"``: the MainNet as before attaching; no SideNet, no confidence (NaN)."""
        self.admit(x)
        profile = self.flop_profile(x)
        with torch.no_grad():
            logits = self.split.rest(self.split.trunk(x))
        n = self.split.batch_size(x)
        flops = torch.full((n,), float(profile.mainnet), device=logits.device)
        nan = torch.full((n,), float("nan"), device=logits.device)
        return AdaptiveOutput(logits, torch.zeros(n, dtype=torch.bool, device=logits.device), nan, flops)

    def side_logits(self, state: Any, part: int = 0) -> torch.Tensor:
        """The logits of SideNet ``part`` (0: the first) on the state at its tap. The features are taken
        without autograd (no graph through the MainNet, even for inputs that require grad); the SideNet
        keeps its own graph."""
        with torch.no_grad():
            features = self.splits[part].features(state)
        return self.sidenets[part](features)

    def front_pass(self, x: Any, mode: Mode = "adaptive") -> FrontPass:
        """Trunk, SideNet and exit decision for a batch, without the rest of the MainNet.

        ``mode`` is ``"adaptive"`` (per-sample exits), ``"side"`` (everyone exits) or ``"batch"`` (all
        exit or none). No side effects: the callers that route traffic (:meth:`forward`,
        :class:`sidenet.serving.PooledRouter`, which runs the rest later on continuing samples pooled
        from several batches) record it in :attr:`monitor` themselves.
        """
        if mode not in ("adaptive", "side", "batch"):
            raise ValueError(f"front_pass mode must be 'adaptive', 'side' or 'batch', got {mode!r}")
        self.admit(x)
        rule = self.policies[0]  # read once: another thread may install a new rule meanwhile
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
