"""The exit policy: threshold validation, confidence, exit rule."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sidenet import NEVER_EXIT, ExitPolicy, FrozenExitPolicyError, SidenetError
from sidenet.policy import POLICIES, format_threshold, validate_threshold


def test_never_exit_is_infinity() -> None:
    assert math.isinf(NEVER_EXIT) and NEVER_EXIT > 0


@pytest.mark.parametrize(
    "threshold", [0, 0.0, 0.25, 1, 1.0, NEVER_EXIT, np.float32(0.5), np.float64(0.25), np.int64(1), torch.tensor(0.5)]
)
def test_valid_thresholds(threshold: object) -> None:
    value = validate_threshold(threshold)
    assert type(value) is float and value == float(threshold)
    assert type(ExitPolicy(threshold=threshold).threshold) is float


@pytest.mark.parametrize(
    "threshold",
    [-0.1, 1.5, 1.0000001, math.nan, -math.inf, "abc", None, [0.5], "0.5", True, False, np.bool_(True)],
)
def test_invalid_thresholds(threshold: object) -> None:
    with pytest.raises(ValueError, match="threshold"):
        validate_threshold(threshold)
    with pytest.raises(ValueError, match="threshold"):
        ExitPolicy(threshold=threshold)


@pytest.mark.parametrize("value", [True, "0.5", b"0.5"])
def test_bools_and_strings_are_named(value: object) -> None:
    """``float(True)`` is 1.0 and ``float("0.5")`` is 0.5: refused, with the type in the message."""
    with pytest.raises(ValueError, match=rf"threshold must be .* got the {type(value).__name__}"):
        validate_threshold(value)
    with pytest.raises(ValueError, match=rf"temperature must be .* got the {type(value).__name__}"):
        ExitPolicy(0.5, value)


@pytest.mark.parametrize("temperature", [0.0, -2.0, math.inf, math.nan, True, "2", None])
def test_invalid_temperature(temperature: object) -> None:
    with pytest.raises(ValueError, match="temperature"):
        ExitPolicy(0.5, temperature)


@pytest.mark.parametrize("temperature", [2, 0.5, np.float32(1.5)])
def test_valid_temperature_is_stored_as_float(temperature: object) -> None:
    assert ExitPolicy(0.5, temperature).temperature == float(temperature)
    assert type(ExitPolicy(0.5, temperature).temperature) is float


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", 5),
        ("threshold", "0.5"),
        ("threshold", True),
        ("temperature", 0.0),
        ("temperature", True),
        ("kind", "variance"),
        ("kind", None),
    ],
)
def test_assignment_is_refused(field: str, value: object) -> None:
    """The rule is frozen: no assignment, good value or bad, bypasses the validation of a new rule."""
    policy = ExitPolicy(0.5, 2.0, "margin")
    with pytest.raises(ValueError, match="threshold|temperature|policy"):
        setattr(policy, field, value)
    assert (policy.threshold, policy.temperature, policy.kind) == (0.5, 2.0, "margin")  # unchanged


@pytest.mark.parametrize(
    ("field", "setter"),
    [("threshold", "model.threshold"), ("temperature", "model.temperature"), ("kind", "model.policy_kind")],
)
def test_frozen_error_names_the_field_and_the_setter(field: str, setter: str) -> None:
    policy = ExitPolicy()
    valid = {"threshold": 0.5, "temperature": 2.0, "kind": "entropy"}[field]
    with pytest.raises(FrozenExitPolicyError, match=rf"{field}.*{setter}") as info:
        setattr(policy, field, valid)
    assert isinstance(info.value, SidenetError) and isinstance(info.value, dataclasses.FrozenInstanceError)
    with pytest.raises(FrozenExitPolicyError, match=field):
        delattr(policy, field)


def test_replace_validates_and_converts() -> None:
    policy = ExitPolicy()
    changed = dataclasses.replace(policy, threshold=np.float64(0.25), temperature=3, kind="entropy")
    assert (changed.threshold, changed.temperature, changed.kind) == (0.25, 3.0, "entropy")
    assert type(changed.threshold) is float and type(changed.temperature) is float
    assert (policy.threshold, policy.kind) == (0.9, "max_softmax")  # the old rule is left as it was
    with pytest.raises(ValueError, match="threshold"):
        dataclasses.replace(policy, threshold=5)


def test_equal_rules_hash_alike() -> None:
    assert hash(ExitPolicy(0.5, 2.0)) == hash(ExitPolicy(np.float32(0.5), 2))
    assert len({ExitPolicy(0.5), ExitPolicy(0.5), ExitPolicy(0.6)}) == 2


def test_to_dict_is_json_ready() -> None:
    assert ExitPolicy(NEVER_EXIT, 2.0, "margin").to_dict() == {"kind": "margin", "temperature": 2.0, "threshold": None}


@pytest.mark.parametrize(
    ("threshold", "digits", "text"),
    [(NEVER_EXIT, 4, "never"), (None, 4, "never"), (0.5, 4, "0.5000"), (0.25, 6, "0.250000")],
)
def test_format_threshold(threshold: float | None, digits: int, text: str) -> None:
    assert format_threshold(threshold, digits=digits) == text


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


PROBS = st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6).filter(lambda p: sum(p) > 1e-3)


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(PROBS, min_size=1, max_size=5), kind=st.sampled_from(POLICIES))
def test_every_score_lies_in_unit_interval(rows: list[list[float]], kind: str) -> None:
    width = min(len(r) for r in rows)
    probs = torch.tensor([r[:width] for r in rows], dtype=torch.float64)
    assume(bool((probs.sum(dim=1) > 1e-3).all()))  # cutting rows to one width can leave all zeros
    probs = probs / probs.sum(dim=1, keepdim=True)
    score = ExitPolicy(0.5, kind=kind).score(probs)
    assert torch.all(score >= -1e-9) and torch.all(score <= 1 + 1e-9)


@pytest.mark.parametrize("kind", POLICIES)
def test_one_hot_scores_one(kind: str) -> None:
    policy = ExitPolicy(0.5, kind=kind)
    assert policy.score(torch.tensor([[0.0, 1.0, 0.0]])).item() == pytest.approx(1.0)


def test_uniform_scores() -> None:
    uniform = torch.full((1, 4), 0.25)
    assert ExitPolicy(kind="entropy").score(uniform).item() == pytest.approx(0.0, abs=1e-7)
    assert ExitPolicy(kind="margin").score(uniform).item() == pytest.approx(0.0)
    assert ExitPolicy(kind="max_softmax").score(uniform).item() == pytest.approx(0.25)


def test_entropy_and_margin_by_hand() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    entropy = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert ExitPolicy(kind="entropy").score(probs).item() == pytest.approx(1 - entropy / math.log(3))
    assert ExitPolicy(kind="margin").score(probs).item() == pytest.approx(0.2)


@pytest.mark.parametrize("kind", POLICIES)
def test_two_class_rules_order_samples_alike(kind: str) -> None:
    """With two classes every rule is a monotone function of the larger probability."""
    larger = 0.5 + 0.5 * torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probs = torch.stack([larger, 1 - larger], dim=1)
    assert torch.equal(ExitPolicy(kind=kind).score(probs).argsort(), larger.argsort())


def test_unknown_policy_raises() -> None:
    with pytest.raises(ValueError, match="max_softmax, entropy, margin"):
        ExitPolicy(0.5, kind="variance")
