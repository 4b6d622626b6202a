"""Calibration metrics against hand computations and synthetic models whose calibration is known;
temperature scaling recovers a planted temperature; reliability diagrams are written."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sidenet.calibration import calibration_metrics, fit_temperature, reliability_bins, reliability_diagram


def planted(n: int, classes: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z / temperature): calibrated after dividing by it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(n, classes))
    probs = torch.softmax(torch.as_tensor(logits / temperature), dim=1).numpy()
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return logits, labels


def test_metrics_by_hand() -> None:
    # Two samples, two classes: probabilities (0.8, 0.2) with label 0, (0.4, 0.6) with label 0.
    logits = np.log(np.array([[0.8, 0.2], [0.4, 0.6]]))
    m = calibration_metrics(logits, [0, 0], bins=10)
    assert m.accuracy == pytest.approx(0.5)
    assert m.mean_confidence == pytest.approx(0.7)
    # bins (0.7, 0.8] holds 0.8 (right), (0.5, 0.6] holds 0.6 (wrong): gaps 0.2 and 0.6
    assert m.ece == pytest.approx(0.5 * 0.2 + 0.5 * 0.6)
    assert m.mce == pytest.approx(0.6)
    assert m.brier == pytest.approx(((0.2**2 + 0.2**2) + (0.6**2 + 0.6**2)) / 2)
    assert m.nll == pytest.approx(-(math.log(0.8) + math.log(0.4)) / 2)


def test_calibrated_model_has_small_ece_and_overconfident_large() -> None:
    logits, labels = planted(20000, 5, temperature=1.0)
    calibrated = calibration_metrics(logits, labels)
    overconfident = calibration_metrics(3.0 * logits, labels)
    assert calibrated.ece < 0.015 and calibrated.ece_mass < 0.015
    assert overconfident.ece > 0.05
    assert overconfident.nll > calibrated.nll


@pytest.mark.parametrize("temperature", [0.5, 2.5])
def test_fit_temperature_recovers_planted_value(temperature: float) -> None:
    logits, labels = planted(20000, 4, temperature, seed=1)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(temperature, rel=0.08)
    before, after = calibration_metrics(logits, labels), calibration_metrics(logits, labels, temperature=fitted)
    assert after.nll < before.nll
    assert after.ece < before.ece
    assert after.accuracy == before.accuracy  # temperature changes no prediction


def test_equal_mass_bins_hold_equal_counts() -> None:
    rng = np.random.default_rng(0)
    confidence = rng.beta(8, 1, size=1000)
    table = reliability_bins(confidence, rng.random(1000) < confidence, bins=10, scheme="mass")
    assert len(table.count) == 10
    assert table.count.min() >= 99 and table.count.max() <= 101
    width = reliability_bins(confidence, rng.random(1000) < confidence, bins=10, scheme="width")
    assert width.count.sum() == 1000 and width.count.max() > 300  # most confidences are high


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: calibration_metrics(np.zeros(3), [0, 1, 0]), "shape"),
        (lambda: calibration_metrics(np.zeros((3, 2)), [0, 1]), "labels"),
        (lambda: calibration_metrics(np.zeros((2, 2)), [0, 2]), r"\[0, 2\)"),
        (lambda: reliability_bins([0.5], [1], bins=0), "bins"),
        (lambda: reliability_bins([0.5], [1], scheme="log"), "scheme"),
        (lambda: fit_temperature(np.full((2, 2), np.nan), [0, 1]), "NaN"),
    ],
)
def test_bad_input_raises(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_reliability_diagram_writes_png(tmp_path) -> None:
    logits, labels = planted(500, 3, 1.0)
    path = reliability_diagram(tmp_path / "rel.png", {"SideNet": (logits, labels), "MainNet": (2 * logits, labels)})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_fits_the_temperature_of_the_sidenet_logits(tiny_model, separable_loader) -> None:
    from sidenet.calibration import calibrate
    from sidenet.curve import collect

    tiny_model.fit(separable_loader, epochs=2, progress=False)
    tiny_model.temperature = 3.0  # calibrate starts from the raw logits, whatever was set before
    record = collect(tiny_model, separable_loader, progress=False)
    expected = fit_temperature(record.side_logits, record.labels)
    assert calibrate(tiny_model, separable_loader, progress=False) == pytest.approx(expected, rel=1e-5)
    assert tiny_model.temperature == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="no batches"):
        calibrate(tiny_model, [], progress=False)
