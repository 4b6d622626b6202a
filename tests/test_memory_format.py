"""A MainNet in the channels-last memory format (the fast one for convolutions on a GPU) keeps it through
routing: the continuing samples reach the rest channels-last, with the same answers as the contiguous model."""

from __future__ import annotations

import torch

import sidenet
from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images, threshold_between
from sidenet.splits import select_samples

CHANNELS_LAST = torch.channels_last


def test_selected_samples_keep_their_memory_format() -> None:
    images = torch.randn(6, 4, 5, 5).to(memory_format=CHANNELS_LAST)
    rows = torch.randn(6, 3)
    index = torch.tensor([4, 0, 2])
    got = select_samples({"images": images, "rows": rows}, index)
    assert got["images"].is_contiguous(memory_format=CHANNELS_LAST)
    assert torch.equal(got["images"], images.contiguous()[index]) and torch.equal(got["rows"], rows[index])
    assert select_samples(images.contiguous(), index).is_contiguous()  # a contiguous state stays contiguous


def test_a_channels_last_mainnet_routes_its_continuing_samples_channels_last() -> None:
    def attached(memory_format: torch.memory_format) -> sidenet.AdaptiveModel:
        mainnet = build_tiny_mainnet().to(memory_format=memory_format)
        return sidenet.attach(mainnet, "layer1", input_shape=IMAGE_SHAPE, hidden=16, pool_size=2, seed=0)

    model, reference = attached(CHANNELS_LAST), attached(torch.contiguous_format)
    x = make_images(24)
    threshold = threshold_between(reference(x, mode="side").confidence, 0.5)
    model.threshold = reference.threshold = threshold
    images = x.to(memory_format=CHANNELS_LAST)
    with torch.no_grad():
        model(images)  # the first call of a shape also measures the FLOPs of each stage on the whole batch
        formats = []
        rest = model.split.rest
        model.split.rest = lambda state: formats.append(state.is_contiguous(memory_format=CHANNELS_LAST)) or rest(state)
        got, want = model(images), reference(x)
    assert formats == [True]  # the rest ran once, on the continuing samples, channels-last
    assert torch.equal(got.exited, want.exited) and 0 < int(got.exited.sum()) < len(x)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)


def test_a_channels_last_mainnet_served_compiled_answers_as_the_model() -> None:
    """The compiled serving mode on a channels-last MainNet (padding the continuing rows to buckets, pipelined
    over the stream): the answers of the eager model."""
    from sidenet import compile_for_serving
    from test_compiled import assert_same_answers, mixed_model

    model, batches = mixed_model()
    model.split.mainnet.to(memory_format=CHANNELS_LAST)
    batches = [x.contiguous(memory_format=CHANNELS_LAST) for x in batches]
    served = compile_for_serving(model, batches[0], rest_buckets=(8, 16, 24), backend="inductor")
    for stage in served._stages.values():  # compiled, whatever the CPU's warm-up timing kept
        stage.backend = "inductor"
    outputs = [served(x) for x in batches] + list(served.stream(batches))
    for got, x in zip(outputs, batches + batches, strict=True):
        want = model(x)
        assert 0 < int(want.exited.sum()) < len(x)
        assert_same_answers(got, want, atol=1e-4)


def test_selected_samples_leave_what_has_no_batch_dimension() -> None:
    """An input batch may carry a 0-d tensor beside its rows (a text split accepts extra entries): selecting
    samples (the compiled serving mode pads batches so) keeps it as it is, as it keeps anything not a tensor."""
    index = torch.tensor([1, 0, 1])
    batch = {"input_ids": torch.arange(6).reshape(2, 3), "scale": torch.tensor(2.0), "name": "x"}
    got = select_samples(batch, index)
    assert torch.equal(got["input_ids"], batch["input_ids"][index])
    assert got["scale"] is batch["scale"] and got["name"] == "x"
