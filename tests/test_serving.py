"""PooledRouter: the same answers and FLOPs as per-batch routing whatever the pooling, every batch
answered exactly once, bounded waiting, text states of different lengths pooled, bad settings refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import make_images, threshold_between
from sidenet import NEVER_EXIT, AdaptiveModel
from sidenet.serving import PooledRouter
from sidenet.timing import count_operations

HYPOTHESIS = settings(max_examples=20, deadline=None)


def median_threshold(model: AdaptiveModel, batches: list) -> float:
    """A threshold at which about half of the samples exit, strictly between two samples' scores."""
    with torch.no_grad():
        scores = torch.cat([model.front_pass(x, "side").confidence for x in batches])
    return threshold_between(scores, 0.5)


@torch.no_grad()
def assert_same_as_forward(model: AdaptiveModel, batches: list, answered: list, atol: float = 1e-5) -> None:
    assert [routed.batch_id for routed in answered] == list(range(len(batches)))
    for x, routed in zip(batches, answered, strict=True):
        expected = model(x)
        torch.testing.assert_close(routed.output.logits, expected.logits, rtol=0, atol=atol)
        assert torch.equal(routed.output.exited, expected.exited)
        assert torch.equal(routed.output.exit_stage, expected.exit_stage)
        torch.testing.assert_close(routed.output.confidence, expected.confidence)
        if model.split.rest_flop_key(model.split.trunk(x)) is None:  # vision: the rest costs the same anywhere
            assert torch.equal(routed.output.flops, expected.flops)


@HYPOTHESIS
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    rest_batch=st.integers(1, 12),
    max_wait=st.integers(0, 3),
    quantile=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
)
def test_pooled_answers_equal_per_batch_routing(shared_model, sizes, rest_batch, max_wait, quantile) -> None:
    batches = [make_images(n, seed=i) for i, n in enumerate(sizes)]
    with torch.no_grad():
        scores = torch.cat([shared_model.front_pass(x, "side").confidence for x in batches])
    shared_model.threshold = threshold_between(scores, quantile)  # never on a sample's own score
    try:
        answered = PooledRouter(shared_model, rest_batch=rest_batch, max_wait=max_wait).run(batches)
        assert_same_as_forward(shared_model, batches, answered)
        assert all(routed.waited <= max(max_wait, len(batches) - 1) for routed in answered)
    finally:
        shared_model.threshold = 0.9


@torch.no_grad()
def test_pooled_answers_are_filed_back_with_their_bookkeeping_computed_when_read(tiny_model: AdaptiveModel) -> None:
    """Filing the rest's answers back into their batches scatters their logits and exit flags only: the
    FLOPs, exit stages and scores of a pooled batch are computed when read (on a GPU each operation is a
    launch on the serving path), and equal per-batch routing's."""
    batches = [make_images(n, seed=i) for i, n in enumerate([6, 3, 8, 5])]
    tiny_model.threshold = median_threshold(tiny_model, batches)
    tiny_model(batches[0])  # warm-up: FLOPs are measured once per input shape
    answered: list = []
    router = PooledRouter(tiny_model, rest_batch=7, max_wait=2)
    operations = count_operations(lambda: answered.extend(router.run(batches)))
    assert not {"full", "where", "index_add", "lt"} & set(operations), operations
    assert operations["index_copy"] >= 2  # logits and exit flags, per batch the rest answered
    assert_same_as_forward(tiny_model, batches, answered)


@torch.no_grad()
def test_submit_answers_each_batch_once_and_waits_at_most_max_wait(tiny_model: AdaptiveModel) -> None:
    batches = [make_images(8, seed=i) for i in range(10)]
    tiny_model.threshold = median_threshold(tiny_model, batches)
    router = PooledRouter(tiny_model, rest_batch=64, max_wait=2)  # never full: only max_wait releases
    answered = []
    for x in batches:
        answered += router.submit(x)
        assert router.pending <= 3 * 8
    waiting_at_end = router.pending
    answered += router.flush()
    assert router.pending == 0 and waiting_at_end > 0
    assert sorted(routed.batch_id for routed in answered) == list(range(10))
    assert max(routed.waited for routed in answered) == 2


@torch.no_grad()
def test_full_pool_runs_the_rest_without_waiting_for_max_wait(tiny_model: AdaptiveModel) -> None:
    tiny_model.threshold = NEVER_EXIT  # every sample continues: each batch fills the pool
    router = PooledRouter(tiny_model, max_wait=100)
    for i in range(3):
        (routed,) = router.submit(make_images(6, seed=i))
        assert routed.batch_id == i and routed.waited == 0
    assert router.rest_batch == 6 and router.pending == 0


@torch.no_grad()
def test_exited_batches_are_answered_at_once(tiny_model: AdaptiveModel) -> None:
    tiny_model.threshold = 0.0  # everyone exits
    router = PooledRouter(tiny_model, rest_batch=100, max_wait=100)
    routed = router.submit(make_images(5))
    assert len(routed) == 1 and routed[0].output.exited.all() and router.pending == 0


@torch.no_grad()
def test_exit_statistics_are_counted(tiny_model: AdaptiveModel) -> None:
    batches = [make_images(8, seed=i) for i in range(4)]
    tiny_model.threshold = median_threshold(tiny_model, batches)
    tiny_model.reset_stats()
    answered = PooledRouter(tiny_model).run(batches)
    exited = sum(int(routed.output.exited.sum()) for routed in answered)
    assert tiny_model.samples_seen == 32 and tiny_model.samples_exited == exited


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rest_batch": 0}, "rest_batch"),
        ({"rest_batch": 2.5}, "rest_batch"),
        ({"max_wait": -1}, "max_wait"),
        ({"max_wait": True}, "max_wait"),
    ],
)
def test_bad_settings_raise(tiny_model: AdaptiveModel, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PooledRouter(tiny_model, **options)


@torch.no_grad()
def test_front_pass_records_nothing_its_callers_do(tiny_model: AdaptiveModel) -> None:
    """front_pass has no side effects; forward (adaptive mode) and the router record into the monitor."""
    x = make_images(6)
    tiny_model.threshold = 0.0
    tiny_model.reset_stats()
    for mode in ("adaptive", "side", "batch"):
        tiny_model.front_pass(x, mode)
    assert tiny_model.samples_seen == 0 and len(tiny_model.recent_confidence) == 0
    for mode in ("main", "side", "batch"):
        tiny_model(x, mode=mode)
    assert tiny_model.samples_seen == 0
    tiny_model(x)
    assert (tiny_model.samples_seen, tiny_model.samples_exited) == (6, 6)
    PooledRouter(tiny_model).run([x, x])
    assert tiny_model.monitor.samples_seen == 18 and tiny_model.observed_exit_rate == 1.0


def test_front_pass_refuses_main_mode(tiny_model: AdaptiveModel) -> None:
    with pytest.raises(ValueError, match="front_pass mode"):
        tiny_model.front_pass(make_images(2), "main")


def test_text_states_of_different_lengths_pool_like_per_batch_routing() -> None:
    pytest.importorskip("transformers")
    from test_text_split import attached, make_batch, tiny_encoder

    model = attached(tiny_encoder("bert"), tap=1)
    batches = [make_batch(lengths, seed=i) for i, lengths in enumerate([[3, 9, 5], [12, 4], [6, 6, 2, 7]])]
    model.threshold = median_threshold(model, batches)
    answered = PooledRouter(model, rest_batch=4, max_wait=1).run(batches)
    assert_same_as_forward(model, batches, answered, atol=1e-4)
    with torch.no_grad():
        for x, routed in zip(batches, answered, strict=True):
            expected, out = model(x), routed.output
            assert torch.equal(out.flops[out.exited], expected.flops[expected.exited])
            front = model.flop_profile(x).trunk + model.flop_profile(x).side
            assert bool((out.flops[~out.exited] > front).all())
    assert 0 < sum(int(routed.output.exited.sum()) for routed in answered) < 9
