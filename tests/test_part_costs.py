"""Each part of a routed MainNet timed where it runs (``measure_part_seconds``), and cascade records priced
by those times (``time_weighted``): the same tap choice then minimises time rather than FLOPs."""

from __future__ import annotations

import contextlib
import time
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

import sidenet
from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images, tiny_bert
from sidenet import PartSeconds, batch_row_counts, choose_taps, measure_part_seconds, time_weighted
from sidenet.cascade_curve import CascadeCurve, CascadeRecord
from sidenet.cascade_record import states_at_taps
from sidenet.outputs import AdaptiveOutput
from sidenet.routing_steps import batch_step, routing_step
from test_cascade_choice import make_record


class Sleeps(nn.Module):
    """An identity layer that takes ``seconds`` of wall time per call: a part far slower than its FLOPs."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


def test_every_part_is_timed_per_sample() -> None:
    model = sidenet.attach(build_tiny_mainnet(), ["layer1", "layer2"], input_shape=IMAGE_SHAPE, hidden=8, seed=0)
    seconds = measure_part_seconds(model, make_images(16), repeats=3)
    assert len(seconds.segments) == 3 and len(seconds.sides) == 2  # input -> layer1 -> layer2 -> logits
    assert min(seconds.segments + seconds.sides) > 0
    assert (seconds.batch_size, seconds.device, seconds.dtype, seconds.repeats) == (16, "cpu", "float32", 3)
    assert not seconds.graphs and "eager" in seconds.describe()  # no CUDA graphs on the CPU
    shares = seconds.shares()
    assert sum(shares["segments"]) == pytest.approx(1.0)
    assert seconds.to_dict()["shares"] == shares


def test_the_slow_part_carries_the_time() -> None:
    """A segment that sleeps 20 ms a call, among parts of microseconds, holds most of the MainNet's time
    though it counts no FLOPs: the timing finds which part is slow, whatever its FLOPs say."""
    torch.manual_seed(0)
    mainnet = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), Sleeps(0.02), nn.Linear(16, 3)).eval()
    model = sidenet.attach(mainnet, [1, 4], input_shape=(8,), hidden=4, seed=0)  # after the first, the fourth
    seconds = measure_part_seconds(model, torch.randn(8, 8), repeats=3)
    slow = seconds.shares()["segments"]
    assert slow[1] > 0.5 and slow[1] == max(slow)  # modules 1-3 (the sleep among them) of [0], [1-3], [4]


def test_text_cascades_are_timed_and_priced() -> None:
    """A text MainNet (token ids and a mask) with SideNets after layers 1 and 2 of 4: every part timed on
    the batch as the model takes it; the record of the same model priced by that timing."""
    model = sidenet.attach(tiny_bert(num_hidden_layers=4), [1, 2], hidden=8, seed=0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (12, 10), generator=generator)
    mask = (torch.arange(10)[None, :] < torch.randint(3, 11, (12, 1), generator=generator)).long()
    seconds = measure_part_seconds(model, {"input_ids": ids, "attention_mask": mask}, repeats=2)
    assert len(seconds.segments) == 3 and len(seconds.sides) == 2 and seconds.batch_size == 12
    labels = torch.randint(0, 3, (12,), generator=generator)
    batches = [
        {"input_ids": ids[i : i + 4], "attention_mask": mask[i : i + 4], "labels": labels[i : i + 4]} for i in (0, 4, 8)
    ]
    record = sidenet.collect_cascade(model, batches, progress=False)
    priced = time_weighted(record, seconds)
    np.testing.assert_allclose(priced.segment_flops.mean(0), seconds.segments)
    assert np.all(priced.mainnet_flops > 0)


def test_parts_are_timed_on_fewer_rows_too() -> None:
    """``rows``: every part, and the routing step at every tap, timed on the first m samples as well; the
    per-sample seconds stay those of the full batch, and everything reads back from its dict."""
    model = sidenet.attach(build_tiny_mainnet(), ["layer1", "layer2"], input_shape=IMAGE_SHAPE, hidden=8, seed=0)
    seconds = measure_part_seconds(model, make_images(16), repeats=2, rows=batch_row_counts(16))
    assert seconds.rows == (1, 2, 4, 8, 16)
    assert [len(c) for c in seconds.segment_calls] == [5, 5, 5] and [len(c) for c in seconds.side_calls] == [5, 5]
    assert len(seconds.route_calls) == 2 and min(min(c) for c in seconds.route_calls) > 0
    assert len(seconds.batch_calls) == 5 and min(seconds.batch_calls) > 0
    assert seconds.segments == tuple(calls[-1] / 16 for calls in seconds.segment_calls)
    assert PartSeconds.from_dict(seconds.to_dict()) == seconds
    # Without rows: the batch alone, no routing step, as before.
    alone = measure_part_seconds(model, make_images(16), repeats=1)
    assert alone.rows == () and alone.segment_calls == () and alone.route_calls == () and alone.batch_calls == ()


@pytest.mark.parametrize("taps", [["layer1"], ["layer1", "layer2"], ["layer1", "layer2", "layer3"]])
def test_routing_steps_call_what_routing_calls_and_count_no_traffic(taps: list[str]) -> None:
    """The routing steps timed beside the parts call what a routed batch calls: at a tap its answers filed
    back (into a later tap's, whose FLOPs are looked up; at the last tap into the rest's), once per batch
    the input checks, the eval-mode check, the FLOPs profile and a monitor; the model's monitor counts
    nothing (timing is not traffic)."""
    model = sidenet.attach(build_tiny_mainnet(), taps, input_shape=IMAGE_SHAPE, hidden=8, seed=0).eval()
    images = make_images(8)
    model(images)
    counts = (model.monitor.samples_seen, model.monitor.samples_exited)
    states = states_at_taps(model, model.split.trunk(images))
    profile = model.flop_profile(images)
    ledger, monitor_type = type(model.flop_ledger), type(model.monitor)
    spied = [
        (type(model), "check_input"), (type(model.split), "ensure_eval"), (ledger, "profile"), (ledger, "step"),
        (ledger, "rest"), (monitor_type, "record"), (AdaptiveOutput, "completed"), (AdaptiveOutput, "answered_by_rest"),
    ]  # fmt: skip
    steps = [routing_step(model, k, states[k], profile) for k in range(len(taps))] + [
        batch_step(model, images, states[0])
    ]
    called: list[list[str]] = []
    for step, argument in steps:
        with contextlib.ExitStack() as stack:
            for owner, name in spied:
                stack.enter_context(mock.patch.object(owner, name, autospec=True, side_effect=getattr(owner, name)))
            mocks = {name: getattr(owner, name) for owner, name in spied}
            step(argument)
        called.append(sorted(name for name, spy in mocks.items() if spy.called))
    later = [["completed", "step"]] * (len(taps) - 1)
    assert called == [*later, ["answered_by_rest", "rest"], ["check_input", "ensure_eval", "profile", "record"]]
    assert (model.monitor.samples_seen, model.monitor.samples_exited) == counts


def test_text_parts_on_fewer_rows() -> None:
    """A text batch's first rows go on with their padding cut, as routing cuts it."""
    model = sidenet.attach(tiny_bert(num_hidden_layers=4), [1, 2], hidden=8, seed=0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (6, 10), generator=generator)
    mask = (torch.arange(10)[None, :] < torch.tensor([[3], [4], [10], [10], [10], [10]])).long()
    seconds = measure_part_seconds(model, {"input_ids": ids, "attention_mask": mask}, repeats=1, rows=[2, 6])
    assert seconds.rows == (2, 6) and len(seconds.route_calls) == 2
    assert min(min(c) for c in seconds.segment_calls) > 0


def test_call_seconds_between_and_beyond_the_timed_rows() -> None:
    seconds = PartSeconds(
        (1.0, 2.0), (0.5,), batch_size=4, device="cpu", dtype="float32", repeats=1,
        rows=(1, 2, 4), segment_calls=((1.0, 1.0, 4.0), (3.0, 4.0, 8.0)), side_calls=((0.2, 0.3, 2.0),),
        route_calls=((0.1, 0.1, 0.1),), batch_calls=(0.01, 0.02, 0.04),
    )  # fmt: skip
    rows = np.array([0, 1, 3, 4, 6])
    np.testing.assert_allclose(seconds.call_seconds("segments", 1, rows), [0.0, 3.0, 6.0, 8.0, 12.0])
    np.testing.assert_allclose(seconds.call_seconds("segments", 0, rows), [0.0, 1.0, 2.5, 4.0, 7.0])
    np.testing.assert_allclose(seconds.call_seconds("routes", 0, rows), [0.0, 0.1, 0.1, 0.1, 0.1])
    np.testing.assert_allclose(seconds.call_seconds("batches", 0, rows), [0.0, 0.01, 0.03, 0.04, 0.06])
    with pytest.raises(ValueError, match="kind"):
        seconds.call_seconds("rests", 0, rows)
    with pytest.raises(ValueError, match="index 0"):
        seconds.call_seconds("batches", 1, rows)
    # Timed on the batch alone: a call costs its rows' share of the batch, and routing nothing.
    alone = part_seconds((1.0, 2.0), (0.5,))
    np.testing.assert_allclose(alone.call_seconds("segments", 1, rows), 2.0 * rows)
    np.testing.assert_allclose(alone.call_seconds("routes", 0, rows), 0.0)
    np.testing.assert_allclose(alone.call_seconds("batches", 0, rows), 0.0)


def test_row_counts_are_powers_of_two_then_the_batch() -> None:
    assert batch_row_counts(1) == [1] and batch_row_counts(8) == [1, 2, 4, 8]
    assert batch_row_counts(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert batch_row_counts(np.int64(4)) == [1, 2, 4]
    for bad in (0, 2.0, True, "8"):
        with pytest.raises(ValueError, match="positive integer"):
            batch_row_counts(bad)


def test_bad_inputs_and_repeats_are_refused() -> None:
    model = sidenet.attach(build_tiny_mainnet(), "layer1", input_shape=IMAGE_SHAPE, hidden=8, seed=0)
    with pytest.raises(ValueError, match="repeats"):
        measure_part_seconds(model, make_images(4), repeats=0)
    with pytest.raises(ValueError, match="needs the model and inputs on CUDA"):
        measure_part_seconds(model, make_images(4), graphs=True)
    with pytest.raises(ValueError):
        measure_part_seconds(model, torch.randn(4, 3, 16, 16))  # the MainNet takes one channel
    for rows in ([0, 2], [5]):
        with pytest.raises(ValueError, match="row counts must lie in"):
            measure_part_seconds(model, make_images(4), rows=rows)
    with pytest.raises(ValueError, match="whole numbers"):
        measure_part_seconds(model, make_images(4), rows=[2.5])


def part_seconds(segments: tuple[float, ...], sides: tuple[float, ...]) -> PartSeconds:
    return PartSeconds(segments, sides, batch_size=8, device="cpu", dtype="float32", repeats=1)


def test_records_are_priced_by_the_measured_seconds() -> None:
    record = make_record(n=200, k=3)
    rng = np.random.default_rng(0)
    record.segment_flops[:, 1] *= rng.uniform(0.5, 1.5, len(record))  # per-sample FLOPs (text lengths)
    record.segment_flops[:, 3] = 0.0  # a part that counts no FLOPs still costs its time
    seconds = part_seconds((4.0, 2.0, 1.0, 0.5), (0.1, 0.2, 0.3))
    priced = time_weighted(record, seconds)
    np.testing.assert_allclose(priced.segment_flops.mean(0), seconds.segments)
    np.testing.assert_allclose(priced.side_flops.mean(0), seconds.sides)
    # A sample's share of a part's time follows its share of the part's FLOPs.
    ratio = priced.segment_flops[:, 1] / record.segment_flops[:, 1]
    np.testing.assert_allclose(ratio, ratio[0])
    assert np.all(priced.segment_flops[:, 3] == 0.5)
    np.testing.assert_array_equal(priced.confidence, record.confidence)  # only the costs change
    curve = CascadeCurve(priced, [(sidenet.NEVER_EXIT,) * 3])
    # No exit: the MainNet's own time and every SideNet's, over the MainNet's.
    assert curve.relative_compute[0] == pytest.approx((7.5 + 0.6) / 7.5)


def test_time_and_flops_choose_different_taps() -> None:
    """Two taps whose SideNets let the same samples exit: in FLOPs the first tap is cheaper, in time the
    second (its trunk is slow); each pricing keeps the tap that is cheaper in its own terms."""
    n = 400
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, n)
    easy = rng.uniform(size=n) < 0.7
    confidence = np.where(easy, 0.95, 0.4)[:, None] + rng.uniform(-0.01, 0.01, (n, 2))
    side = np.repeat(np.where(easy, labels, (labels + 1) % 3)[:, None], 2, axis=1)
    segments = np.tile([10.0, 20.0, 70.0], (n, 1))  # FLOPs: tap 0 at 10%, tap 1 at 30%
    record = CascadeRecord(confidence, side, labels, labels, segments, np.full((n, 2), 1.0))
    by_flops = choose_taps(record, max_accuracy_drop=0.0)
    assert by_flops.taps == (0,)  # exits at 11 of 100 FLOPs, against 32 at tap 1
    # In time, tap 0's trunk and SideNet are slow: an exit there costs 80 of the MainNet's 100, at tap 1 52.
    by_time = choose_taps(time_weighted(record, part_seconds((50.0, 1.0, 49.0), (30.0, 1.0))), max_accuracy_drop=0.0)
    assert by_time.taps == (1,)
    assert by_time.point["relative_compute"] == pytest.approx((0.7 * 52 + 0.3 * 101) / 100, abs=0.02)


def test_mismatched_timing_is_refused() -> None:
    record = make_record(n=50, k=2)
    with pytest.raises(ValueError, match="time the model whose taps the record scored"):
        time_weighted(record, part_seconds((1.0, 1.0), (1.0,)))
    with pytest.raises(ValueError, match="negative"):
        time_weighted(record, part_seconds((1.0, -1.0, 1.0), (1.0, 1.0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cuda_bfloat16_parts_are_timed_where_they_run() -> None:
    """On a GPU every part's time ends when its kernels do (synchronised), in the dtype served."""
    model = sidenet.attach(build_tiny_mainnet(), ["layer1", "layer2"], input_shape=IMAGE_SHAPE, hidden=8, seed=0)
    model = model.to("cuda", torch.bfloat16)
    seconds = measure_part_seconds(model, make_images(32).to("cuda", torch.bfloat16), repeats=3)
    assert seconds.device.startswith("cuda") and seconds.dtype == "bfloat16"
    assert seconds.graphs and "in a CUDA graph" in seconds.describe()  # replayed, not launched kernel by kernel
    eager = measure_part_seconds(model, make_images(32).to("cuda", torch.bfloat16), repeats=3, graphs=False)
    assert not eager.graphs and min(eager.segments) > 0
    assert min(seconds.segments + seconds.sides) > 0
    assert sum(seconds.shares()["segments"]) == pytest.approx(1.0)
    # On fewer rows too, each part and routing step captured per row count (the forecast's timing).
    rows = measure_part_seconds(model, make_images(32).to("cuda", torch.bfloat16), repeats=2, rows=[4, 32])
    assert rows.graphs and rows.rows == (4, 32) and min(min(c) for c in rows.route_calls) > 0
