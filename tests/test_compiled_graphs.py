"""The compiled serving mode's CUDA-graph backends: ``inductor_cuda_graph`` (the default on CUDA) captures the
kernels ``torch.compile`` generated, and a stage whose compiled kernels cannot be captured falls back to
capturing its eager ones. On the CPU the capture is a stand-in (static outputs, as a graph's are), so what is
checked here is which function each stage captures and that the answers stay ``model(x)``'s; the CUDA tests
at the end capture for real."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._pytree import tree_leaves, tree_map

import sidenet
from sidenet.compiled import CompiledAdaptiveModel, compile_for_serving
from test_compiled import assert_same_answers, cuda_mixed_model, mixed_model

COMPILED = "compiled by the stand-in torch.compile"


class StandInGraph:
    """A CUDA graph's behaviour without a GPU: ``fn`` run at capture (``captured`` records which), each
    call's outputs written into the same static tensors, which the next call overwrites."""

    captured: list[Any] = []
    refuse_compiled = False

    def __init__(self, fn: Any, example: Any) -> None:
        if self.refuse_compiled and getattr(fn, COMPILED, False):
            raise RuntimeError("operation not permitted when stream is capturing")
        StandInGraph.captured.append(fn)
        self.fn = fn
        self.outputs = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, fn(example))

    def __call__(self, x: Any) -> Any:
        for static, fresh in zip(tree_leaves(self.outputs), tree_leaves(self.fn(x)), strict=True):
            static.copy_(fresh)
        return self.outputs


def stand_in_compile(fn: Any, **_: Any) -> Any:
    """``torch.compile`` replaced by a marked wrapper: inductor's kernels are not what is under test."""

    def compiled(x: Any) -> Any:
        return fn(x)

    setattr(compiled, COMPILED, True)
    return compiled


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[StandInGraph]:
    monkeypatch.setattr("sidenet.compiled_stages.CudaGraphStage", StandInGraph)
    monkeypatch.setattr(torch, "compile", stand_in_compile)
    monkeypatch.setattr(StandInGraph, "captured", [])
    monkeypatch.setattr(StandInGraph, "refuse_compiled", False)
    return StandInGraph


def served_with(backend: str) -> tuple[CompiledAdaptiveModel, sidenet.AdaptiveModel, list[torch.Tensor]]:
    """The mixed model served on ``backend`` at row buckets, built as compile_for_serving builds it on CUDA."""
    model, batches = mixed_model()
    served = CompiledAdaptiveModel(model, backend, rest_buckets=(4, 8, 16, 24))
    served.warm_up(batches[0], [24])
    return served, model, batches


@pytest.mark.parametrize("backend", ["inductor_cuda_graph", "cuda_graph"])
def test_each_graph_backend_captures_its_own_kernels(stand_in: type[StandInGraph], backend: str) -> None:
    served, model, batches = served_with(backend)
    assert served.stage_backends == {"front": backend, "rest": backend}
    assert served.reuses_outputs
    compiled = [getattr(fn, COMPILED, False) for fn in stand_in.captured]
    assert len(compiled) >= 3  # the front (two copies) and the rest at its buckets
    assert all(compiled) if backend == "inductor_cuda_graph" else not any(compiled)
    expected = [model(x) for x in batches]
    for got, want in zip(list(served.stream(batches)), expected, strict=True):
        assert_same_answers(got, want)


def test_a_stage_whose_compiled_kernels_cannot_be_captured_captures_its_eager_ones(
    stand_in: type[StandInGraph],
) -> None:
    stand_in.refuse_compiled = True
    with pytest.warns(RuntimeWarning, match="could not be captured in a CUDA graph"):
        served, model, batches = served_with("inductor_cuda_graph")
    assert served.stage_backends == {"front": "cuda_graph", "rest": "cuda_graph"}
    assert stand_in.captured and not any(getattr(fn, COMPILED, False) for fn in stand_in.captured)
    for x in batches:
        assert_same_answers(served(x), model(x))


def front_rows(served: CompiledAdaptiveModel) -> set[int]:
    """The batch sizes the front's graphs were captured at (each key: the copy, then the input shapes)."""
    return {key[1][0][0][0] for key in served._stage("front", served.model.policies[0])._graphs}


def test_graph_backends_pad_a_batch_to_a_captured_size(stand_in: type[StandInGraph]) -> None:
    """On the graph backends a batch of a size not warmed up replays the graph of the next warmed size,
    padded with its own rows, instead of being captured while served (a larger one is captured)."""
    model, batches = mixed_model()
    x = torch.cat(batches)
    served = CompiledAdaptiveModel(model, "inductor_cuda_graph", rest_buckets=(4, 8, 16, 24), batch_sizes=(8, 24))
    assert served.pad_batches
    served.warm_up(x[:24], [8, 24])
    for batch in (x[:5], x[5:18], x[18:26], x[26:29]):  # 5, 13, 8 and 3 samples
        assert_same_answers(served(batch), model(batch))
    assert front_rows(served) == {8, 24}
    assert_same_answers(served(x[29:59]), model(x[29:59]))  # 30: past every warmed size, captured at its own
    assert front_rows(served) == {8, 24, 30}


@pytest.mark.parametrize("backend", ["inductor_cuda_graph", "cuda_graph"])
def test_graph_backends_need_cuda(backend: str) -> None:
    model, batches = mixed_model()
    with pytest.raises(ValueError, match=f"backend='{backend}' needs the model and the example on a CUDA device"):
        compile_for_serving(model, batches[0], backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_default_captures_compiled_kernels_and_answers_as_the_model(dtype: torch.dtype) -> None:
    model, batches = cuda_mixed_model(dtype)
    served = compile_for_serving(model, batches[0], rest_buckets=(8, 24))
    assert served.stage_backends == {"front": "inductor_cuda_graph", "rest": "inductor_cuda_graph"}
    assert_near_the_model(served, model, batches, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cuda_batches_of_other_sizes_replay_the_graphs_of_warmed_sizes() -> None:
    model, batches = cuda_mixed_model(torch.float32)
    x = torch.cat(batches)
    served = compile_for_serving(model, x[:24], batch_sizes=[8, 24])
    odd = [x[:5], x[5:18], x[18:21]]
    assert_near_the_model(served, model, odd, torch.float32)
    assert front_rows(served) == {8, 24}


def assert_near_the_model(
    served: CompiledAdaptiveModel, model: sidenet.AdaptiveModel, batches: list[torch.Tensor], dtype: torch.dtype
) -> None:
    """Compiled (fused) kernels round differently: exits may differ only for scores within rounding of the
    threshold, logits by rounding. In float32 on CUDA, cuDNN runs convolutions in TF32 by default
    (``torch.backends.cudnn.allow_tf32``) and compiled stages may pick other algorithms than the eager model:
    on an H100 (2026-11-28) logits moved by up to 4.2e-4, past the 1e-4 first allowed here."""
    margin, tolerance = (2e-3, 2e-3) if dtype == torch.float32 else (3e-2, 1e-1)
    for got, want in zip(served.stream(batches), [model(x) for x in batches], strict=True):
        clear = (want.confidence.float() - model.threshold).abs() > margin
        assert torch.equal(got.exited[clear], want.exited[clear])
        same = clear & got.exited.eq(want.exited)
        torch.testing.assert_close(got.logits[same].float(), want.logits[same].float(), atol=tolerance, rtol=0)


def test_row_marks_stay_off_the_callers_tensors() -> None:
    """The rest is compiled dynamic in its rows; when every sample continues its state holds the input's own
    attention mask, and a mark on that tensor made the front (compiled at its batch size) refuse the next
    batch ("marked as dynamic but your code specialized it")."""
    from test_host_waits import mixed_text_model

    model, x = mixed_text_model()
    model.threshold = sidenet.NEVER_EXIT
    served = compile_for_serving(model, x, backend="inductor")
    for stage in served._stages.values():  # both compiled, whatever the warm-up timing kept
        stage.backend = "inductor"
    for _ in range(3):
        output, reference = served(x), model(x)
        torch.testing.assert_close(output.logits, reference.logits, atol=1e-5, rtol=1e-5)
    assert not any(hasattr(t, "_dynamo_dynamic_indices") for t in x.values() if isinstance(t, torch.Tensor))
