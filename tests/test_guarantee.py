"""Thresholds with a guarantee: the p-values, fixed-sequence testing, and the promise itself checked by
simulation over many random calibration/test splits of one fixed set of scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sidenet import SweepRecord, TradeoffCurve
from sidenet.guarantee import binomial_pvalue, fixed_sequence, hoeffding_bentkus_pvalue, mean_pvalue, upper_bound


def test_binomial_pvalue_is_dual_to_clopper_pearson() -> None:
    n, delta = 500, 0.1
    for k in (0, 3, 10, 40):
        bound = upper_bound(k, n, delta)
        assert binomial_pvalue(k, n, bound + 1e-6) <= delta
        assert binomial_pvalue(k, n, bound - 1e-6) > delta


@pytest.mark.parametrize("pvalue", ["binomial", "hoeffding_bentkus"])
def test_pvalues_are_valid_under_the_null(pvalue: str) -> None:
    """With losses drawn at exactly the limit, the test rejects in at most delta of the draws."""
    rng = np.random.default_rng(0)
    n, limit, delta, draws = 300, 0.05, 0.1, 4000
    counts = rng.binomial(n, limit, size=draws)
    if pvalue == "binomial":
        rejected = np.mean([binomial_pvalue(int(k), n, limit) <= delta for k in counts])
    else:
        rejected = np.mean([hoeffding_bentkus_pvalue(k / n, n, limit) <= delta for k in counts])
    assert rejected <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    # and they do reject when the truth is well below the limit
    low = rng.binomial(n, limit / 4, size=200)
    assert np.mean([binomial_pvalue(int(k), n, limit) <= delta for k in low]) > 0.9


def test_mean_pvalue_picks_exact_test_for_binary_losses() -> None:
    losses = np.array([0, 1, 0, 0, 0, 0, 0, 0, 0, 0] * 20, dtype=float)
    assert mean_pvalue(losses, 0.3) == binomial_pvalue(20, 200, 0.3)
    graded = losses * 0.5 + 0.01
    assert mean_pvalue(graded, 0.3) == hoeffding_bentkus_pvalue(float(graded.mean()), 200, 0.3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mean_pvalue(np.array([2.0]), 0.5)


def test_fixed_sequence_stops_at_first_failure() -> None:
    assert fixed_sequence([0.01, 0.02, 0.5, 0.01], 0.05) == 2
    assert fixed_sequence([], 0.05) == 0
    assert fixed_sequence([0.2], 0.05) == 0
    with pytest.raises(ValueError, match="delta"):
        fixed_sequence([0.1], 1.5)


def test_fixed_sequence_counts_any_iterable_lazily() -> None:
    # Every hypothesis rejected: counted without len(), which a generator lacks.
    assert fixed_sequence((p for p in [0.01, 0.02, 0.03]), 0.05) == 3
    assert fixed_sequence(iter([]), 0.05) == 0
    assert fixed_sequence(np.array([0.01, 0.2]), 0.05) == 1

    def pvalues():
        yield 0.01
        yield 0.5
        raise AssertionError("read past the first p-value above delta")

    assert fixed_sequence(pvalues(), 0.05) == 1


def population(n: int = 40000, seed: int = 0) -> SweepRecord:
    """A fixed set of scores: the SideNet agrees with the MainNet (92% accurate) more often when it is
    confident; where they disagree it is right only sometimes (10 classes)."""
    rng = np.random.default_rng(seed)
    confidence = rng.beta(5, 1.2, size=n)
    main_correct = rng.random(n) < 0.92
    agree = rng.random(n) > 0.6 * (1 - confidence) ** 1.5
    side_correct = np.where(agree, main_correct, ~main_correct & (rng.random(n) < 0.3))
    return SweepRecord(
        confidence=confidence,
        side_correct=side_correct,
        main_correct=main_correct,
        agree=agree,
        trunk_side_flops=np.full(n, 20.0),
        rest_flops=np.full(n, 80.0),
        mainnet_flops=np.full(n, 98.0),
    )


def split_outcomes(rule: dict, confidence: float | None, splits: int = 150, calibration: int = 1500):
    """(test accuracy drop, test relative compute, test exit rate) of the threshold chosen on the
    calibration part of each random split."""
    pop = population()
    rng = np.random.default_rng(1)
    out = []
    for _ in range(splits):
        order = rng.permutation(len(pop))
        cal, test = TradeoffCurve(pop.subset(order[:calibration])), TradeoffCurve(pop.subset(order[calibration:]))
        threshold = cal.threshold_for(**rule, confidence=confidence)
        point = test.at(threshold)
        out.append((point["accuracy_drop"], point["relative_compute"], point["exit_rate"]))
    return np.array(out)


def test_accuracy_promise_holds_by_simulation() -> None:
    epsilon, delta, splits = 0.01, 0.1, 150
    slack = 3 * math.sqrt(delta * (1 - delta) / splits)
    guaranteed = split_outcomes({"max_accuracy_drop": epsilon}, 1 - delta, splits)
    assert np.mean(guaranteed[:, 0] > epsilon) <= delta + slack
    assert np.median(guaranteed[:, 2]) > 0.3  # not vacuous: many samples still exit
    # The same limit chosen without the guarantee breaks it far more often: the check can fail.
    naive = split_outcomes({"max_accuracy_drop": epsilon}, None, splits)
    assert np.mean(naive[:, 0] > epsilon) > delta + slack


def test_compute_promise_holds_by_simulation() -> None:
    budget, delta, splits = 0.6, 0.1, 150
    slack = 3 * math.sqrt(delta * (1 - delta) / splits)
    guaranteed = split_outcomes({"compute_budget": budget}, 1 - delta, splits)
    assert np.mean(guaranteed[:, 1] > budget) <= delta + slack
    assert np.median(guaranteed[:, 1]) > budget - 0.05  # not vacuous: close to the budget


def test_guarantee_falls_back_or_raises_on_tiny_calibration_sets() -> None:
    pop = population(30)
    curve = TradeoffCurve(pop)
    # 30 samples cannot certify a 0.1% disagreement rate: never exit
    assert curve.threshold_for(max_accuracy_drop=0.001, confidence=0.9) == math.inf
    with pytest.raises(ValueError, match="confidence 0.9"):
        curve.threshold_for(compute_budget=0.25, confidence=0.9)
    with pytest.raises(ValueError, match="1 - delta"):
        curve.threshold_for(max_accuracy_drop=0.01, confidence=1.0)


def test_guarantee_when_every_threshold_is_certified() -> None:
    """When every point passes its test, threshold_for used to call len() on a generator of p-values."""
    pop = population(2000)
    curve = TradeoffCurve(pop)
    # No mean of 0/1 losses exceeds 1: every threshold is certified, the cheapest (all exit) is chosen.
    assert curve.threshold_for(max_accuracy_drop=1.0, confidence=0.9) == curve.thresholds[-1] == 0.0
    assert curve.threshold_for(max_disagreement=1.0, confidence=0.9) == 0.0


def test_guarantee_with_a_good_sidenet_and_many_samples() -> None:
    # 5,000 calibration samples, 99.9% agreement (5 disagreements, at the lowest confidences): even
    # exiting everything is certified at a 1-point limit.
    n = 5000
    confidence = np.linspace(0.3, 1.0, n)
    agree = np.ones(n, dtype=bool)
    agree[:5] = False
    record = SweepRecord(
        confidence=confidence,
        side_correct=agree.copy(),
        main_correct=np.ones(n, dtype=bool),
        agree=agree,
        trunk_side_flops=np.full(n, 20.0),
        rest_flops=np.full(n, 80.0),
        mainnet_flops=np.full(n, 98.0),
    )
    curve = TradeoffCurve(record)
    assert curve.threshold_for(max_accuracy_drop=0.01, confidence=0.999) == 0.0
    assert curve.at(curve.threshold_for(max_accuracy_drop=0.01, confidence=0.999))["exit_rate"] == 1.0
    # A limit below the observed 0.1% cannot be certified down to every sample.
    assert curve.at(curve.threshold_for(max_accuracy_drop=0.0005, confidence=0.9))["exit_rate"] < 1.0
