"""The exit policy: threshold validation, confidence, exit rule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sidenet import NEVER_EXIT, ExitPolicy
from sidenet.policy import validate_threshold


def test_never_exit_is_infinity() -> None:
    assert math.isinf(NEVER_EXIT) and NEVER_EXIT > 0


@pytest.mark.parametrize("threshold", [0, 0.0, 0.25, 1, 1.0, NEVER_EXIT, "0.5"])
def test_valid_thresholds(threshold: object) -> None:
    assert validate_threshold(threshold) == float(threshold)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, 1.0000001, math.nan, -math.inf, "abc", None, [0.5]])
def test_invalid_thresholds(threshold: object) -> None:
    with pytest.raises(ValueError, match="threshold"):
        validate_threshold(threshold)
    with pytest.raises(ValueError, match="threshold"):
        ExitPolicy(threshold=threshold)


@pytest.mark.parametrize("temperature", [0.0, -2.0, math.inf, math.nan])
def test_invalid_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        ExitPolicy(0.5, temperature)


@settings(max_examples=25, deadline=None)
@given(
    logits=st.lists(st.lists(st.floats(-20, 20, allow_nan=False), min_size=3, max_size=3), min_size=1, max_size=6),
    temperature=st.floats(0.1, 10),
)
def test_confidence_is_max_softmax(logits: list[list[float]], temperature: float) -> None:
    tensor = torch.tensor(logits)
    policy = ExitPolicy(0.5, temperature)
    confidence = policy.confidence(tensor)
    expected = torch.softmax(tensor.double() / temperature, dim=1).max(dim=1).values
    torch.testing.assert_close(confidence.double(), expected, rtol=0, atol=1e-6)
    assert torch.all(confidence >= 1 / 3 - 1e-6) and torch.all(confidence <= 1)


def test_confidence_is_float32_for_half_logits() -> None:
    confidence = ExitPolicy().confidence(torch.tensor([[0.0, 1.0]], dtype=torch.float16))
    assert confidence.dtype == torch.float32


def test_temperature_changes_confidence_not_ranking() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0]])
    sharp, soft = ExitPolicy(0.5, 0.5).confidence(logits), ExitPolicy(0.5, 4.0).confidence(logits)
    assert torch.all(sharp > soft)
    assert torch.equal(sharp.argsort(), soft.argsort())


def test_exit_rule_is_greater_or_equal() -> None:
    confidence = torch.tensor([0.2, 0.5, 0.50001, 0.9, 1.0])
    assert ExitPolicy(0.5).exits(confidence).tolist() == [False, True, True, True, True]
    assert ExitPolicy(0.0).exits(confidence).all()
    assert ExitPolicy(1.0).exits(confidence).tolist() == [False, False, False, False, True]
    assert not ExitPolicy(NEVER_EXIT).exits(confidence).any()
