"""The trade-off curve: every point checked against a brute-force recomputation, threshold choice,
errors, the sweep's agreement with the routed model, plotting and JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from helpers import NUM_CLASSES, separable_dataset, threshold_between
from sidenet import NEVER_EXIT, AdaptiveModel, ExitPolicy, SweepRecord, TradeoffCurve, collect, sweep

HYPOTHESIS = settings(max_examples=25, deadline=None)
# A few values so that ties are common, plus arbitrary ones; all float32 values, as the SideNet's
# confidences are (the curve compares thresholds in float32, like the exit policy).
CONFIDENCE = st.one_of(
    st.sampled_from([float(np.float32(v)) for v in (0.25, 0.5, 0.75, 0.9, 1.0)]), st.floats(0.25, 1.0, width=32)
)


@st.composite
def records(draw: st.DrawFn) -> SweepRecord:
    n = draw(st.integers(1, 30))
    bools = st.lists(st.booleans(), min_size=n, max_size=n)
    uniform_flops = draw(st.booleans())
    rest = (
        [draw(st.floats(1.0, 1e6))] * n
        if uniform_flops
        else draw(st.lists(st.floats(0.0, 1e6), min_size=n, max_size=n))
    )
    trunk_side = draw(st.lists(st.floats(1.0, 1e5), min_size=n, max_size=n))
    rest_arr, trunk_side_arr = np.array(rest), np.array(trunk_side)
    side_correct, main_correct = np.array(draw(bools)), np.array(draw(bools))
    return SweepRecord(
        confidence=np.array(draw(st.lists(CONFIDENCE, min_size=n, max_size=n)), dtype=np.float64),
        side_correct=side_correct,
        main_correct=main_correct,
        agree=side_correct == main_correct,
        trunk_side_flops=trunk_side_arr,
        rest_flops=rest_arr,
        # The MainNet alone: trunk + rest, a little less than trunk + SideNet + rest.
        mainnet_flops=0.9 * trunk_side_arr + rest_arr,
    )


def brute_force(record: SweepRecord, threshold: float) -> dict[str, float]:
    # float32, as the exit policy compares the SideNet's float32 confidences
    exited = record.confidence.astype(np.float32) >= np.float32(threshold)
    flops = np.mean(record.trunk_side_flops + np.where(exited, 0.0, record.rest_flops))
    return {
        "accuracy": float(np.mean(np.where(exited, record.side_correct, record.main_correct))),
        "exit_rate": float(exited.mean()),
        "mean_flops": float(flops),
        "relative_compute": float(flops / record.mainnet_flops.mean()),
    }


def assert_point(point: dict[str, float], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert point[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def assert_between_samples(record: SweepRecord, threshold: float) -> None:
    """``threshold`` sits on no sample's float32 confidence, except when the lowest confidence that
    exits at it is the float32 right after the highest that does not (nothing lies between them)."""
    scores = record.confidence.astype(np.float32)
    if threshold == NEVER_EXIT or threshold == 0.0:
        return
    if np.float32(threshold) in scores:
        exiting, staying = scores[scores >= np.float32(threshold)], scores[scores < np.float32(threshold)]
        assert len(staying) and np.nextafter(staying.max(), np.float32(np.inf)) == exiting.min(), threshold


@HYPOTHESIS
@given(record=records())
def test_every_point_matches_brute_force(record: SweepRecord) -> None:
    curve = TradeoffCurve(record)
    distinct = sorted(set(record.confidence.tolist()), reverse=True)
    assert len(curve) == len(distinct) + 1
    # Point i exits the samples down to the i-th distinct confidence, with a threshold between that
    # confidence and the next lower one (0 for the last point).
    assert curve.thresholds[0] == NEVER_EXIT and curve.thresholds[-1] == 0.0
    for i, threshold in enumerate(curve.thresholds[1:-1], start=1):
        assert np.float32(distinct[i]) < np.float32(threshold) <= np.float32(distinct[i - 1])
    for i, threshold in enumerate(curve.thresholds):
        point = curve.point(i)
        assert point["threshold"] == threshold
        assert_point(point, brute_force(record, threshold))
        assert point["accuracy_drop"] == pytest.approx(curve.mainnet_accuracy - point["accuracy"])
    # First point: the MainNet answers everything; last: the SideNet answers everything.
    assert curve.accuracy[0] == pytest.approx(record.main_correct.mean())
    assert curve.exit_rate[0] == 0 and curve.exit_rate[-1] == 1
    assert curve.accuracy[-1] == pytest.approx(record.side_correct.mean())
    assert curve.mainnet_accuracy == pytest.approx(record.main_correct.mean())
    assert curve.sidenet_accuracy == pytest.approx(record.side_correct.mean())
    assert np.all(np.diff(curve.exit_rate) > 0)


@HYPOTHESIS
@given(record=records(), threshold=st.one_of(CONFIDENCE, st.floats(0.0, 1.0), st.just(NEVER_EXIT)))
def test_at_matches_brute_force(record: SweepRecord, threshold: float) -> None:
    assert_point(TradeoffCurve(record).at(threshold), brute_force(record, threshold))


@HYPOTHESIS
@given(record=records(), drop=st.one_of(st.just(0.0), st.floats(0.0, 1.0)))
def test_threshold_for_accuracy_drop_is_cheapest_feasible(record: SweepRecord, drop: float) -> None:
    curve = TradeoffCurve(record)
    chosen = curve.threshold_for(max_accuracy_drop=drop)
    assert chosen in curve.thresholds.tolist()
    mainnet_accuracy = record.main_correct.mean()
    candidates = [NEVER_EXIT, *set(record.confidence.tolist())]
    feasible = [t for t in candidates if brute_force(record, t)["accuracy"] >= mainnet_accuracy - drop - 1e-9]
    assert NEVER_EXIT in feasible  # never exiting is always feasible
    picked = brute_force(record, chosen)
    assert picked["accuracy"] >= mainnet_accuracy - drop - 1e-9
    assert picked["mean_flops"] <= min(brute_force(record, t)["mean_flops"] for t in feasible) + 1e-6


@HYPOTHESIS
@given(record=records(), budget=st.floats(0.0, 1.5))
def test_threshold_for_compute_budget_is_most_accurate_under_budget(record: SweepRecord, budget: float) -> None:
    curve = TradeoffCurve(record)
    candidates = [NEVER_EXIT, *set(record.confidence.tolist())]
    under = [t for t in candidates if brute_force(record, t)["relative_compute"] <= budget + 1e-12]
    if not under:
        with pytest.raises(ValueError, match="no threshold meets compute_budget"):
            curve.threshold_for(compute_budget=budget)
        return
    chosen = curve.threshold_for(compute_budget=budget)
    picked = brute_force(record, chosen)
    assert picked["relative_compute"] <= budget + 1e-9
    best = max(brute_force(record, t)["accuracy"] for t in under)
    assert picked["accuracy"] == pytest.approx(best)
    cheapest_best = min(
        brute_force(record, t)["mean_flops"] for t in under if brute_force(record, t)["accuracy"] >= best - 1e-12
    )
    assert picked["mean_flops"] == pytest.approx(cheapest_best)


def simple_record() -> SweepRecord:
    confidence = np.array([0.95, 0.9, 0.9, 0.6, 0.4])
    side = np.array([True, True, False, False, True])
    main = np.array([True, True, True, True, False])
    n = len(confidence)
    return SweepRecord(confidence, side, main, side == main, np.full(n, 10.0), np.full(n, 90.0), np.full(n, 95.0))


def test_simple_curve_by_hand() -> None:
    curve = TradeoffCurve(simple_record())
    # Midway between neighbouring confidences (0.95, 0.9, 0.6, 0.4), in float32; 0 exits everyone.
    assert curve.thresholds.tolist() == pytest.approx([NEVER_EXIT, 0.925, 0.75, 0.5, 0.0], abs=1e-6)
    assert curve.exits.tolist() == [0, 1, 3, 4, 5]
    assert curve.accuracy.tolist() == pytest.approx([0.8, 0.8, 0.6, 0.4, 0.6])
    assert curve.mean_flops.tolist() == pytest.approx([100, 82, 46, 28, 10])
    assert curve.mainnet_flops == 95.0
    assert curve.threshold_for(max_accuracy_drop=0.0) == pytest.approx(0.925)
    assert curve.threshold_for(max_accuracy_drop=0.2) == 0.0
    assert curve.threshold_for(compute_budget=0.9) == pytest.approx(0.925)
    assert curve.threshold_for(compute_budget=0.5) == 0.0  # exiting down to 0.9 is as accurate but dearer
    assert curve.threshold_for(compute_budget=10 / 95) == 0.0
    assert [curve.index_of(t) for t in curve.thresholds] == list(range(len(curve)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"max_accuracy_drop": 0.01, "compute_budget": 0.5}, "exactly one"),
        ({"max_accuracy_drop": -0.1}, "max_accuracy_drop"),
        ({"max_accuracy_drop": 1.5}, "max_accuracy_drop"),
        ({"max_accuracy_drop": math.nan}, "max_accuracy_drop"),
        ({"compute_budget": 0.01}, "cheapest point costs 0.105"),
        ({"compute_budget": -1.0}, "compute_budget"),
    ],
)
def test_threshold_for_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TradeoffCurve(simple_record()).threshold_for(**kwargs)


def test_empty_record_raises() -> None:
    empty = np.array([])
    with pytest.raises(ValueError, match="zero samples"):
        TradeoffCurve(SweepRecord(empty, empty, empty, empty, empty, empty, empty))


def test_table_json_and_plot(tmp_path) -> None:
    curve = TradeoffCurve(simple_record())
    table = curve.table(rows=4, marks={"chosen": 0.9})
    assert "never" in table and "<- chosen" in table and "5 samples" in table
    data = json.loads(curve.save_json(tmp_path / "curve.json").read_text())
    assert data["thresholds"][0] is None and data["thresholds"][1:] == pytest.approx([0.925, 0.75, 0.5, 0.0], abs=1e-6)
    assert data["accuracy"] == pytest.approx(curve.accuracy.tolist()) and data["num_samples"] == 5
    path = curve.plot(tmp_path / "plots" / "curve.png", marks={"chosen": 0.9}, title="test")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 1000


# -- sweep on a real (tiny) model -------------------------------------------------------------------


@pytest.fixture()
def trained(tiny_model: AdaptiveModel, separable_loader) -> tuple[AdaptiveModel, DataLoader]:
    tiny_model.fit(separable_loader, epochs=1, lr=3e-3, batch_size=32, progress=False)
    # Half separable images, half noise with random labels: confidences spread over (1/C, 1].
    x, y = separable_dataset(48, seed=11).tensors
    generator = torch.Generator().manual_seed(12)
    noise = torch.randn(48, *x.shape[1:], generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (48,), generator=generator)
    dataset = TensorDataset(torch.cat([x, noise]), torch.cat([y, labels]))
    return tiny_model, DataLoader(dataset, batch_size=24)


@torch.no_grad()
def run_at(model: AdaptiveModel, loader: DataLoader, threshold: float, mode: str = "adaptive") -> dict[str, float]:
    model.threshold = threshold
    exited, correct, flops = [], [], []
    for x, y in loader:
        out = model(x, mode=mode)
        exited.append(out.exited)
        correct.append(out.predictions == y)
        flops.append(out.flops)
    return {
        "exit_rate": float(torch.cat(exited).float().mean()),
        "accuracy": float(torch.cat(correct).float().mean()),
        "mean_flops": float(torch.cat(flops).double().mean()),
    }


def test_sweep_agrees_with_the_routed_model(trained: tuple[AdaptiveModel, DataLoader]) -> None:
    model, loader = trained
    curve = sweep(model, loader, progress=False)
    assert curve.num_samples == 96
    assert len(curve) > 40  # confidences are (nearly all) distinct
    assert curve.mainnet_accuracy == pytest.approx(run_at(model, loader, 0.5, mode="main")["accuracy"])
    assert curve.sidenet_accuracy == pytest.approx(run_at(model, loader, 0.5, mode="side")["accuracy"])
    chosen = [
        curve.threshold_for(max_accuracy_drop=0.0),
        curve.threshold_for(max_accuracy_drop=0.05),
        curve.threshold_for(compute_budget=0.7),
        *curve.thresholds[:: max(1, len(curve) // 6)].tolist(),
        float(curve.thresholds[-1]),
    ]
    assert any(0.2 < curve.at(t)["exit_rate"] < 0.8 for t in chosen)
    for threshold in chosen:
        assert_between_samples(curve.record, threshold)
        expected = curve.at(threshold)
        measured = run_at(model, loader, threshold)
        assert measured["exit_rate"] == pytest.approx(expected["exit_rate"]), threshold
        assert measured["accuracy"] == pytest.approx(expected["accuracy"]), threshold
        assert measured["mean_flops"] == pytest.approx(expected["mean_flops"]), threshold
    assert curve.at(NEVER_EXIT)["accuracy"] == pytest.approx(curve.mainnet_accuracy)
    assert curve.point(len(curve) - 1)["exit_rate"] == 1.0


def test_sweep_uses_the_model_temperature(trained: tuple[AdaptiveModel, DataLoader]) -> None:
    model, loader = trained
    model.temperature = 1.0
    sharp = sweep(model, loader, progress=False)
    model.temperature = 3.0
    soft = sweep(model, loader, progress=False)
    assert soft.record.confidence.max() < sharp.record.confidence.max()
    # Between two samples' confidences, not on the median sample's own (which could flip its exit).
    threshold = threshold_between(soft.record.confidence, 0.5)
    assert 0.3 < soft.at(threshold)["exit_rate"] < 0.7
    assert run_at(model, loader, threshold)["exit_rate"] == pytest.approx(soft.at(threshold)["exit_rate"])


def test_sweep_of_empty_loader_raises(tiny_model: AdaptiveModel) -> None:
    with pytest.raises(ValueError, match="no batches"):
        sweep(tiny_model, [], progress=False)


def test_oracle_by_hand() -> None:
    curve = TradeoffCurve(simple_record())
    # agree on samples 0 and 1 only: they exit (10 each); the other three continue (10 + 90 each)
    oracle = curve.oracle()
    assert oracle["accuracy"] == curve.mainnet_accuracy == pytest.approx(0.8)
    assert oracle["exit_rate"] == pytest.approx(0.4)
    assert oracle["mean_flops"] == pytest.approx((2 * 10 + 3 * 100) / 5)
    assert oracle["relative_compute"] == pytest.approx(64 / 95)
    # threshold 0.95 saves 1 - 82/95 of the compute, the oracle 1 - 64/95
    assert curve.oracle_fraction(0.95) == pytest.approx((1 - 82 / 95) / (1 - 64 / 95))


@HYPOTHESIS
@given(record=records())
def test_no_point_at_mainnet_accuracy_beats_the_oracle_with_uniform_costs(record: SweepRecord) -> None:
    """With equal per-sample costs, no threshold keeps every answer equal to the MainNet's and exits more
    than the oracle."""
    record.rest_flops = np.full(len(record), 50.0)
    record.trunk_side_flops = np.full(len(record), 5.0)
    curve = TradeoffCurve(record)
    oracle = curve.oracle()
    same_answers = np.flatnonzero(curve.disagreement == 0)
    assert curve.relative_compute[same_answers].min() >= oracle["relative_compute"] - 1e-12


def test_subset_and_logits_in_the_record(trained: tuple[AdaptiveModel, DataLoader]) -> None:
    model, loader = trained
    record = sweep(model, loader, progress=False).record
    assert record.side_logits.shape == record.main_logits.shape == (96, NUM_CLASSES)
    assert np.array_equal(record.side_logits.argmax(1) == record.labels, record.side_correct)
    assert record.exit_rule is model.policy  # frozen: the record keeps the model's rule itself
    half = record.subset(np.arange(48))
    assert len(half) == 48 and np.array_equal(half.labels, record.labels[:48])
    assert half.exit_rule is record.exit_rule


def test_collect_records_nothing_in_the_monitor(trained: tuple[AdaptiveModel, DataLoader]) -> None:
    model, loader = trained
    model.reset_stats()
    collect(model, loader, progress=False)
    assert model.samples_seen == 0 and len(model.recent_confidence) == 0


def test_the_old_policy_dict_still_reads_and_writes(trained: tuple[AdaptiveModel, DataLoader]) -> None:
    """``SweepRecord.policy`` (a {kind, temperature} dict) gave way to ``exit_rule``; until every caller
    moves over it still reads, and ``dataclasses.replace(record, policy=...)`` still sets the rule."""
    model, loader = trained
    record = collect(model, loader, progress=False)
    assert record.policy == {"kind": "max_softmax", "temperature": model.temperature}
    rescored = dataclasses.replace(record, policy={"kind": "margin", "temperature": 2.0})
    assert (rescored.exit_rule.kind, rescored.exit_rule.temperature) == ("margin", 2.0)
    assert rescored.exit_rule.threshold == record.exit_rule.threshold
    other = ExitPolicy(0.3, 3.0, "entropy")
    assert dataclasses.replace(record, exit_rule=other).exit_rule is other  # the old dict does not win
    assert dataclasses.replace(record, confidence=record.confidence).exit_rule is record.exit_rule
    assert SweepRecord(*dataclasses.astuple(record)[:7]).policy == {}


@pytest.mark.parametrize("kind", ["entropy", "margin"])
def test_sweep_agrees_with_the_routed_model_under_other_policies(
    trained: tuple[AdaptiveModel, DataLoader], kind: str
) -> None:
    model, loader = trained
    model.policy_kind = kind
    curve = sweep(model, loader, progress=False)
    for threshold in curve.thresholds[1 :: max(1, len(curve) // 5)]:
        measured = run_at(model, loader, float(threshold))
        assert measured["exit_rate"] == pytest.approx(curve.at(float(threshold))["exit_rate"])
        assert measured["accuracy"] == pytest.approx(curve.at(float(threshold))["accuracy"])


# -- labels are checked per batch ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_labels", "message"),
    [
        (lambda y: y[:, None], r"1-D, one class index per sample, got shape \(24, 1\)"),
        (lambda y: y.reshape(2, 12), r"got shape \(2, 12\)"),
        (lambda y: y[:20], "got 20 labels for a batch of 24 inputs"),
        (lambda y: y.float(), "integer class indices, got dtype torch.float32"),
        (lambda y: y + NUM_CLASSES, rf"labels must lie in \[0, {NUM_CLASSES - 1}\]"),
        (lambda y: y - 1, rf"labels must lie in \[0, {NUM_CLASSES - 1}\]"),
    ],
)
def test_collect_refuses_bad_labels(
    tiny_model: AdaptiveModel, make_labels: Callable[[torch.Tensor], torch.Tensor], message: str
) -> None:
    # (N, 1) labels used to broadcast against (N,) predictions into an (N, N) comparison, and labels
    # out of range to score 0, both without an error.
    x, y = separable_dataset(48).tensors
    batches = [(x[:24], y[:24]), (x[24:], make_labels(y[24:]))]  # the bad batch comes second
    with pytest.raises(ValueError, match=message):
        collect(tiny_model, batches, progress=False)
    with pytest.raises(ValueError, match=message):
        sweep(tiny_model, batches, progress=False)


def test_collect_accepts_labels_as_lists_and_numpy(tiny_model: AdaptiveModel) -> None:
    x, y = separable_dataset(16).tensors
    record = collect(tiny_model, [(x[:8], y[:8].tolist()), (x[8:], y[8:].numpy().astype(np.int32))], progress=False)
    assert record.labels.dtype == np.int64 and np.array_equal(record.labels, y.numpy())


# -- thresholds lie between samples, never on one ---------------------------------------------------


@st.composite
def float32_confidences(draw: st.DrawFn) -> np.ndarray:
    """float32 confidences with ties and neighbours one float32 apart, where no threshold fits between."""
    base = draw(st.lists(CONFIDENCE, min_size=1, max_size=30))
    values = []
    for value in base:
        values.append(value)
        if draw(st.booleans()):
            step = draw(st.sampled_from([-np.inf, np.inf]))
            values.append(float(np.nextafter(np.float32(value), np.float32(step))))
    return np.clip(np.array(values, dtype=np.float32), 0.0, 1.0).astype(np.float64)


def record_of(confidence: np.ndarray, seed: int = 0) -> SweepRecord:
    rng = np.random.default_rng(seed)
    n = len(confidence)
    side, main = rng.random(n) < 0.7, rng.random(n) < 0.8
    return SweepRecord(
        confidence, side, main, rng.random(n) < 0.8, np.full(n, 10.0), np.full(n, 90.0), np.full(n, 95.0)
    )


@HYPOTHESIS
@given(confidence=float32_confidences(), limit=st.floats(0.0, 1.0))
def test_chosen_thresholds_lie_between_samples(confidence: np.ndarray, limit: float) -> None:
    curve = TradeoffCurve(record_of(confidence))
    scores = torch.as_tensor(confidence, dtype=torch.float32)
    for i, threshold in enumerate(curve.thresholds):
        # The exit rule (a float32 tensor against a Python float) exits exactly the point's samples.
        assert int((scores >= float(threshold)).sum()) == curve.exits[i]
        assert curve.index_of(float(threshold)) == i
        assert_between_samples(curve.record, float(threshold))
    assert np.all(np.diff(curve.thresholds[1:]) < 0)
    rules = [{"max_accuracy_drop": limit}, {"max_disagreement": limit}, {"compute_budget": 0.2 + limit}]
    rules += [{"max_accuracy_drop": limit, "confidence": 0.9}, {"max_disagreement": limit, "confidence": 0.5}]
    for rule in rules:
        try:
            threshold = curve.threshold_for(**rule)
        except ValueError:
            continue  # no point meets the compute budget
        assert threshold in curve.thresholds.tolist()
        assert_between_samples(curve.record, threshold)
        # The point's exit count, compared as a count: 15 / 22 * 22 is 14.999999999999998 in floats.
        assert int((scores >= threshold).sum()) == curve.exits[curve.index_of(threshold)]


def test_neighbouring_float32_confidences_share_no_threshold() -> None:
    low = np.float32(0.5)
    high = np.nextafter(low, np.float32(1.0))  # nothing lies strictly between them in float32
    curve = TradeoffCurve(record_of(np.array([high, low, 0.25, 0.75], dtype=np.float32).astype(np.float64)))
    assert curve.exits.tolist() == [0, 1, 2, 3, 4]
    # Between 0.75 and high: the float32 midway; between high and low: high itself, the one exception.
    assert curve.thresholds[1] == pytest.approx((0.75 + 0.5) / 2) and np.float32(curve.thresholds[1]) > high
    assert curve.thresholds[2] == float(high)
    assert curve.thresholds[3] == pytest.approx(0.375)
    assert curve.thresholds[4] == 0.0


def test_confidences_equal_in_float32_form_one_point() -> None:
    # Distinct in float64, one value in float32, where the exit rule compares them: one point, not two.
    curve = TradeoffCurve(record_of(np.array([0.7, 0.7 + 1e-12, 0.2])))
    assert curve.exits.tolist() == [0, 2, 3]
    assert [curve.index_of(float(t)) for t in curve.thresholds] == [0, 1, 2]
