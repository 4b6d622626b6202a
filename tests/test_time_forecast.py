"""Routed batches forecast in time (``forecast_batch_time``): each part charged one call on the rows that
reach it, at its time measured on that many rows."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import sidenet
from sidenet import NEVER_EXIT, PartSeconds, forecast_batch_time, time_weighted
from sidenet.cascade_curve import CascadeCurve, CascadeRecord
from test_cascade_choice import make_record


def one_tap_record(confidence: list[float]) -> CascadeRecord:
    n = len(confidence)
    labels = np.zeros(n, dtype=np.int64)
    return CascadeRecord(
        np.asarray(confidence)[:, None], labels[:, None], labels, labels, np.ones((n, 2)), np.ones((n, 1))
    )


def timed(batch: int, rows: tuple[int, ...], segments: list[tuple[float, ...]], sides: list[tuple[float, ...]],
          routes: list[tuple[float, ...]]) -> PartSeconds:  # fmt: skip
    return PartSeconds(
        tuple(s[-1] / batch for s in segments), tuple(s[-1] / batch for s in sides), batch_size=batch,
        device="cpu", dtype="float32", repeats=1, rows=rows, segment_calls=tuple(segments),
        side_calls=tuple(sides), route_calls=tuple(routes),
    )  # fmt: skip


def test_a_batch_pays_one_call_per_part_on_its_rows() -> None:
    """Four samples, two exit: the trunk, SideNet and routing on four rows, the rest on two, at their timed
    calls; the MainNet alone pays trunk and rest on four."""
    record = one_tap_record([0.9, 0.95, 0.3, 0.2])
    seconds = timed(4, (1, 2, 4), [(1.0, 1.0, 1.0), (10.0, 12.0, 16.0)], [(0.5, 0.5, 0.5)], [(0.1, 0.2, 0.3)])
    forecast = forecast_batch_time(record, seconds, [0.5])
    assert forecast == pytest.approx((1.0 + 0.5 + 0.3 + 12.0) / (1.0 + 16.0))
    # Nobody exits: the rest on all four rows; everyone exits: no rest at all.
    assert forecast_batch_time(record, seconds, [NEVER_EXIT]) == pytest.approx((1.0 + 0.5 + 0.3 + 16.0) / 17.0)
    assert forecast_batch_time(record, seconds, [0.0]) == pytest.approx((1.0 + 0.5 + 0.3) / 17.0)
    # Routing's once-per-batch work, timed, is paid once by every batch on all its rows, whatever exits.
    per_batch = replace(seconds, batch_calls=(0.05, 0.1, 0.2))
    for threshold, without in ((0.5, forecast), (NEVER_EXIT, 17.8 / 17.0), (0.0, 1.8 / 17.0)):
        assert forecast_batch_time(record, per_batch, [threshold]) == pytest.approx(without + 0.2 / 17.0)
    assert PartSeconds.mean([per_batch, per_batch]).batch_calls == pytest.approx((0.05, 0.1, 0.2))


def test_fixed_costs_make_few_continuing_rows_dear() -> None:
    """A rest that costs most of its time per call whatever the rows: at a high exit rate a batch still pays
    nearly all of it where any sample continues, far above the per-sample price."""
    record = make_record(n=512, k=1)
    threshold = float(np.quantile(record.confidence[:, 0], 0.1)) + 1e-7  # about 90% exit
    per_row = timed(64, (1, 64), [(1.0, 64.0), (1.0, 64.0)], [(0.1, 6.4)], [(0.0, 0.0)])
    fixed = timed(64, (1, 64), [(1.0, 64.0), (60.0, 64.0)], [(0.1, 6.4)], [(0.0, 0.0)])
    assert forecast_batch_time(record, fixed, [threshold]) > 1.5 * forecast_batch_time(record, per_row, [threshold])


def test_timed_on_the_batch_alone_it_is_the_per_sample_price() -> None:
    """Without calls on fewer rows, a part costs its rows' share of a full batch: whole batches of the
    record then cost what the per-sample price (``time_weighted``) says, sample for sample."""
    record = make_record(n=240, k=3)
    seconds = PartSeconds((4.0, 2.0, 1.0, 0.5), (0.1, 0.2, 0.3), batch_size=8, device="cpu", dtype="float32", repeats=1)
    thresholds = [float(np.quantile(record.confidence[:, c], q)) + 1e-7 for c, q in enumerate((0.7, 0.5, 0.3))]
    priced = CascadeCurve(time_weighted(record, seconds), [thresholds]).at(thresholds)["relative_compute"]
    assert forecast_batch_time(record, seconds, thresholds) == pytest.approx(priced, rel=1e-9)
    # A sub-cascade likewise: the segments between its taps run as one.
    sub = CascadeCurve(time_weighted(record, seconds).restrict([1]), [thresholds[1:2]]).at(thresholds[1:2])
    assert forecast_batch_time(record, seconds, thresholds[1:2], columns=[1]) == pytest.approx(
        sub["relative_compute"], rel=1e-9
    )


def test_bad_arguments_are_refused() -> None:
    record = make_record(n=50, k=2)
    seconds = PartSeconds((1.0, 1.0, 1.0), (0.1, 0.1), batch_size=8, device="cpu", dtype="float32", repeats=1)
    with pytest.raises(ValueError, match="time the model whose taps the record scored"):
        forecast_batch_time(record, PartSeconds((1.0, 1.0), (0.1,), 8, "cpu", "float32", 1), [0.5, 0.5])
    with pytest.raises(ValueError, match="positive"):
        forecast_batch_time(record, seconds, [0.5, 0.5], batch_size=0)
    with pytest.raises(ValueError, match="one threshold per SideNet"):
        forecast_batch_time(record, seconds, [0.5])
    with pytest.raises(ValueError, match="columns"):
        forecast_batch_time(record, seconds, [0.5], columns=[2])
    # A batch larger than the record: one batch of all its samples.
    assert 0 < forecast_batch_time(record, seconds, [0.5, 0.5], batch_size=1000) < 2


def test_a_real_cascade_forecast_from_its_timing() -> None:
    """End to end on a tiny MainNet: parts timed on fewer rows, the record scored, a forecast in (0, 2)."""
    from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images

    model = sidenet.attach(build_tiny_mainnet(), ["layer1", "layer2"], input_shape=IMAGE_SHAPE, hidden=8, seed=0)
    images = make_images(32)
    batches = [(images[i : i + 16], torch.zeros(16, dtype=torch.long)) for i in (0, 16)]
    record = sidenet.collect_cascade(model, batches, progress=False)
    seconds = sidenet.measure_part_seconds(model, images[:16], repeats=1, rows=sidenet.batch_row_counts(16))
    thresholds = [float(np.median(record.confidence[:, c])) + 1e-7 for c in range(2)]
    assert 0 < forecast_batch_time(record, seconds, thresholds) < 2


def test_ranked_by_batches_a_tap_whose_calls_cost_per_batch_drops_out() -> None:
    """60% of samples are easy at both taps, 30% only at the second, 10% at neither. Priced per sample the
    second tap pays (it saves the rest on 30%); by routed batches of 64 it does not: the rest costs most of
    its time per call, and some sample in nearly every batch still continues past the second tap, while its
    SideNet costs mostly per call too."""
    groups = np.repeat([0, 1, 2], [384, 192, 64])
    labels = np.zeros(len(groups), dtype=np.int64)
    confidence = np.stack([np.where(groups == 0, 0.95, 0.3), np.where(groups < 2, 0.95, 0.3)], axis=1)
    side = np.stack([np.where(groups == 0, 0, 1), np.where(groups < 2, 0, 1)], axis=1)  # right where confident
    record = CascadeRecord(confidence, side, labels, labels, np.ones((len(groups), 3)), np.ones((len(groups), 2)))
    seconds = timed(64, (1, 64), [(1.0, 10.0), (1.0, 20.0), (30.0, 40.0)], [(0.1, 1.0), (5.0, 6.0)], [(0.0, 0.0)] * 2)
    per_sample = sidenet.choose_taps(time_weighted(record, seconds), max_accuracy_drop=0.0)
    assert per_sample.columns == (0, 1)
    by_batches = sidenet.choose_taps(
        time_weighted(record, seconds), max_accuracy_drop=0.0, rank=sidenet.batch_time_rank(seconds)
    )
    assert by_batches.columns == (0,)
    ranked = {c["columns"]: c["point"]["ranked_compute"] for c in by_batches.candidates if c["columns"]}
    assert ranked[(0,)] == pytest.approx(0.76, abs=0.02) and ranked[(0, 1)] == pytest.approx(0.80, abs=0.02)


def test_the_mean_of_two_timings_forecasts_between_them() -> None:
    """Averaged timings price the mean batch: its forecast (mean routed time over mean MainNet time) lies
    between the two batches' own; a batch timed twice as slow throughout forecasts the same fraction."""
    record = make_record(n=256, k=2)
    thresholds = [float(np.quantile(record.confidence[:, c], q)) + 1e-7 for c, q in enumerate((0.6, 0.4))]
    short = timed(8, (1, 2, 8), [(1.0, 1.0, 2.0), (1.0, 1.5, 4.0), (2.0, 3.0, 8.0)], [(0.1,) * 3] * 2, [(0.0,) * 3] * 2)
    long = timed(8, (1, 2, 8), [(1.0, 2.0, 6.0), (3.0, 5.0, 9.0), (9.0, 9.0, 9.0)], [(0.2,) * 3] * 2, [(0.1,) * 3] * 2)
    mean = PartSeconds.mean([short, long])
    assert mean.batches == 2 and mean.segment_calls[1] == pytest.approx((2.0, 3.25, 6.5))
    low, high = sorted(forecast_batch_time(record, t, thresholds) for t in (short, long))
    assert low < forecast_batch_time(record, mean, thresholds) < high
    doubled = timed(8, (1, 2, 8), *[[tuple(2 * v for v in c) for c in calls] for calls in
                                    (short.segment_calls, short.side_calls, short.route_calls)])  # fmt: skip
    assert forecast_batch_time(record, PartSeconds.mean([short, doubled]), thresholds) == pytest.approx(
        forecast_batch_time(record, short, thresholds)
    )


def test_text_is_timed_on_several_batches_images_on_one() -> None:
    from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images, tiny_bert

    vision = sidenet.attach(build_tiny_mainnet(), "layer1", input_shape=IMAGE_SHAPE, hidden=8, seed=0)
    text = sidenet.attach(tiny_bert(num_hidden_layers=2), [1], hidden=8, seed=0)
    assert sidenet.timing_batch_count(vision) == 1 and sidenet.timing_batch_count(text) > 1
    images = make_images(40)
    # Batches of 16, 16 and the last of 8: the last is left out (another size), the two averaged.
    seconds = sidenet.measure_part_seconds_over(vision, list(images.split(16)), repeats=1, rows=[1, 16])
    assert seconds.batches == 2 and seconds.batch_size == 16 and seconds.rows == (1, 16)
    assert "on 2 batches of 16" in seconds.describe()
    assert PartSeconds.from_dict(seconds.to_dict()) == seconds
    with pytest.raises(ValueError, match="no batches"):
        sidenet.measure_part_seconds_over(vision, [])


def test_timings_of_different_batches_are_not_averaged() -> None:
    a = timed(8, (1, 8), [(1.0, 2.0), (1.0, 4.0)], [(0.1, 0.1)], [(0.0, 0.0)])
    with pytest.raises(ValueError, match="batch_size"):
        PartSeconds.mean([a, timed(4, (1, 4), [(1.0, 2.0), (1.0, 4.0)], [(0.1, 0.1)], [(0.0, 0.0)])])
    with pytest.raises(ValueError, match="route_calls"):
        PartSeconds.mean([a, timed(8, (1, 8), [(1.0, 2.0), (1.0, 4.0)], [(0.1, 0.1)], [])])
    with pytest.raises(ValueError, match="batch_calls"):
        PartSeconds.mean([a, replace(a, batch_calls=(0.1, 0.2))])
    with pytest.raises(ValueError, match="no timings"):
        PartSeconds.mean([])
