"""input_batches, measure_throughput and latency_percentiles: what is gathered and run how often, and what
the numbers mean (no speed is asserted here; speed targets live in benchmarks/)."""

from __future__ import annotations

import pytest
import torch

from sidenet.loaders import make_loader
from sidenet.timing import Timing, input_batches, latency_percentiles, measure_throughput


def test_every_runner_sees_every_batch_in_each_pass_and_finish_ends_each_pass() -> None:
    calls: list[tuple[str, object]] = []
    runners = {"a": lambda b: calls.append(("a", b)), "b": lambda b: calls.append(("b", b))}
    finish = {"b": lambda: calls.append(("b", "end"))}
    result = measure_throughput(runners, [[1, 2], [3]], repeats=3, warmup=2, finish=finish)
    passes = 2 + 3
    assert calls.count(("a", [1, 2])) == passes and calls.count(("b", [3])) == passes
    assert calls.count(("b", "end")) == passes and calls.count(("a", "end")) == 0
    # Interleaved: a's pass, then b's pass ending with its finish, and again.
    assert calls[:6] == [("a", [1, 2]), ("a", [3]), ("b", [1, 2]), ("b", [3]), ("b", "end"), ("a", [1, 2])]
    assert set(result) == {"a", "b"} and result["a"].samples == 3 and len(result["a"].seconds) == 3


def test_timing_summary() -> None:
    timing = Timing([2.0, 1.0, 4.0], samples=8)
    assert timing.median == 2.0 and timing.throughput == 4.0
    summary = timing.to_dict()
    assert summary["throughput_spread"] == [2.0, 8.0] and summary["repeats"] == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"repeats": 0}, "repeat"),
        ({"finish": {"missing": lambda: None}}, "missing"),
    ],
)
def test_bad_arguments_raise(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        measure_throughput({"a": lambda b: None}, [[1]], **options)


def test_latency_percentiles_are_ordered() -> None:
    result = latency_percentiles(lambda x: sum(range(x)), [10, 1000, 100_000], percentiles=(0, 50, 100))
    assert result["p0"] <= result["p50"] <= result["p100"]


def test_input_batches_keep_whole_batches_up_to_the_sample_count() -> None:
    dataset = torch.utils.data.TensorDataset(torch.arange(10.0)[:, None], torch.arange(10))
    loader = make_loader(dataset, batch_size=4)
    assert [len(b) for b in input_batches(loader, 5)] == [4, 4]  # whole batches, up to >= 5 samples
    assert [len(b) for b in input_batches(loader)] == [4, 4, 2] and input_batches(loader, 4)[0].shape == (4, 1)
    # Dict batches (text): the labels are dropped, and batch_size counts the samples of a dict.
    texts = [{"input_ids": torch.zeros(3, 5), "labels": torch.zeros(3)} for _ in range(4)]
    batches = input_batches(texts, 7, batch_size=lambda batch: len(batch["input_ids"]))
    assert len(batches) == 3 and all(set(batch) == {"input_ids", "labels"} for batch in batches)
    with pytest.raises(ValueError, match="at least 1"):
        input_batches(loader, 0)


def test_count_operations_counts_dispatched_operations_but_not_views() -> None:
    from sidenet.timing import count_operations

    x = torch.arange(6.0)
    counted = count_operations(lambda: (x.view(2, 3) * 2).sum(dim=1).t())
    assert counted == {"mul": 1, "sum": 1}
    assert count_operations(lambda: (x.sum().item(), torch.promote_types(x.dtype, torch.int64))) == {"sum": 1}
    assert count_operations(lambda: None) == {}
