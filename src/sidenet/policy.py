"""When does a sample exit? Each rule turns the SideNet's logits into a confidence score in [0, 1]
(higher = surer); the sample exits when the score reaches the threshold.

Rules (``ExitPolicy.kind``):

- ``max_softmax``: the largest softmax probability (the paper's rule), in [1/C, 1].
- ``entropy``: one minus the softmax entropy divided by log C, in [0, 1] (1 = one-hot).
- ``margin``: the gap between the two largest probabilities, in [0, 1].

All three read the softmax after dividing the logits by the temperature. With two classes they order
samples identically (each is a monotone function of the larger probability), so their curves coincide.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["ExitPolicy", "NEVER_EXIT", "POLICIES", "validate_threshold", "validate_temperature", "validate_policy"]

# The documented "never exit" threshold: no confidence reaches it, so the MainNet answers everything.
NEVER_EXIT = math.inf
POLICIES = ("max_softmax", "entropy", "margin")


def _as_number(value: Any, name: str, expected: str) -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` for booleans, strings and non-numbers.

    Booleans and strings convert silently with ``float`` (``True`` -> 1.0, ``"0.5"`` -> 0.5), which
    hides a mistake in the caller (a flag or an unparsed option passed as a number), so they are refused.
    """
    is_bool_tensor = isinstance(value, torch.Tensor) and value.dtype == torch.bool
    if isinstance(value, (bool, np.bool_, str, bytes)) or is_bool_tensor:
        raise ValueError(f"{name} must be {expected}, got the {type(value).__name__} {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: a tensor of several values
        raise ValueError(f"{name} must be {expected}, got {value!r}") from exc


def validate_threshold(threshold: float) -> float:
    """Return ``threshold`` as a float if it lies in [0, 1] or is :data:`NEVER_EXIT`, else raise."""
    value = _as_number(threshold, "threshold", "a number in [0, 1] or sidenet.NEVER_EXIT")
    if value == NEVER_EXIT or 0.0 <= value <= 1.0:
        return value
    raise ValueError(f"threshold must lie in [0, 1] (or be sidenet.NEVER_EXIT = inf to never exit), got {threshold!r}")


def validate_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float if it is a positive finite number, else raise."""
    value = _as_number(temperature, "temperature", "a positive finite number")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return value


def validate_policy(kind: str) -> str:
    """Return ``kind`` if it names an exit rule, else raise ``ValueError`` listing the rules."""
    if not isinstance(kind, str) or kind not in POLICIES:
        raise ValueError(f"unknown exit policy {kind!r}; choose one of {', '.join(POLICIES)}")
    return kind


# Field name -> validator, run on every assignment (in __init__ and afterwards).
_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "threshold": validate_threshold,
    "temperature": validate_temperature,
    "kind": validate_policy,
}


@dataclass
class ExitPolicy:
    """Exit rule: a confidence score of the SideNet's softmax compared with a threshold.

    Every assignment of a field is validated, so ``policy.threshold = 5`` raises like
    ``ExitPolicy(threshold=5)`` does.

    Attributes:
        threshold: a sample exits when its score is at least this; 0 exits everything,
            :data:`NEVER_EXIT` nothing.
        temperature: the SideNet's logits are divided by it before the softmax (1 = unchanged).
        kind: ``max_softmax`` (default), ``entropy`` or ``margin`` (see the module docstring).
    """

    threshold: float = 0.9
    temperature: float = 1.0
    kind: str = "max_softmax"

    def __setattr__(self, name: str, value: Any) -> None:
        validator = _VALIDATORS.get(name)
        super().__setattr__(name, validator(value) if validator is not None else value)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax of the logits after the temperature, in float32 or wider."""
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-sample score in [0, 1] under this rule."""
        return self.score(self.probabilities(logits))

    def score(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The rule's score of softmax probabilities (N, C)."""
        if self.kind == "max_softmax":
            return probabilities.amax(dim=-1)
        if self.kind == "margin":
            if probabilities.shape[-1] < 2:
                return torch.ones(probabilities.shape[:-1], dtype=probabilities.dtype, device=probabilities.device)
            top2 = probabilities.topk(2, dim=-1).values
            return top2[..., 0] - top2[..., 1]
        # entropy: 0 * log 0 counts as 0 (xlogy), normalised by the entropy of the uniform distribution
        classes = probabilities.shape[-1]
        if classes < 2:
            return torch.ones(probabilities.shape[:-1], dtype=probabilities.dtype, device=probabilities.device)
        entropy = -torch.special.xlogy(probabilities, probabilities).sum(dim=-1)
        return (1.0 - entropy / math.log(classes)).clamp(0.0, 1.0)

    def exits(self, confidence: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the samples that exit."""
        return confidence >= self.threshold
