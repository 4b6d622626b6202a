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

from collections.abc import Callable
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
    """FLOPs per sample of a split MainNet and its SideNet, measured once per input size and kept.

    Args:
        split: the MainNet cut at the tap.
        sidenet: the SideNet reading the tap.

    FLOPs are counted on ``split`` itself, or on a float twin of the MainNet given to
    :meth:`count_with` (FlopCounterMode counts no int8 kernel). A module only so that the model's
    ``.to()`` moves the twin with the MainNet it stands for; the split and the SideNet are the model's
    own submodules, held here unregistered so that they appear once in the model's state dict.
    """

    def __init__(self, split: MainNetSplit, sidenet: nn.Module) -> None:
        super().__init__()
        self._parts = (split, sidenet)
        self.twin: MainNetSplit | None = None
        # input flop_key -> profile; rest_flop_key -> FLOPs per sample of the rest (text: per length)
        self._profiles: dict[tuple, FlopProfile] = {}
        self._rest: dict[tuple, int] = {}

    @property
    def profiles(self) -> dict[tuple, FlopProfile]:
        """The profiles measured so far, by :meth:`MainNetSplit.flop_key` (a copy)."""
        return dict(self._profiles)

    def count_with(self, mainnet: nn.Module | MainNetSplit | None) -> None:
        """Count on ``mainnet``, a float model of the same architecture and shapes as the MainNet (or a
        split of it), from now on; ``None`` goes back to the MainNet. Forgets every measured profile."""
        split = self._parts[0]
        twin = None if mainnet is None else split_mainnet(mainnet, split.tap, **split.options())
        if twin is not None:
            twin.eval().requires_grad_(False)  # frozen like the MainNet it stands for
        self.twin = twin
        self._profiles.clear()
        self._rest.clear()

    def _counted(self) -> MainNetSplit:
        # Counting runs the split: it must not train it (batch-norm statistics).
        return (self.twin or self._parts[0]).ensure_eval()

    def profile(self, x: Any) -> FlopProfile:
        """FLOPs per sample of trunk, SideNet and rest for inputs like ``x`` (measured once per
        :meth:`MainNetSplit.flop_key`: the sample shape, or for text the padded length)."""
        split, sidenet = self._parts
        key = split.flop_key(x)
        if key not in self._profiles:
            self._profiles[key] = profile_flops(self._counted(), sidenet, split.example(x))
        return self._profiles[key]

    def rest(self, state: Any, index: torch.Tensor | None, profile: FlopProfile, selected: Any = None) -> float:
        """FLOPs per sample of the rest run on ``select(state, index)`` (on ``state`` when ``index`` is None).

        ``profile.rest`` unless the split says the rest's cost depends on the samples kept (text: the
        rest runs at the longest remaining length); then it is measured once per
        :meth:`MainNetSplit.rest_flop_key` and kept. ``selected``, when the caller has it, spares a
        second ``select`` for the measurement.
        """
        split = self._parts[0]
        key = split.rest_flop_key(state, index)
        if key is None:
            return float(profile.rest)
        if key not in self._rest:
            if index is None:
                selected = state
            elif selected is None:
                selected = split.select(state, index)
            self._rest[key] = count_flops(self._counted().rest, split.example_state(selected))[0]
        return float(self._rest[key])
