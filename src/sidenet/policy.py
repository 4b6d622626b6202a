"""When does a sample exit? The paper's rule: the SideNet's maximum softmax probability (after an
optional temperature) reaches the threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ExitPolicy", "NEVER_EXIT", "validate_threshold"]

# The documented "never exit" threshold: no confidence reaches it, so the MainNet answers everything.
NEVER_EXIT = math.inf


def validate_threshold(threshold: float) -> float:
    """Return ``threshold`` as a float if it lies in [0, 1] or is :data:`NEVER_EXIT`, else raise."""
    try:
        value = float(threshold)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"threshold must be a number in [0, 1] or sidenet.NEVER_EXIT, got {threshold!r}") from exc
    if value == NEVER_EXIT or 0.0 <= value <= 1.0:
        return value
    raise ValueError(f"threshold must lie in [0, 1] (or be sidenet.NEVER_EXIT = inf to never exit), got {threshold!r}")


@dataclass
class ExitPolicy:
    """Maximum-softmax-probability exit rule.

    Attributes:
        threshold: a sample exits when its confidence is at least this; 0 exits everything,
            :data:`NEVER_EXIT` nothing.
        temperature: the SideNet's logits are divided by it before the softmax (1 = unchanged).
    """

    threshold: float = 0.9
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.threshold = validate_threshold(self.threshold)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature!r}")

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-sample confidence in [1/C, 1]."""
        return torch.softmax(logits.float() / self.temperature, dim=-1).amax(dim=-1)

    def exits(self, confidence: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the samples that exit."""
        return confidence >= self.threshold
