"""input_batches, measure_throughput and latency_percentiles: what is gathered and run how often, and what
the numbers mean (no speed is asserted here; speed targets live in benchmarks/)."""

from __future__ import annotations

import re

import pytest
import torch

import sidenet
from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images
from sidenet.loaders import make_loader
from sidenet.timing import RoutedTiming, Timing, input_batches, latency_percentiles, measure_throughput, time_routed


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


def test_rotated_repeats_start_one_runner_later_each_time() -> None:
    order: list[str] = []
    runners = {name: (lambda b, name=name: order.append(name)) for name in "abc"}
    result = measure_throughput(runners, [[1]], repeats=4, warmup=1, rotate=True)
    assert "".join(order) == "abc" + "abc" + "bca" + "cab" + "abc"  # the warm-up, then the repeats rotated
    assert all(len(timing.seconds) == 4 for timing in result.values())


def test_time_ratios_pair_the_passes_of_each_repeat_per_sample() -> None:
    slow, fast = Timing([2.0, 4.0, 3.0], samples=10), Timing([1.0, 1.0, 2.0], samples=20)
    assert slow.time_ratios(fast) == pytest.approx([4.0, 8.0, 3.0])  # per sample: (2/10) / (1/20), ...
    with pytest.raises(ValueError, match="equal repeats"):
        slow.time_ratios(Timing([1.0], samples=20))


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


def test_routed_timing_speedups_are_over_the_faster_mainnet_alone() -> None:
    eager, compiled = Timing([2.0, 2.0], 100), Timing([1.0, 1.0], 100)
    points = {0.5: Timing([0.5, 0.5], 100)}
    alone = RoutedTiming(samples=100, batches=2, mainnet=eager, points=points)
    assert alone.baseline == "mainnet" and alone.speedup(0.5) == pytest.approx(4.0)
    assert "eager routing over the eager MainNet" in alone.describe()
    served = RoutedTiming(
        samples=100, batches=2, mainnet=eager, mainnet_compiled=compiled, points=points, served="x", compile_seconds=3.0
    )
    assert served.baseline == "mainnet_compiled" and served.speedup(0.5) == pytest.approx(2.0)
    assert "best MainNet alone (torch.compile;" in served.describe() and "3.0 s of compiling" in served.describe()
    slower = RoutedTiming(samples=100, batches=2, mainnet=compiled, mainnet_compiled=eager, points=points)
    assert slower.baseline == "mainnet" and slower.baseline_dict()["baseline"] == "mainnet"


def _thresholds(model) -> dict:
    def at(value: float):
        return lambda: setattr(model, "threshold", value)

    return {0.3: at(0.3), 0.9: at(0.9)}


def test_time_routed_eager_puts_the_exit_rule_back(shared_model) -> None:
    before = shared_model.policies
    timing = time_routed(shared_model, [make_images(8, seed=1), make_images(5, seed=2)], _thresholds(shared_model), 2)
    assert shared_model.policies is before
    assert set(timing.points) == {0.3, 0.9} and timing.samples == 13 and timing.batches == 2
    assert timing.mainnet_compiled is None and timing.served == "eager" and timing.compile_seconds is None
    assert all(len(t.seconds) == 2 for t in [timing.mainnet, *timing.points.values()])


def test_time_routed_as_served_times_the_compiled_model_and_the_compiled_mainnet(
    shared_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sidenet.compiled

    compiled_with, served_calls = [], []
    compile_for_serving = sidenet.compiled.compile_for_serving
    served_call = sidenet.compiled.CompiledAdaptiveModel.__call__

    def recording_compile(model, example, **options):
        compiled_with.append(options)
        return compile_for_serving(model, example, **options)

    def recording_call(self, x):
        served_calls.append(len(x))
        return served_call(self, x)

    monkeypatch.setattr(sidenet.compiled, "compile_for_serving", recording_compile)
    monkeypatch.setattr(sidenet.compiled.CompiledAdaptiveModel, "__call__", recording_call)
    before = shared_model.policies
    batches = [make_images(8, seed=1), make_images(5, seed=2)]
    timing = time_routed(shared_model, batches, _thresholds(shared_model), 1, compile_backend="eager")
    assert shared_model.policies is before
    assert compiled_with == [{"batch_sizes": [5, 8], "backend": "eager"}]
    # Both points, in the untimed and the timed pass, ran every batch through the served model.
    assert served_calls.count(8) >= 4 and served_calls.count(5) >= 4
    assert timing.mainnet_compiled is not None and timing.compile_seconds > 0
    assert timing.served == "compile_for_serving (backend eager)"
    assert timing.baseline in ("mainnet", "mainnet_compiled")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_time_routed_as_served_on_cuda_in_bfloat16() -> None:
    # The report's --compile auto on a GPU: the served model in CUDA graphs, the MainNet alone under
    # reduce-overhead, timed interleaved with the eager MainNet.
    mainnet = build_tiny_mainnet().to(device="cuda", dtype=torch.bfloat16)
    model = sidenet.attach(mainnet, "layer1", input_shape=IMAGE_SHAPE, hidden=32, pool_size=2, seed=0)
    batches = [make_images(8, seed=1).cuda().bfloat16(), make_images(5, seed=2).cuda().bfloat16()]
    before = model.policies
    timing = time_routed(model, batches, _thresholds(model), 2, compile_backend="auto")
    assert model.policies is before and set(timing.points) == {0.3, 0.9}
    assert timing.mainnet_compiled is not None and timing.compile_seconds > 0
    assert all(t.throughput > 0 for t in [timing.mainnet, timing.mainnet_compiled, *timing.points.values()])


def test_progress_bars_only_when_asked(shared_model, capsys: pytest.CaptureFixture[str]) -> None:
    batches = [make_images(4, seed=1)]
    time_routed(shared_model, batches, _thresholds(shared_model), 1, compile_backend="eager")
    assert "Timing" not in capsys.readouterr().err
    timing = time_routed(shared_model, batches, _thresholds(shared_model), 1, compile_backend="eager", progress=True)
    err = capsys.readouterr().err
    # One batch and the stages; (1 untimed + 1 timed pass) x (MainNet eager, compiled, two points).
    assert re.search(r"Compiling \(served model, MainNet alone\):[^\r\n]*\b0/2\b", err)
    assert re.search(r"Timing:[^\r\n]*\b0/8\b", err)
    assert len(timing.points) == 2


def test_time_routed_needs_batches_and_points(shared_model) -> None:
    with pytest.raises(ValueError, match="at least one batch and one point"):
        time_routed(shared_model, [], _thresholds(shared_model))
    with pytest.raises(ValueError, match="at least one batch and one point"):
        time_routed(shared_model, [make_images(4)], {}, compile_backend="eager")


def test_the_compiled_mainnet_alone_gets_text_padded_as_the_served_model_does(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    import sidenet.compiled
    from test_text_split import attached, make_batch, tiny_encoder

    model = attached(tiny_encoder("bert"), tap=2)
    batches = [make_batch([7, 3, 12, 5], seed=0), make_batch([2, 3, 1, 5], seed=1)]
    lengths: list[int] = []

    def recording_compile(fn, **options):
        def run(x):
            lengths.append(int(x["input_ids"].shape[1]))
            return fn(x)

        return run

    compile_for_serving = sidenet.compiled.compile_for_serving
    monkeypatch.setattr(torch, "compile", recording_compile)
    for buckets, seen in ((None, {12, 5}), ((4, 8, 16), {16, 8})):
        monkeypatch.setattr(
            sidenet.compiled,
            "compile_for_serving",
            lambda m, x, **o: compile_for_serving(m, x, length_buckets=buckets, **o),  # noqa: B023
        )
        lengths.clear()
        timing = time_routed(model, batches, _thresholds(model), 1, compile_backend="eager")
        assert set(lengths) == seen and timing.mainnet_compiled is not None
