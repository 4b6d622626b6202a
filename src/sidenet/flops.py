"""FLOPs measured with ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as 2).

FlopCounterMode counts the matrix and convolution work (where nearly all of a network's cost is);
element-wise operations such as batch norm and ReLU are not counted, for MainNet and SideNet alike.
PyTorch's counter has no formula for the CPU kernel of ``scaled_dot_product_attention``; sidenet adds
the one it uses for the GPU kernels, so that a transformer's attention counts the same under the
``sdpa`` and ``eager`` attention implementations.

:class:`FlopLedger` keeps the FLOPs per sample of one attached SideNet's parts, measured once per input
size; the adaptive model, the sweep and the pooled router charge every sample from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from sidenet.splits import MainNetSplit, split_mainnet

__all__ = ["count_flops", "FlopProfile", "profile_flops", "FlopLedger"]


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """Attention FLOPs from the shapes of query, key and value (PyTorch's formula for its GPU kernels)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {_CPU_SDPA: _sdpa_flops} if _CPU_SDPA is not None else {}


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Run ``fn(*args, **kwargs)`` under a FLOP counter; return ``(flops, result)``."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
        result = fn(*args, **kwargs)
    return int(counter.get_total_flops()), result


@dataclass(frozen=True)
class FlopProfile:
    """FLOPs of one sample through each part: MainNet trunk, SideNet, and the rest of the MainNet."""

    trunk: int
    side: int
    rest: int

    @property
    def mainnet(self) -> int:
        """The MainNet alone (no SideNet): trunk + rest."""
        return self.trunk + self.rest

    def adaptive(self, exit_rate: float) -> float:
        """Expected FLOPs per sample when ``exit_rate`` of the samples exit at the SideNet (for MainNets
        whose rest costs the same whichever samples continue; see ``MainNetSplit.rest_flop_key``)."""
        return self.trunk + self.side + (1.0 - exit_rate) * self.rest

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "mainnet": self.mainnet}


def profile_flops(split: Any, sidenet: torch.nn.Module, example: Any) -> FlopProfile:
    """Measure trunk, SideNet and rest FLOPs per sample on ``example``, a batch of one input."""
    n = split.batch_size(example)
    if n != 1:
        raise ValueError(f"profile_flops needs a batch of one sample, got {n}")
    trunk, state = count_flops(split.trunk, example)
    side, _ = count_flops(lambda s: sidenet(split.features(s)), state)
    rest, _ = count_flops(split.rest, state)
    return FlopProfile(trunk=trunk, side=side, rest=rest)


class FlopLedger(nn.Module):
    """FLOPs per sample of a split MainNet and its SideNets, measured once per input size and kept.

    Args:
        split: the MainNet cut at the (first) tap, or the splits of a cascade in tap order.
        sidenet: the SideNet reading that tap, or a cascade's SideNets.

    The parts of a cascade: the trunk (input to the first tap), the SideNet there, then per later tap
    ``k`` its *step* (the MainNet's segment from tap ``k - 1`` to tap ``k``, then SideNet ``k``), and the
    rest of the MainNet after the last tap. :meth:`profile` measures the first three for one SideNet
    (its ``rest`` is the whole MainNet after the first tap), :meth:`step` and :meth:`rest` the others.

    FLOPs are counted on the splits themselves, or on a float twin of the MainNet given to
    :meth:`count_with` (FlopCounterMode counts no int8 kernel). A module only so that the model's
    ``.to()`` moves the twin with the MainNet it stands for; the splits and the SideNets are the model's
    own submodules, held here unregistered so that they appear once in the model's state dict.
    """

    def __init__(self, split: MainNetSplit | Sequence[MainNetSplit], sidenet: nn.Module | Sequence[nn.Module]) -> None:
        super().__init__()
        splits = tuple(split) if isinstance(split, (list, tuple)) else (split,)
        sidenets = tuple(sidenet) if isinstance(sidenet, (list, tuple)) else (sidenet,)
        self._parts = (splits, sidenets)
        self.twin: MainNetSplit | None = None  # the twin of the first split (see count_with)
        self._twins: tuple[MainNetSplit, ...] = ()
        # input flop_key -> profile; (part, profile, rest_flop_key) -> FLOPs per sample of a later part
        self._profiles: dict[tuple, FlopProfile] = {}
        self._rest: dict[tuple, int] = {}
        self._steps: dict[tuple, tuple[int, int]] = {}

    @property
    def profiles(self) -> dict[tuple, FlopProfile]:
        """The profiles measured so far, by :meth:`MainNetSplit.flop_key` (a copy)."""
        return dict(self._profiles)

    def count_with(self, mainnet: nn.Module | MainNetSplit | None) -> None:
        """Count on ``mainnet``, a float model of the same architecture and shapes as the MainNet (or a
        split of it), from now on; ``None`` goes back to the MainNet. Forgets every measured profile."""
        splits = self._parts[0]
        twins: tuple[MainNetSplit, ...] = ()
        if mainnet is not None:
            base = mainnet.mainnet if isinstance(mainnet, MainNetSplit) and len(splits) > 1 else mainnet
            twins = tuple(split_mainnet(base, part.tap, **part.options()) for part in splits)
            for twin in twins:
                twin.eval().requires_grad_(False)  # frozen like the MainNet it stands for
        self._twins = twins
        self.twin = twins[0] if twins else None
        self._profiles.clear()
        self._rest.clear()
        self._steps.clear()

    def _counted(self, part: int = 0) -> MainNetSplit:
        # Counting runs the split: it must not train it (batch-norm statistics).
        return (self._twins[part] if self._twins else self._parts[0][part]).ensure_eval()

    def profile(self, x: Any) -> FlopProfile:
        """FLOPs per sample of trunk, first SideNet and rest (all of the MainNet after the first tap)
        for inputs like ``x`` (measured once per :meth:`MainNetSplit.flop_key`: the sample shape, or for
        text the padded length)."""
        splits, sidenets = self._parts
        key = splits[0].flop_key(x)
        if key not in self._profiles:
            self._profiles[key] = profile_flops(self._counted(), sidenets[0], splits[0].example(x))
        return self._profiles[key]

    def rest(
        self, state: Any, index: torch.Tensor | None, profile: FlopProfile, selected: Any = None, part: int = 0
    ) -> float:
        """FLOPs per sample of the rest of the MainNet after tap ``part`` (0: the first), run on
        ``select(state, index)`` (on ``state`` when ``index`` is None), for inputs of ``profile``.

        After the first tap: ``profile.rest`` unless the split says the rest's cost depends on the
        samples kept (text: the rest runs at the longest remaining length); then it is measured once per
        :meth:`MainNetSplit.rest_flop_key` and kept. After a later tap: measured once per profile and
        key. ``selected``, when the caller has it, spares a second ``select`` for the measurement.
        """
        split = self._parts[0][part]
        key = split.rest_flop_key(state, index)
        if key is None and part == 0:
            return float(profile.rest)
        memo = ("rest", part, profile if key is None else None, key)
        if memo not in self._rest:
            if index is None:
                selected = state
            elif selected is None:
                selected = split.select(state, index)
            self._rest[memo] = count_flops(self._counted(part).rest, split.example_state(selected))[0]
        return float(self._rest[memo])

    def step(self, part: int, state: Any, profile: FlopProfile) -> float:
        """FLOPs per sample of a cascade's step to tap ``part`` (>= 1) on ``state``, the MainNet's state at
        tap ``part - 1`` of the samples that continue: the segment between the two taps, then SideNet
        ``part``. Measured once per input profile and :meth:`MainNetSplit.rest_flop_key` of ``state``."""
        segment, side = self.step_parts(part, state, profile)
        return float(segment + side)

    def step_parts(self, part: int, state: Any, profile: FlopProfile) -> tuple[int, int]:
        """:meth:`step` as its two parts: ``(segment, SideNet)`` FLOPs per sample."""
        splits, sidenets = self._parts
        if not 1 <= part < len(splits):
            raise ValueError(f"a cascade of {len(splits)} SideNets has steps 1..{len(splits) - 1}, not {part}")
        before = splits[part - 1]
        key = before.rest_flop_key(state)
        memo = ("step", part, profile if key is None else None, key)
        if memo not in self._steps:
            sample = before.example_state(state)
            segment, later = count_flops(self._counted(part - 1).advance, sample, self._counted(part))
            side, _ = count_flops(lambda s: sidenets[part](splits[part].features(s)), later)
            self._steps[memo] = (segment, side)
        return self._steps[memo]
