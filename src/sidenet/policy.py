"""When does a sample exit? Each rule turns the SideNet's logits into a confidence score in [0, 1]
(higher = surer); the sample exits when the score reaches the threshold.

Rules (``ExitPolicy.kind``):

- ``max_softmax``: the largest softmax probability (the paper's rule), in [1/C, 1].
- ``entropy``: one minus the softmax entropy divided by log C, in [0, 1] (1 = one-hot).
- ``margin``: the gap between the two largest probabilities, in [0, 1].

All three read the softmax after dividing the logits by the temperature. With two classes they order
samples identically (each is a monotone function of the larger probability), so their curves coincide.

An :class:`ExitPolicy` never changes once built: the model, the sweep record and the report share one
without copying it, and a caller holding it (to restore it later) keeps what it held. The model's
setters (``model.threshold = 0.8``) install a new rule built with ``dataclasses.replace``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sidenet.errors import FrozenExitPolicyError

__all__ = [
    "ExitPolicy",
    "NEVER_EXIT",
    "POLICIES",
    "validate_threshold",
    "validate_temperature",
    "validate_policy",
    "format_threshold",
]

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


def format_threshold(threshold: float | None, digits: int = 4) -> str:
    """A threshold as text: ``"never"`` for :data:`NEVER_EXIT` (and for ``None``, how JSON stores it),
    else the number with ``digits`` decimals. The one spelling of thresholds in tables and messages."""
    if threshold is None or math.isinf(threshold):
        return "never"
    return f"{threshold:.{digits}f}"


# Field name -> (validator, the model setting that replaces the rule). The validator runs once per
# field, when the rule is built; the setting is named by the error of a later assignment.
_FIELDS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "threshold": (validate_threshold, "model.threshold"),
    "temperature": (validate_temperature, "model.temperature"),
    "kind": (validate_policy, "model.policy_kind"),
}


# Not dataclass(frozen=True): its generated __setattr__ raises FrozenInstanceError alone, an
# AttributeError, where a refused setting must be a ValueError naming the setter (see __setattr__).
# Hashable, as a frozen dataclass is: no field changes after __init__.
@dataclass(unsafe_hash=True)
class ExitPolicy:
    """Exit rule: a confidence score of the SideNet's softmax compared with a threshold.

    Frozen: fields are validated once, when the rule is built (``ExitPolicy(threshold=5)`` raises a
    ``ValueError``), and any later assignment raises :class:`~sidenet.errors.FrozenExitPolicyError`
    (a ``ValueError``) naming the model setting to use instead. Build a changed rule with
    ``dataclasses.replace(rule, threshold=0.8)``, which validates like the constructor.

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
        spec = _FIELDS.get(name)
        if spec is None:  # not a field: a subclass's own attribute (test doubles set their exit mask)
            super().__setattr__(name, value)
        elif name in self.__dict__:  # set already: __init__ sets each field once, through here
            raise FrozenExitPolicyError(
                f"an ExitPolicy is frozen: cannot assign {name}={value!r}. Set {spec[1]} = ... on the model "
                f"(it installs a new rule), or build one with dataclasses.replace(rule, {name}=...)"
            )
        else:
            super().__setattr__(name, spec[0](value))

    def __delattr__(self, name: str) -> None:
        if name in _FIELDS:
            raise FrozenExitPolicyError(f"an ExitPolicy is frozen: cannot delete its {name}")
        super().__delattr__(name)

    def to_dict(self) -> dict[str, Any]:
        """The rule as JSON-ready values (a :data:`NEVER_EXIT` threshold as null, as configs store it)."""
        threshold = None if math.isinf(self.threshold) else self.threshold
        return {"kind": self.kind, "temperature": self.temperature, "threshold": threshold}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax of the logits after the temperature, in float32 or wider."""
        logits = logits.float()
        # Dividing by 1 would be one more kernel on every routed batch, for nothing.
        return torch.softmax(logits if self.temperature == 1.0 else logits / self.temperature, dim=-1)

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
