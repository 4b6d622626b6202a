"""FLOPs measured with ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as 2).

FlopCounterMode counts the matrix and convolution work (where nearly all of a network's cost is);
element-wise operations such as batch norm and ReLU are not counted, for MainNet and SideNet alike.
PyTorch's counter has no formula for the CPU kernel of ``scaled_dot_product_attention``; sidenet adds
the one it uses for the GPU kernels, so that a transformer's attention counts the same under the
``sdpa`` and ``eager`` attention implementations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["count_flops", "FlopProfile", "profile_flops"]


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
