"""The shift check: quiet on the same distribution, firing on another, and wired into the routed
model's running statistics and its saved folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import sidenet
from sidenet.shift import confidence_shift


def test_same_distribution_is_quiet_and_shifted_one_fires() -> None:
    rng = np.random.default_rng(0)
    reference = rng.beta(5, 1, size=2000)
    same = confidence_shift(reference, rng.beta(5, 1, size=1000), threshold=0.9)
    assert not same.shifted and same.p_value > 0.01
    other = confidence_shift(reference, rng.beta(9, 1, size=1000), threshold=0.9)
    assert other.shifted and other.observed_exit_rate > other.reference_exit_rate
    assert "SHIFT" in str(other) and "no shift" in str(same)


def test_false_alarm_rate_is_at_most_alpha() -> None:
    rng = np.random.default_rng(1)
    alarms = [confidence_shift(rng.random(500), rng.random(300), alpha=0.05).shifted for _ in range(400)]
    assert np.mean(alarms) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)


def test_too_few_samples_and_bad_input() -> None:
    report = confidence_shift(np.random.default_rng(0).random(100), np.ones(10), min_samples=50)
    assert np.isnan(report.p_value) and not report.shifted and "too few" in str(report)
    with pytest.raises(ValueError, match="alpha"):
        confidence_shift([0.5], [0.5], alpha=1.0)
    with pytest.raises(ValueError, match="empty"):
        confidence_shift([], [0.5])


def test_model_tracks_recent_confidences(tiny_model: sidenet.AdaptiveModel, images) -> None:
    tiny_model.stats_window = 50
    with pytest.raises(ValueError, match="set_reference"):
        tiny_model.shift_check()
    with torch.no_grad():
        reference = tiny_model(images(200, seed=1)).confidence
        tiny_model.reset_stats()
        for seed in range(4):
            tiny_model(images(40, seed=10 + seed))
        tiny_model(images(8, seed=20), mode="main")  # other modes are not traffic to watch
    assert 50 <= len(tiny_model.recent_confidence) <= 50
    tiny_model.set_reference(reference)
    assert not tiny_model.shift_check(min_samples=20).shifted
    with torch.no_grad():
        tiny_model.reset_stats()
        tiny_model(3.0 * images(60, seed=30) + 2.0)  # inputs far from the reference ones
    assert tiny_model.shift_check(min_samples=20).shifted


def test_reference_is_saved_and_loaded(tiny_model: sidenet.AdaptiveModel, make_mainnet, tmp_path: Path) -> None:
    tiny_model.set_reference(np.linspace(0.3, 1.0, 64))
    tiny_model.policy_kind = "margin"
    tiny_model.temperature = 1.7
    sidenet.save_sidenet(tiny_model, tmp_path / "s")
    loaded = sidenet.load_sidenet(make_mainnet(), tmp_path / "s")
    torch.testing.assert_close(loaded.reference_confidence, tiny_model.reference_confidence)
    assert loaded.policy_kind == "margin" and loaded.temperature == pytest.approx(1.7)
    # saving again without a reference removes the stale file
    tiny_model.reference_confidence = None
    sidenet.save_sidenet(tiny_model, tmp_path / "s")
    assert sidenet.load_sidenet(make_mainnet(), tmp_path / "s").reference_confidence is None
    with pytest.raises(ValueError, match="finite"):
        tiny_model.set_reference([float("nan")])
