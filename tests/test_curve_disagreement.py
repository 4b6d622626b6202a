"""Choosing a threshold by disagreement with the MainNet (``threshold_for(max_disagreement=...)``)."""

from __future__ import annotations

import numpy as np
import pytest

from sidenet import SweepRecord, TradeoffCurve


def record(confidence: list[float], agree: list[bool], side_ok: list[bool], main_ok: list[bool]) -> SweepRecord:
    n = len(confidence)
    return SweepRecord(
        confidence=np.array(confidence, dtype=np.float32).astype(np.float64),
        side_correct=np.array(side_ok),
        main_correct=np.array(main_ok),
        agree=np.array(agree),
        trunk_side_flops=np.full(n, 10.0),
        rest_flops=np.full(n, 90.0),
        mainnet_flops=np.full(n, 100.0),
    )


def test_disagreement_bounds_the_drop_without_cancellation() -> None:
    # Confidences 0.9 .. 0.5; the 0.8 sample disagrees and is wrong, the 0.6 one disagrees and is right.
    rec = record(
        [0.9, 0.8, 0.7, 0.6, 0.5],
        [True, False, True, False, False],
        [True, False, True, True, False],
        [True, True, True, False, True],
    )
    curve = TradeoffCurve(rec)
    assert curve.disagreement.tolist() == pytest.approx([0, 0, 0.2, 0.2, 0.4, 0.6])
    # The accuracy rule sees the loss at 0.8 cancelled by the win at 0.6 and exits four samples (the
    # threshold lies midway between the lowest exiting confidence and the next one, 0 below the last).
    assert curve.threshold_for(max_accuracy_drop=0.0) == pytest.approx(0.55)
    assert curve.threshold_for(max_disagreement=0.0) == pytest.approx(0.85)
    assert curve.threshold_for(max_disagreement=0.2) == pytest.approx(0.65)
    assert curve.threshold_for(max_disagreement=1.0) == 0.0
    assert curve.at(0.7)["disagreement"] == pytest.approx(0.2)


@pytest.mark.parametrize("seed", range(5))
def test_max_disagreement_is_cheapest_feasible(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 40
    rec = record(
        rng.choice([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], n).tolist(),
        (rng.random(n) < 0.8).tolist(),
        (rng.random(n) < 0.7).tolist(),
        (rng.random(n) < 0.8).tolist(),
    )
    curve = TradeoffCurve(rec)
    for limit in (0.0, 0.05, 0.1, 0.3):
        chosen = curve.threshold_for(max_disagreement=limit)
        exited = rec.confidence >= chosen
        assert np.mean(exited & ~rec.agree) <= limit + 1e-12
        feasible = [t for t in curve.thresholds if np.mean((rec.confidence >= t) & ~rec.agree) <= limit + 1e-12]
        assert (rec.confidence >= chosen).sum() == max((rec.confidence >= t).sum() for t in feasible)


def test_threshold_for_argument_errors() -> None:
    curve = TradeoffCurve(record([0.9, 0.6], [True, False], [True, False], [True, True]))
    with pytest.raises(ValueError, match="exactly one"):
        curve.threshold_for(max_disagreement=0.1, max_accuracy_drop=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        curve.threshold_for()
    with pytest.raises(ValueError, match="max_disagreement is a fraction"):
        curve.threshold_for(max_disagreement=1.5)
