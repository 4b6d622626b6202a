"""The cascade trade-off: the record's FLOPs bookkeeping, exit stages against a per-sample loop, the
equivalences (all never = the MainNet, first threshold 0 = the first SideNet, one SideNet = the
single-SideNet TradeoffCurve), threshold choice, its finite-sample guarantee, outputs and errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidenet import NEVER_EXIT, SweepRecord, TradeoffCurve
from sidenet.cascade_choice import threshold_path
from sidenet.cascade_curve import CascadeCurve, CascadeRecord, exit_stages

HYPOTHESIS = settings(max_examples=25, deadline=None)
# Few distinct float32 values, so that ties within and across SideNets are common.
SCORES = [float(np.float32(v)) for v in (0.3, 0.5, 0.75, 0.9, 1.0)]


def make_record(n: int = 400, k: int = 3, seed: int = 0, labels: bool = True, constant: bool = False) -> CascadeRecord:
    """SideNets that agree with the MainNet more often at later taps, confidence tied to agreement."""
    rng = np.random.default_rng(seed)
    classes = 4
    truth = rng.integers(0, classes, n)
    main = np.where(rng.uniform(size=n) < 0.9, truth, (truth + 1) % classes)
    agree = rng.uniform(size=(n, k)) < np.linspace(0.5, 0.9, k)[None, :]
    side = np.where(agree, main[:, None], (main[:, None] + 1 + rng.integers(0, classes - 1, (n, k))) % classes)
    confidence = np.clip(0.55 + 0.3 * agree + 0.2 * rng.standard_normal((n, k)), 0.25, 1.0)
    confidence = confidence.astype(np.float32).astype(np.float64)
    scale = np.ones(n) if constant else rng.uniform(0.5, 1.5, n)
    segments = np.linspace(1.0, 2.0, k + 1)[None, :] * scale[:, None] * 1e6
    return CascadeRecord(
        confidence=confidence,
        side_predictions=side,
        main_predictions=main,
        labels=truth if labels else None,
        segment_flops=segments,
        side_flops=0.05e6 * scale[:, None] * np.ones((1, k)),
        taps=tuple(f"layer{i}" for i in range(k)),
    )


def brute_force(record: CascadeRecord, thresholds: tuple[float, ...]) -> dict[str, float]:
    """Every sample walked through the cascade one SideNet at a time."""
    correct = disagree = flops = 0.0
    for i in range(len(record)):
        cost = 0.0
        for k, t in enumerate(thresholds):
            cost += record.segment_flops[i, k] + record.side_flops[i, k]
            if np.float32(record.confidence[i, k]) >= np.float32(t):
                answer = record.side_predictions[i, k]
                break
        else:
            cost += record.segment_flops[i, -1]
            answer = record.main_predictions[i]
        correct += answer == record.labels[i]
        disagree += answer != record.main_predictions[i]
        flops += cost
    n = len(record)
    return {"accuracy": correct / n, "disagreement": disagree / n, "mean_flops": flops / n}


@st.composite
def records_and_vectors(draw: st.DrawFn) -> tuple[CascadeRecord, tuple[float, ...]]:
    n, k = draw(st.integers(1, 12)), draw(st.integers(1, 3))

    def matrix(values: st.SearchStrategy, columns: int) -> np.ndarray:
        return np.array(draw(st.lists(st.lists(values, min_size=columns, max_size=columns), min_size=n, max_size=n)))

    score = st.one_of(st.sampled_from(SCORES), st.floats(0.25, 1.0, width=32))
    classes = st.integers(0, 2)
    record = CascadeRecord(
        confidence=matrix(score, k),
        side_predictions=matrix(classes, k),
        main_predictions=matrix(classes, 1)[:, 0],
        labels=matrix(classes, 1)[:, 0],
        segment_flops=matrix(st.floats(1.0, 1e6), k + 1),
        side_flops=matrix(st.floats(0.0, 1e4), k),
    )
    # Thresholds from each SideNet's own grid: between neighbouring distinct scores, never on one.
    grids = [[v[0] for v in threshold_path(record.restrict([c]), "shared", points=None)] for c in range(k)]
    vector = tuple(draw(st.sampled_from(grid)) for grid in grids)
    return record, vector


@HYPOTHESIS
@given(records_and_vectors())
def test_every_vector_matches_a_per_sample_walk(case: tuple[CascadeRecord, tuple[float, ...]]) -> None:
    record, vector = case
    point, expected = CascadeCurve(record, []).at(vector), brute_force(record, vector)
    for key, value in expected.items():
        assert point[key] == pytest.approx(value, rel=1e-9, abs=1e-9)


def test_all_never_is_the_mainnet_and_first_zero_is_the_first_sidenet() -> None:
    record = make_record()
    curve = CascadeCurve(record, threshold_path(record, "shared"))
    never = curve.point(0)
    assert never["thresholds"] == (NEVER_EXIT,) * 3 and never["exit_rate"] == 0.0
    assert never["accuracy"] == record.main_correct.mean() and never["disagreement"] == 0.0
    assert never["mean_flops"] == pytest.approx(record.main_cost.mean())  # every SideNet still paid
    first = curve.at((0.0, NEVER_EXIT, 0.5))
    assert first["accuracy"] == record.side_correct[:, 0].mean() and first["exit_rates"] == [1.0, 0.0, 0.0]
    assert first["disagreement"] == pytest.approx(1 - record.agree[:, 0].mean())
    assert first["mean_flops"] == pytest.approx(record.exit_cost(0).mean())


def test_flops_bookkeeping_and_restrict_keep_segment_sums() -> None:
    record = make_record(k=4)
    costs = record.stage_costs()
    for k in range(4):
        assert np.allclose(costs[:, k], record.exit_cost(k))
    assert np.allclose(costs[:, 4], record.main_cost)
    assert np.allclose(record.main_cost, record.mainnet_flops + record.side_flops.sum(axis=1))
    sub = record.restrict([1, 3])
    assert sub.taps == ("layer1", "layer3") and sub.num_taps == 2
    assert np.allclose(sub.mainnet_flops, record.mainnet_flops)
    assert np.allclose(sub.segment_flops[:, 0], record.segment_flops[:, :2].sum(axis=1))
    assert np.allclose(sub.segment_flops[:, 1], record.segment_flops[:, 2:4].sum(axis=1))
    assert np.allclose(sub.exit_cost(1), record.segment_flops[:, :4].sum(axis=1) + record.side_flops[:, [1, 3]].sum(1))
    assert np.array_equal(sub.confidence, record.confidence[:, [1, 3]])
    whole = record.restrict(range(4))
    assert np.array_equal(whole.segment_flops, record.segment_flops)
    half = record.subset(np.arange(len(record)) % 2 == 0)
    assert len(half) == len(record) // 2 and half.taps == record.taps


@HYPOTHESIS
@given(
    st.lists(st.sampled_from(SCORES), min_size=1, max_size=40),
    st.lists(st.booleans(), min_size=40, max_size=40),
    st.booleans(),
)
def test_one_sidenet_matches_the_single_sidenet_curve(scores: list[float], flags: list[bool], lengths: bool) -> None:
    """A cascade of length one is the SideNet of TradeoffCurve: same points, same threshold choices."""
    n = len(scores)
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 3, n)
    main = np.where(np.array(flags[:n]), labels, (labels + 1) % 3)
    side = np.where(rng.uniform(size=n) < 0.7, main, (main + 2) % 3)
    scale = rng.uniform(0.5, 1.5, n) if lengths else np.ones(n)
    segments, side_flops = np.stack([2e5 * scale, 8e5 * scale], axis=1), 1e4 * scale[:, None]
    record = CascadeRecord(np.array(scores)[:, None], side[:, None], main, labels, segments, side_flops)
    single = SweepRecord(
        confidence=np.array(scores),
        side_correct=side == labels,
        main_correct=main == labels,
        agree=side == main,
        trunk_side_flops=segments[:, 0] + side_flops[:, 0],
        rest_flops=segments[:, 1],
        mainnet_flops=segments.sum(axis=1),
    )
    reference = TradeoffCurve(single)
    curve = CascadeCurve(record, threshold_path(record, "shared", points=None))
    assert [v[0] for v in curve.path] == list(reference.thresholds)
    for name in ("accuracy", "disagreement", "exit_rate", "relative_compute"):
        assert np.allclose(getattr(curve, name), getattr(reference, name), rtol=1e-12, atol=1e-12), name
    for kwargs in ({"max_accuracy_drop": 0.05}, {"max_disagreement": 0.1}, {"compute_budget": 0.9}):
        for confidence in (None, 0.9):
            try:
                expected = reference.threshold_for(**kwargs, confidence=confidence)
            except ValueError:
                with pytest.raises(ValueError, match="compute_budget"):
                    curve.threshold_for(**kwargs, confidence=confidence)
                continue
            assert curve.threshold_for(**kwargs, confidence=confidence) == (expected,)


def test_exit_stages_compare_in_float32() -> None:
    below = np.nextafter(0.1, 0.0)  # a float64 just under 0.1, the same float32
    confidence = np.array([[below, 0.2], [0.05, 0.2], [0.05, 0.01]])
    assert exit_stages(confidence, (0.1, 0.1)).tolist() == [0, 1, 2]
    assert exit_stages(confidence, (NEVER_EXIT, NEVER_EXIT)).tolist() == [2, 2, 2]
    assert exit_stages(confidence, (0.0, NEVER_EXIT)).tolist() == [0, 0, 0]


def test_threshold_for_on_the_data_picks_the_cheapest_point_within_the_limit() -> None:
    record = make_record(n=600, seed=3)
    curve = CascadeCurve(record, threshold_path(record, "equal_disagreement"))
    for drop in (0.0, 0.01, 0.03):
        chosen = curve.at(curve.threshold_for(max_accuracy_drop=drop))
        within = curve.accuracy >= curve.mainnet_accuracy - drop - 1e-12
        assert chosen["accuracy_drop"] <= drop + 1e-12
        assert chosen["mean_flops"] == curve.mean_flops[within].min()
    chosen = curve.at(curve.threshold_for(max_disagreement=0.02))
    assert chosen["disagreement"] <= 0.02 and chosen["mean_flops"] == curve.mean_flops[curve.disagreement <= 0.02].min()
    budget = curve.at(curve.threshold_for(compute_budget=0.8))
    cheap = curve.relative_compute <= 0.8
    assert budget["relative_compute"] <= 0.8 and budget["accuracy"] == curve.accuracy[cheap].max()
    with pytest.raises(ValueError, match="no threshold vector meets compute_budget"):
        curve.threshold_for(compute_budget=0.01)


def test_certified_choice_keeps_its_promise_in_simulation() -> None:
    """Learn then Test along a path fixed on other data: over 200 calibration draws, the chosen vector's
    disagreement on the population exceeds the limit in at most about delta of them."""
    population = make_record(n=40_000, seed=11)
    path = threshold_path(make_record(n=2_000, seed=12), "equal_disagreement", points=60)
    truth = CascadeCurve(population, path)
    index = {vector: i for i, vector in enumerate(truth.path)}
    limit, delta, draws = 0.08, 0.1, 200
    rng = np.random.default_rng(0)
    violations = naive_violations = 0
    for _ in range(draws):
        calibration = CascadeCurve(population.subset(rng.choice(len(population), 300, replace=False)), path)
        violations += (
            truth.disagreement[index[calibration.threshold_for(max_disagreement=limit, confidence=1 - delta)]] > limit
        )
        naive_violations += truth.disagreement[index[calibration.threshold_for(max_disagreement=limit)]] > limit
    # Binomial(200, 0.1) exceeds 0.15 with probability < 0.02; the uncertified choice fails far more often.
    assert violations / draws <= delta + 0.05
    assert naive_violations / draws > 0.3


def test_certified_budget_holds_on_the_population() -> None:
    population = make_record(n=20_000, seed=5)
    path = threshold_path(make_record(n=2_000, seed=6), "shared", points=50)
    truth = CascadeCurve(population, path)
    index = {vector: i for i, vector in enumerate(truth.path)}
    rng = np.random.default_rng(1)
    failures = 0
    for _ in range(40):
        calibration = CascadeCurve(population.subset(rng.choice(len(population), 400, replace=False)), path)
        chosen = calibration.threshold_for(compute_budget=0.85, confidence=0.9)
        failures += truth.mean_flops[index[chosen]] > 0.85 * calibration.mainnet_flops
    assert failures <= 8


def test_oracle_exits_at_the_first_agreeing_sidenet() -> None:
    record = make_record(n=200, seed=2)
    curve = CascadeCurve(record, threshold_path(record, "shared", points=20))
    oracle = curve.oracle()
    agree = record.agree
    first = np.where(agree.any(axis=1), agree.argmax(axis=1), record.num_taps)
    expected = np.mean(record.stage_costs()[np.arange(len(record)), first])
    assert oracle["mean_flops"] == pytest.approx(expected) and oracle["disagreement"] == 0.0
    assert oracle["accuracy"] == curve.mainnet_accuracy and oracle["exit_rate"] == pytest.approx(
        agree.any(axis=1).mean()
    )
    vector = curve.path[len(curve) // 2]
    saved = 1 - curve.at(vector)["relative_compute"]
    assert curve.oracle_fraction(vector) == pytest.approx(saved / (1 - oracle["relative_compute"]))


def test_without_labels_disagreement_still_works() -> None:
    record = make_record(labels=False)
    curve = CascadeCurve(record, threshold_path(record, "shared", points=30))
    assert np.isnan(curve.accuracy).all() and math.isnan(curve.mainnet_accuracy)
    assert curve.at(curve.threshold_for(max_disagreement=0.05))["disagreement"] <= 0.05
    with pytest.raises(ValueError, match="needs labels"):
        curve.threshold_for(max_accuracy_drop=0.01)
    assert "NaN" not in json.dumps(curve.to_dict())


def test_outputs(tmp_path) -> None:
    record = make_record(n=300)
    curve = CascadeCurve(record, threshold_path(record, "geometric", points=25))
    chosen = curve.threshold_for(max_accuracy_drop=0.01)
    table = curve.table(rows=5, marks={"chosen": chosen})
    assert "never/never/never" in table and "<- chosen" in table and "Oracle" in table
    data = json.loads(curve.save_json(tmp_path / "curve.json").read_text())
    assert data["thresholds"][0] == [None, None, None] and len(data["accuracy"]) == len(curve)
    assert data["taps"] == ["layer0", "layer1", "layer2"]
    assert curve.plot(tmp_path / "curve.png", marks={"chosen": chosen}).stat().st_size > 1000


def test_clear_errors() -> None:
    record = make_record(n=20)
    with pytest.raises(ValueError, match=r"side_flops must have shape \(20, 3\)"):
        CascadeRecord(record.confidence, record.side_predictions, record.main_predictions, None,
                      record.segment_flops, record.side_flops[:, :2])  # fmt: skip
    with pytest.raises(ValueError, match=r"segment_flops must have shape \(20, 4\)"):
        CascadeRecord(record.confidence, record.side_predictions, record.main_predictions, None,
                      record.side_flops, record.side_flops)  # fmt: skip
    with pytest.raises(ValueError, match="confidence must be"):
        CascadeRecord(record.confidence[:, 0], record.side_predictions, record.main_predictions, None,
                      record.segment_flops, record.side_flops)  # fmt: skip
    with pytest.raises(ValueError, match="taps must name the K=3"):
        CascadeRecord(record.confidence, record.side_predictions, record.main_predictions, None,
                      record.segment_flops, record.side_flops, taps=("a",))  # fmt: skip
    with pytest.raises(ValueError, match="sorted distinct"):
        record.restrict([2, 1])
    with pytest.raises(ValueError, match="sorted distinct"):
        record.restrict([0, 3])
    curve = CascadeCurve(record, [])
    with pytest.raises(ValueError, match="one threshold per SideNet"):
        curve.at((0.5, 0.5))
    with pytest.raises(ValueError, match="threshold must lie in"):
        curve.at((0.5, 0.5, 1.5))
    with pytest.raises(ValueError, match="exactly one"):
        curve.threshold_for(max_accuracy_drop=0.01, max_disagreement=0.01)
    with pytest.raises(ValueError, match="confidence is 1 - delta"):
        curve.threshold_for(max_disagreement=0.01, confidence=1.0)
    with pytest.raises(ValueError, match="must be a number"):
        curve.threshold_for(max_disagreement="0.1")
    with pytest.raises(ValueError, match="zero samples"):
        CascadeCurve(record.subset(np.zeros(20, dtype=bool)), [])


def test_table_columns_stay_aligned_with_long_vectors() -> None:
    """Five SideNets' threshold vectors are wider than the default column: every row still lines up."""
    record = make_record(n=200, k=5)
    curve = CascadeCurve(record, threshold_path(record, "equal_disagreement", 10))
    lines = curve.table(4, marks={"saved thresholds": curve.path[3]}).splitlines()
    header, rows = lines[2], lines[3:]
    width = header.index("thresholds") + len("thresholds")
    assert header[width + 1 : width + 10].strip() == "accuracy"
    for row in rows:
        float(row[width + 1 : width + 10])  # the accuracy, in the accuracy column
    assert rows[-1].endswith("<- saved thresholds")
