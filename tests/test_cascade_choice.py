"""Choosing a cascade's thresholds and taps: the path families (never a threshold on a sample's own
confidence), the coordinate-descent search, the choice of taps on a record whose best subset is known,
and the holdout that certification needs."""

from __future__ import annotations

import numpy as np
import pytest

from sidenet import NEVER_EXIT, SweepRecord, TradeoffCurve
from sidenet.cascade_choice import FAMILIES, choose_taps, search_thresholds, threshold_path
from sidenet.cascade_curve import CascadeCurve, CascadeRecord


def make_record(n: int = 600, k: int = 3, seed: int = 0, bias: tuple[float, ...] | None = None) -> CascadeRecord:
    """Per-sample difficulty; SideNet k agrees with the MainNet more often at later taps; its confidence
    rises with agreement (shifted per SideNet by ``bias``, as SideNets differ in calibration)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(size=n)
    labels = rng.integers(0, 5, n)
    main = np.where(rng.uniform(size=n) < 0.9, labels, (labels + 1) % 5)
    quality = np.linspace(0.4, 0.9, k)[None, :] - difficulty[:, None]
    agree = rng.uniform(size=(n, k)) < 1 / (1 + np.exp(-10 * quality))
    side = np.where(agree, main[:, None], (main[:, None] + 1 + rng.integers(0, 4, (n, k))) % 5)
    z = 5 * quality + 1.5 * agree + rng.standard_normal((n, k)) + np.asarray(bias or (0.0,) * k)[None, :]
    confidence = (0.2 + 0.8 / (1 + np.exp(-z))).astype(np.float32).astype(np.float64)
    segments = np.full((n, k + 1), 1.0 / (k + 1)) * 1e6
    return CascadeRecord(confidence, side, main, labels, segments, np.full((n, k), 0.01e6))


@pytest.mark.parametrize("family", FAMILIES)
def test_paths_run_from_never_and_never_sit_on_a_confidence(family: str) -> None:
    record = make_record(n=300, bias=(1.0, -1.0, 0.5))
    path = threshold_path(record, family, points=40)
    assert path[0] == (NEVER_EXIT,) * 3 and len(set(path)) == len(path) and len(path) <= 41
    scores = [set(np.float32(record.confidence[:, k]).tolist()) for k in range(3)]
    for vector in path:
        for k, t in enumerate(vector):
            assert float(np.float32(t)) not in scores[k] or t == 0.0, (family, k, t)
    curve = CascadeCurve(record, path)
    assert curve.exit_rate[0] == 0.0 and curve.exit_rate[-1] > 0.9
    if family in ("shared", "equal_disagreement"):  # each threshold only falls along these paths
        assert np.all(np.diff(np.array(path[1:]), axis=0) <= 0)


def test_shared_path_of_one_sidenet_is_the_single_sidenet_curve() -> None:
    record = make_record(k=1)
    single = SweepRecord(
        confidence=record.confidence[:, 0],
        side_correct=record.side_correct[:, 0],
        main_correct=record.main_correct,
        agree=record.agree[:, 0],
        trunk_side_flops=record.exit_cost(0),
        rest_flops=record.segment_flops[:, 1],
        mainnet_flops=record.mainnet_flops,
    )
    assert [v[0] for v in threshold_path(record, "shared", points=None)] == list(TradeoffCurve(single).thresholds)
    thinned = threshold_path(record, "shared", points=10)
    assert len(thinned) == 10 and thinned[0] == (NEVER_EXIT,) and thinned[-1] == (0.0,)


def test_search_meets_the_limit_and_never_does_worse_than_its_start() -> None:
    record = make_record(n=800, seed=4, bias=(1.5, -1.0, 0.0))
    curve = CascadeCurve(record, threshold_path(record, "shared"))
    for kwargs in ({"max_accuracy_drop": 0.01}, {"max_disagreement": 0.02}):
        start = curve.threshold_for(**kwargs)
        found = curve.at(search_thresholds(record, **kwargs, start=start))
        assert found["mean_flops"] <= curve.at(start)["mean_flops"]
        if "max_accuracy_drop" in kwargs:
            assert found["accuracy_drop"] <= 0.01 + 1e-12
        else:
            assert found["disagreement"] <= 0.02 + 1e-12
    budget = curve.at(search_thresholds(record, compute_budget=0.7))
    assert budget["relative_compute"] <= 0.7 + 1e-12
    assert budget["accuracy"] >= curve.at(curve.threshold_for(compute_budget=0.7))["accuracy"]


def test_search_finds_the_best_pair_on_a_small_record() -> None:
    """With two SideNets, every pair of grid thresholds is checked by brute force: coordinate descent
    from the family's choice lands within a small margin of the best pair."""
    record = make_record(n=120, k=2, seed=7, bias=(1.0, -1.0))
    grids = [threshold_path(record.restrict([k]), "shared", points=None) for k in range(2)]
    curve = CascadeCurve(record, [])
    best = min(
        curve.at((a[0], b[0]))["mean_flops"]
        for a in grids[0]
        for b in grids[1]
        if curve.at((a[0], b[0]))["accuracy_drop"] <= 0.02 + 1e-12
    )
    found = curve.at(search_thresholds(record, max_accuracy_drop=0.02))
    assert found["accuracy_drop"] <= 0.02 + 1e-12 and found["mean_flops"] <= 1.05 * best


def _record_with_one_good_tap() -> CascadeRecord:
    """Four SideNets: 0 is useless (never agrees, never confident), 1 is cheap and agrees on 80% of the
    samples (confident exactly there), 2 and 3 come later and add nothing over 1."""
    rng = np.random.default_rng(3)
    n = 1000
    labels = rng.integers(0, 3, n)
    main = labels.copy()
    easy = rng.uniform(size=n) < 0.8
    side = np.stack([(main + 1) % 3, np.where(easy, main, (main + 1) % 3), np.where(easy, main, (main + 2) % 3),
                     np.where(easy, main, (main + 1) % 3)], axis=1)  # fmt: skip
    noise = rng.uniform(0, 0.05, (n, 4))
    confidence = np.where(np.stack([np.zeros(n, bool), easy, easy, easy], axis=1), 0.9, 0.5) + noise
    segments = np.tile([0.1, 0.1, 0.3, 0.2, 0.3], (n, 1)) * 1e6
    return CascadeRecord(confidence, side, main, labels, segments, np.full((n, 4), 0.01e6), taps=("a", "b", "c", "d"))


@pytest.mark.parametrize("method", ["exhaustive", "greedy"])
def test_choose_taps_keeps_the_obviously_best_subset(method: str) -> None:
    record = _record_with_one_good_tap()
    choice = choose_taps(record, max_accuracy_drop=0.0, method=method)
    assert choice.columns == (1,) and choice.taps == ("b",) and choice.method == method
    assert choice.point["accuracy_drop"] == 0.0 and choice.point["exit_rate"] == pytest.approx(0.8, abs=0.05)
    expected = CascadeCurve(record.restrict([1]), []).at(choice.thresholds)
    assert choice.point["relative_compute"] == pytest.approx(expected["relative_compute"])
    tried = {candidate["columns"] for candidate in choice.candidates}
    assert () in tried and (1,) in tried
    if method == "exhaustive":
        assert len(tried) == 2**4


def test_choose_taps_prefers_the_mainnet_when_no_sidenet_helps() -> None:
    record = _record_with_one_good_tap().restrict([0])
    choice = choose_taps(record, max_accuracy_drop=0.0)
    assert choice.columns == () and choice.thresholds == () and choice.point["relative_compute"] == 1.0


def test_certified_choice_needs_a_holdout_and_certifies_on_it() -> None:
    record = make_record(n=2000, seed=9)
    with pytest.raises(ValueError, match="holdout"):
        choose_taps(record, max_disagreement=0.05, confidence=0.9)
    choice = choose_taps(record, max_disagreement=0.05, confidence=0.9, holdout=0.5, seed=1)
    held = record.subset(np.sort(np.random.default_rng(1).permutation(len(record))[:1000]))
    assert choice.columns
    curve = CascadeCurve(held.restrict(choice.columns), [])
    assert choice.point == curve.at(choice.thresholds) and choice.point["disagreement"] <= 0.05


def test_clear_errors() -> None:
    record = make_record(n=50)
    with pytest.raises(ValueError, match="unknown threshold family 'best'"):
        threshold_path(record, "best")
    with pytest.raises(ValueError, match="points must be at least 2"):
        threshold_path(record, "shared", points=1)
    with pytest.raises(ValueError, match="method must be"):
        choose_taps(record, max_accuracy_drop=0.01, method="dp")
    with pytest.raises(ValueError, match="exactly one"):
        search_thresholds(record)
    with pytest.raises(ValueError, match=r"max_disagreement must be a fraction in \[0, 1\], got 2.0"):
        search_thresholds(record, max_disagreement=2)
    with pytest.raises(ValueError, match="holdout is the fraction"):
        choose_taps(record, max_accuracy_drop=0.01, holdout=1.5)


@pytest.mark.parametrize("limit", [{"max_disagreement": 0.02}, {"max_accuracy_drop": 0.01}])
def test_auto_family_is_at_least_as_good_as_each_family_on_the_choosing_data(limit: dict) -> None:
    record = make_record(n=800, k=3, seed=3, bias=(0.1, -0.1, 0.0))
    auto = choose_taps(record, **limit)
    assert auto.family in FAMILIES
    for family in FAMILIES:
        single = choose_taps(record, **limit, family=family)
        assert auto.point["relative_compute"] <= single.point["relative_compute"] + 1e-12
    # The chosen family's own path reproduces the chosen point.
    again = choose_taps(record, **limit, family=auto.family)
    assert again.columns == auto.columns and again.thresholds == auto.thresholds


def test_rank_compares_subsets_on_the_choosing_part() -> None:
    """``rank`` decides between subsets (here: it prefers the last tap alone) and sees only the samples the
    subsets are chosen on, never the held-out ones that certify the thresholds."""
    record = make_record(n=400, k=3)
    seen: list[int] = []

    def rank(columns: tuple[int, ...], chosen_on: CascadeRecord, thresholds: tuple[float, ...]) -> float:
        seen.append(len(chosen_on))
        assert len(thresholds) == len(columns)
        return 0.01 if columns == (2,) else 0.99

    choice = choose_taps(record, max_accuracy_drop=0.02, confidence=0.9, holdout=0.5, rank=rank)
    assert choice.columns == (2,) and set(seen) == {200}
    assert all(c["point"] is None or "ranked_compute" in c["point"] for c in choice.candidates if c["columns"])
