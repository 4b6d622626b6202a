"""The compiled serving mode on cascades: every later tap a stage of its own (the segment to it and its
SideNet) run at row buckets, the padding rows never counted; the same answers as ``model(x)`` for a
CIFAR ResNet, an ``nn.Sequential`` and a tiny BERT, streamed and pooled too; one host wait per tap
reached; ``torch.compile`` on the CPU; CUDA graphs where a GPU is present."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._pytree import tree_leaves

import sidenet
from sidenet import compile_for_serving
from test_cascade import KINDS, cascade, chunk, read_as_on_an_accelerator, set_mixed_thresholds
from test_compiled import assert_same_answers
from test_host_waits import counting_reads

ROW_BUCKETS = (2, 4, 8, 16, 32)


def batches_of(x: Any, size: int) -> list[Any]:
    # Not test_cascade_serving's: that module needs scipy, which the GPU image lacks (benchmarks/gpu_check.sh).
    n = len(x["input_ids"]) if isinstance(x, dict) else len(x)
    return [chunk(x, torch.arange(start, min(start + size, n))) for start in range(0, n, size)]


def mixed_cascade(kind: str) -> tuple[sidenet.AdaptiveModel, Any]:
    model, x = cascade(kind)
    set_mixed_thresholds(model, x)
    return model, x


def check_answers(kind: str, got: sidenet.AdaptiveOutput, want: sidenet.AdaptiveOutput) -> None:
    if kind == "text":  # text: padded to a bucket length, so FLOPs are those of the padded rows
        assert torch.equal(got.exit_stage, want.exit_stage) and torch.equal(got.exited, want.exited)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.confidence, want.confidence, atol=1e-5, rtol=0)
    else:
        assert_same_answers(got, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("buckets", [None, ROW_BUCKETS], ids=["exact-rows", "row-buckets"])
def test_compiled_cascade_answers_as_the_model(kind: str, buckets: tuple[int, ...] | None) -> None:
    model, x = mixed_cascade(kind)
    lengths = (4, 8, 16) if kind == "text" and buckets else None
    served = compile_for_serving(model, x, rest_buckets=buckets, length_buckets=lengths, backend="eager")
    steps = {f"step-{part}": "eager" for part in range(1, model.num_taps)}
    assert served.stage_backends == {"front": "eager", **steps, "rest": "eager"}
    reference = model(x)
    assert len(set(reference.exit_stage.tolist())) == model.num_taps + 1  # every stage answers some
    check_answers(kind, served(x), reference)
    for batch in batches_of(x, 7):  # smaller batches: other buckets, other counts per tap
        check_answers(kind, served(batch), model(batch))


@pytest.mark.parametrize("kind", KINDS)
def test_a_cascade_serves_batches_padded_to_a_served_size(kind: str) -> None:
    """``pad_batches`` (CUDA's default; forced on the CPU's eager stages): batches of 5 and 3 samples run at
    the warmed size 8, their padding rows never reach a later step, the answers are the model's."""
    model, x = mixed_cascade(kind)
    lengths = (4, 8, 16) if kind == "text" else None
    served = compile_for_serving(
        model,
        chunk(x, torch.arange(8)),
        batch_sizes=[8],
        rest_buckets=ROW_BUCKETS,
        length_buckets=lengths,
        backend="eager",
    )
    served.pad_batches = True
    stage = served._stage("front", model.policies[0])
    rows, run = [], stage.fn
    stage.fn = lambda inputs: rows.append(tree_leaves(inputs[0])[0].shape[0]) or run(inputs)
    for batch in (chunk(x, torch.arange(5)), chunk(x, torch.arange(5, 8)), chunk(x, torch.arange(8, 16))):
        check_answers(kind, served(batch), model(batch))
    assert rows == [8, 8, 8]


@pytest.mark.parametrize("kind", ["resnet", "text"])
def test_stream_and_pooled_router_serve_a_compiled_cascade(kind: str) -> None:
    model, x = mixed_cascade(kind)
    batches = batches_of(x, 8)
    served = compile_for_serving(model, batches[0], rest_buckets=ROW_BUCKETS, backend="eager")
    expected = [model(batch) for batch in batches]
    model.reset_stats()
    for got, want in zip(served.stream(batches), expected, strict=True):
        check_answers(kind, got, want)
    exits = sum(int(want.exited.sum()) for want in expected)
    assert model.samples_seen == len(torch.cat([w.exited for w in expected])) and model.samples_exited == exits
    model.reset_stats()
    rows: list[int] = []  # the row counts the later stages run at: row buckets only, pooled or not
    for name, stage in served._stages.items():
        if name[0] != "front":
            stage.fn = lambda x, run=stage.fn: rows.append(tree_leaves(x)[0].shape[0]) or run(x)
    routed = served.pooled_router(rest_batch=6, max_wait=1).run(batches)
    for answer, want in zip(routed, expected, strict=True):
        assert torch.equal(answer.output.exit_stage, want.exit_stage)
        torch.testing.assert_close(answer.output.logits, want.logits, atol=1e-5, rtol=0)
    assert model.samples_exited == exits  # later exits counted once their pooled pass has run
    assert rows and set(rows) <= set(ROW_BUCKETS), rows


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_cascade_reads_one_value_per_tap_reached(kind: str) -> None:
    model, x = mixed_cascade(kind)
    read_as_on_an_accelerator(model)
    served = compile_for_serving(model, x, rest_buckets=ROW_BUCKETS, backend="eager")
    mixed = list(model.thresholds)
    for thresholds, reached in [(mixed, model.num_taps), ([0.0] * model.num_taps, 1), ([*mixed[:1], 0.0, 0.0], 2)]:
        model.thresholds = thresholds[: model.num_taps]
        served(x)  # warm-up: FLOPs are measured once per input size
        with counting_reads() as reads:
            served(x)
        assert reads == ["tolist"] * reached


def test_new_thresholds_of_a_cascade_are_served() -> None:
    model, x = mixed_cascade("resnet")
    served = compile_for_serving(model, x, rest_buckets=ROW_BUCKETS, backend="eager")
    model.thresholds = [sidenet.NEVER_EXIT, 0.0, sidenet.NEVER_EXIT]
    output = served(x)
    assert torch.equal(output.exit_stage, torch.ones(len(x), dtype=torch.long))
    assert_same_answers(output, model(x))


def test_inductor_on_cpu_compiles_each_step_of_a_cascade() -> None:
    model, x = mixed_cascade("sequential")
    served = compile_for_serving(model, x, backend="inductor")
    assert set(served.stage_backends) == {"front", "step-1", "rest"}
    assert set(served.stage_backends.values()) <= {"inductor", "eager"}
    output, reference = served(x), model(x)
    assert torch.equal(output.exit_stage, reference.exit_stage)
    torch.testing.assert_close(output.logits, reference.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_serve_a_cascade(dtype: torch.dtype) -> None:
    model, x = mixed_cascade("resnet")
    model = model.to("cuda", dtype)
    batches = [batch.to("cuda", dtype) for batch in batches_of(x, 8)]
    served = compile_for_serving(model, batches[0], backend="cuda_graph")
    assert set(served.stage_backends.values()) == {"cuda_graph"}
    expected = [model(batch) for batch in batches]
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    for got, want in zip(served.stream(batches), expected, strict=True):
        if dtype == torch.float32:  # bf16: exits may differ for scores within rounding of a threshold
            assert torch.equal(got.exit_stage, want.exit_stage)
            torch.testing.assert_close(got.logits.float(), want.logits.float(), atol=tolerance, rtol=0)


def test_each_stage_compiles_into_its_own_cache() -> None:
    """Dynamo caches graphs per code object and recompiles at most 8 times: stages built from one closure
    (a cascade's steps) share a cache unless each has its own code (``own_code``)."""
    from torch._dynamo.utils import counters

    from sidenet.compiled_stages import own_code

    def closure_over(layer: torch.nn.Module):
        def step(x: torch.Tensor) -> torch.Tensor:
            return layer(x).relu()

        return step

    layers = [torch.nn.Linear(4, 4) for _ in range(10)]
    x = torch.randn(2, 4)
    counters.clear()
    for layer in layers:  # the same code object for all: one cache, guarded on each module
        torch.compile(closure_over(layer), backend="eager")(x)
    shared = counters["stats"]["unique_graphs"]
    counters.clear()
    for k, layer in enumerate(layers):
        compiled = torch.compile(own_code(closure_over(layer), f"stage_{k}"), backend="eager")
        torch.testing.assert_close(compiled(x), layer(x).relu())
        compiled(x)  # the same shape again: no recompilation
    assert shared < len(layers)  # the recompile limit cut it short: the later modules ran eagerly
    assert counters["stats"]["unique_graphs"] == len(layers)


def static_outputs_call(self: Any, x: Any) -> Any:
    """Stands in for a CUDA graph's replay on the CPU: the outputs are written into buffers kept per
    stage, copy and input shape (a captured graph's static outputs) and those buffers returned, so that
    the next call at that shape overwrites what an earlier call returned."""
    from torch.utils._pytree import tree_map

    from sidenet.cuda_graphs import shape_key

    self._turn = (self._turn + 1) % self.copies
    key = (self._turn, shape_key(x))
    out = self.fn(x)
    buffers = self.__dict__.setdefault("static_outputs", {})
    if key not in buffers:
        buffers[key] = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
    else:
        for static, fresh in zip(tree_leaves(buffers[key]), tree_leaves(out), strict=True):
            static.copy_(fresh)
    return buffers[key]


@pytest.mark.parametrize("kind", ["resnet", "text"])
@pytest.mark.parametrize(("taps", "answers_all"), [(1, None), (3, None), (3, 0), (3, 1)])
def test_static_stage_outputs_are_copied_before_the_next_replay(
    kind: str, taps: int, answers_all: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What CUDA graphs demand, checked on the CPU: every stage output that outlives the next replay of
    its stage (answers handed back, pipelined fronts, pooled states, a cascade's later steps) is copied
    first. The answers are compared after all batches ran, so an alias of a static buffer would show."""
    from sidenet.compiled import CompiledAdaptiveModel
    from sidenet.compiled_stages import Stage

    model, x = mixed_cascade(kind)
    model = model.with_taps(model.taps[:taps])
    batches = batches_of(x, 8)
    if answers_all is not None:  # whole batches exit at one SideNet: their answers are that stage's outputs
        model.thresholds = [sidenet.NEVER_EXIT] * answers_all + [0.0] * (model.num_taps - answers_all)
    expected = [model(batch) for batch in batches]
    monkeypatch.setattr(Stage, "__call__", static_outputs_call)
    monkeypatch.setattr(CompiledAdaptiveModel, "reuses_outputs", property(lambda self: True))
    served = compile_for_serving(model, batches[0], rest_buckets=ROW_BUCKETS, backend="eager")
    for got, want in zip(served.stream(batches), expected, strict=True):
        check_answers(kind, got, want)
    for got, want in zip([served(batch) for batch in batches], expected, strict=True):
        check_answers(kind, got, want)
    # Continuing samples wait over three submissions (rest batch 20 of batches of 8): their pooled states
    # must not be the front's buffers, which the third submission overwrites.
    routed = served.pooled_router(rest_batch=20, max_wait=3).run(batches)
    for answer, want in zip(routed, expected, strict=True):
        assert torch.equal(answer.output.exit_stage, want.exit_stage)
        torch.testing.assert_close(answer.output.logits, want.logits, atol=1e-5, rtol=0)
