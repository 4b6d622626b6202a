"""The routed path reads one device value per batch: the count of continuing samples (with the sizes a
text split needs to cut its padding), in one transfer. On a GPU every read of a tensor's value is a
host wait that drains the queue of launched work, so any other read would cost a batch's worth of
overlap. Counted here on the CPU by patching the tensor methods that read values, and on CUDA (when
present) under ``torch.cuda.set_sync_debug_mode("error")`` with only that one read allowed."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import sidenet
from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images, threshold_between
from sidenet.serving import PooledRouter
from sidenet.timing import count_operations

# Every way Python code reads a tensor's value onto the host (``len`` and shapes read no value).
READERS = ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@contextmanager
def counting_reads() -> Iterator[list[str]]:
    """Record the name of every value-reading tensor method called inside the block."""
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READERS}

    def counted(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            reads.append(name)
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def mixed_image_model(check_values: bool | None = False) -> tuple[sidenet.AdaptiveModel, torch.Tensor]:
    """A tiny vision model with its threshold between confidences, so that a batch mixes exits and
    continuations, and a batch of 24 images."""
    model = sidenet.attach(build_tiny_mainnet(), "layer1", input_shape=IMAGE_SHAPE, hidden=16, pool_size=2, seed=0)
    x = make_images(24, seed=3)
    model.threshold = threshold_between(model(x, mode="side").confidence, 0.5)
    model.check_values = check_values
    model(x)  # warm-up: FLOPs are measured once per input shape
    return model, x


def mixed_text_model() -> tuple[sidenet.AdaptiveModel, dict[str, torch.Tensor]]:
    pytest.importorskip("transformers")
    from test_text_split import attached, make_batch, tiny_encoder

    model = attached(tiny_encoder("bert"), tap=2)
    batch = make_batch([7, 3, 12, 5, 12, 1, 9, 4], seed=1)
    model.threshold = threshold_between(model(batch, mode="side").confidence, 0.5)
    model.check_values = False
    # As on an accelerator: the attention mask is built, not skipped after reading it (see allows_mask_skip).
    model.split.allows_mask_skip = lambda mask: False
    model(batch)  # warm-up: FLOPs measured for this padded length and for the length the rest runs at
    return model, batch


def test_routed_vision_batch_reads_one_value() -> None:
    model, x = mixed_image_model()
    output = model(x)
    assert 0 < int(output.exited.sum()) < len(x)  # a mixed batch: gather, rest and scatter all run
    with counting_reads() as reads:
        model(x)
    assert reads == ["tolist"]


def test_routed_text_batch_reads_one_value() -> None:
    model, batch = mixed_text_model()
    with counting_reads() as reads:
        output = model(batch)
    assert reads == ["tolist"]
    # ... and the padding was still cut to the longest continuing sentence (as select() cuts it).
    assert 0 < int(output.exited.sum()) < len(output.exited)
    reference = model.split.select(model.split.trunk(batch), (~output.exited).nonzero().squeeze(1))
    remaining, sizes = model.continuing(model.front_pass(batch))
    assert model.split.select_sized(model.split.trunk(batch), remaining, sizes)["hidden"].shape == (
        reference["hidden"].shape
    )
    # The built (not skipped) attention mask gives the model's own answers within float rounding.
    from test_text_split import hf_logits

    torch.testing.assert_close(
        model(batch, mode="main").logits, hf_logits(model.split.mainnet, batch), atol=1e-5, rtol=0
    )


def test_traffic_statistics_are_read_when_asked() -> None:
    model, x = mixed_image_model()
    model.reset_stats()
    outputs = [model(x) for _ in range(3)]
    exited = sum(int(output.exited.sum()) for output in outputs)
    assert model.samples_seen == 3 * len(x) and model.samples_exited == exited
    torch.testing.assert_close(model.recent_confidence, torch.cat([o.confidence for o in outputs]).double())


def test_value_checks_run_for_cpu_inputs_by_default() -> None:
    model, x = mixed_image_model(check_values=None)
    with counting_reads() as reads:
        model(x)
    assert reads.count("tolist") == 1 and "item" in reads  # the NaN/inf check read the input's sum
    with pytest.raises(ValueError, match="NaN"):
        model(x.clone().fill_(float("nan")))
    model.check_values = False
    with counting_reads() as reads:
        model(x)
    assert reads == ["tolist"]


def test_structure_is_checked_without_reading_values() -> None:
    model, x = mixed_image_model(check_values=False)
    with pytest.raises(ValueError, match="input channels"):
        model(torch.zeros(2, 3, 16, 16))
    with counting_reads() as reads, pytest.raises(ValueError, match="empty batch"):
        model(x[:0])
    assert reads == []


def test_pooled_router_reads_one_value_per_batch() -> None:
    model, x = mixed_image_model()
    batches = [make_images(24, seed=seed) for seed in range(4)]
    router = PooledRouter(model, rest_batch=16, max_wait=2)
    router.run(batches[:1])  # warm-up
    with counting_reads() as reads:
        for batch in batches:
            router.submit(batch)
        router.flush()
    assert reads == ["tolist"] * len(batches)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_routed_batch_synchronises_once(dtype: torch.dtype) -> None:
    model, x = mixed_image_model(check_values=None)
    model = model.to("cuda", dtype)
    x = x.to("cuda", dtype)
    model(x)  # warm-up on the device
    allowed = torch.Tensor.tolist
    waits: list[int] = []

    def one_wait(self: torch.Tensor) -> Any:
        waits.append(1)
        torch.cuda.set_sync_debug_mode(0)
        try:
            return allowed(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    torch.Tensor.tolist = one_wait  # type: ignore[method-assign]
    torch.cuda.set_sync_debug_mode("error")
    try:
        output = model(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.Tensor.tolist = allowed  # type: ignore[method-assign]
    assert waits == [1]
    reference = model(x, mode="main")
    assert output.logits.shape == reference.logits.shape


def test_the_flops_and_exit_stage_bookkeeping_launches_nothing_until_read() -> None:
    """A server that reads only the answers pays no kernel for the per-sample FLOPs and exit stages: the
    routed batch issues the MainNet's and the SideNet's operations and the routing's own few (score, mask,
    order, count, gather, scatter, exit statistics), and the bookkeeping runs when first read, with the
    values the eager computation gave."""
    model, x = mixed_image_model()
    split, sidenet_head = model.split, model.sidenet
    alone = sum(count_operations(lambda: split.rest(split.trunk(x))).values())
    side = sum(count_operations(lambda: sidenet_head(split.features(split.trunk(x)))).values()) - sum(
        count_operations(lambda: split.trunk(x)).values()
    )
    outputs: list[sidenet.AdaptiveOutput] = []
    model.reset_stats()
    routed = count_operations(lambda: outputs.append(model(x)))
    output = outputs[0]
    assert 0 < int(output.exited.sum()) < len(x)
    assert model.monitor.samples_exited == int(output.exited.sum()) and model.monitor.samples_seen == len(x)
    # The MainNet's operations (the rest on the continuing samples only), the SideNet's, and routing's 10:
    # score 2, mask 1, order and count 4, gather 1, scatter 1, the confidence window's copy 1 (the exits
    # are counted from the count routing reads anyway). Six more while the FLOPs and exit stages were
    # computed on every batch and the exits summed on the device.
    assert sum(routed.values()) <= alone + side + 10, routed
    assert not {"full", "where"} & set(routed), routed
    read = count_operations(lambda: (output.flops, output.exit_stage))
    assert read["where"] >= 2  # computed now, once
    assert count_operations(lambda: (output.flops, output.exit_stage)) == collections.Counter()
    profile = model.flop_profile(x)
    expected = torch.where(output.exited, profile.trunk + profile.side, profile.trunk + profile.side + profile.rest)
    torch.testing.assert_close(output.flops, expected.to(output.flops.dtype))
    assert torch.equal(output.exit_stage, (~output.exited).long())
