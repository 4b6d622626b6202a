"""The compiled serving mode: the same answers as ``model(x)`` whatever runs the stages (eager with row
and length buckets, ``torch.compile``, CUDA graphs where a GPU is present), one host wait per batch,
pipelined streams and the pooled router over compiled stages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sidenet
from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images, threshold_between
from sidenet import compile_for_serving
from test_host_waits import counting_reads


def mixed_model() -> tuple[sidenet.AdaptiveModel, list[torch.Tensor]]:
    model = sidenet.attach(build_tiny_mainnet(), "layer1", input_shape=IMAGE_SHAPE, hidden=16, pool_size=2, seed=0)
    batches = [make_images(24, seed=seed) for seed in range(3)]
    model.threshold = threshold_between(torch.cat([model(x, mode="side").confidence for x in batches]), 0.6)
    return model, batches


def cuda_mixed_model(dtype: torch.dtype) -> tuple[sidenet.AdaptiveModel, list[torch.Tensor]]:
    """:func:`mixed_model` and its batches on the CUDA device in ``dtype``."""
    model, batches = mixed_model()
    return model.to("cuda", dtype), [x.to("cuda", dtype) for x in batches]


def assert_same_answers(served: sidenet.AdaptiveOutput, eager: sidenet.AdaptiveOutput, atol: float = 1e-5) -> None:
    assert torch.equal(served.exited, eager.exited) and torch.equal(served.exit_stage, eager.exit_stage)
    torch.testing.assert_close(served.confidence, eager.confidence, atol=atol, rtol=0)
    torch.testing.assert_close(served.logits, eager.logits, atol=atol, rtol=0)
    torch.testing.assert_close(served.flops, eager.flops)


def test_eager_stages_with_row_buckets_answer_as_the_model() -> None:
    model, batches = mixed_model()
    served = compile_for_serving(model, batches[0], rest_buckets=(4, 8, 16), backend="eager")
    assert served.stage_backends == {"front": "eager", "rest": "eager"}
    for x in batches:
        output = served(x)
        assert 0 < int(output.exited.sum()) < len(x)
        assert_same_answers(output, model(x))


def test_stream_pipelines_and_records_every_batch() -> None:
    model, batches = mixed_model()
    served = compile_for_serving(model, batches[0], rest_buckets=(8, 32), backend="eager")
    expected = [model(x) for x in batches]
    model.reset_stats()
    outputs = list(served.stream(batches))
    assert len(outputs) == len(batches)
    for output, reference in zip(outputs, expected, strict=True):
        assert_same_answers(output, reference)
    assert model.samples_seen == 3 * 24
    assert model.samples_exited == sum(int(o.exited.sum()) for o in expected)


def test_compiled_batch_reads_one_value() -> None:
    model, batches = mixed_model()
    model.check_values = False
    served = compile_for_serving(model, batches[0], rest_buckets=(8, 16, 32), backend="eager")
    with counting_reads() as reads:
        served(batches[1])
    assert reads == ["tolist"]


def test_pooled_router_over_compiled_stages() -> None:
    model, batches = mixed_model()
    served = compile_for_serving(model, batches[0], rest_buckets=(8, 16, 32), backend="eager")
    routed = served.pooled_router(rest_batch=16, max_wait=2).run(batches)
    for answer, x in zip(routed, batches, strict=True):
        assert_same_answers(answer.output, model(x))


def test_pooled_rests_run_at_row_buckets_only() -> None:
    """A pooled rest runs on however many samples have gathered (a full rest batch, or fewer when one has
    waited ``max_wait`` batches or at the end); padded to the next row bucket like a batch's own rest, it
    meets only the shapes captured or compiled at warm-up. Unpadded, every new count would be a new CUDA
    graph capture (with ``rest_shapes="static"`` a new compilation) while serving."""
    model, batches = mixed_model()
    served = compile_for_serving(model, batches[0], rest_buckets=(8, 16, 24), backend="eager")
    stage = served._stage("rest", None)
    rows, run = [], stage.fn
    stage.fn = lambda state: rows.append(len(state)) or run(state)
    for rest_batch, max_wait in ((16, 2), (24, 1), (None, 0)):
        routed = served.pooled_router(rest_batch=rest_batch, max_wait=max_wait).run(batches)
        for answer, x in zip(routed, batches, strict=True):
            assert_same_answers(answer.output, model(x))
    assert rows and set(rows) <= {8, 16, 24}, rows


def test_batches_of_other_sizes_are_padded_to_a_served_size() -> None:
    """On CUDA (``pad_batches``; forced here on the CPU's eager stages) a batch of a size not warmed up is
    padded with its own rows to the next warmed size, so it replays a graph captured ahead instead of being
    captured (or recompiled) while served: the front meets warmed sizes only (larger batches their own),
    padded rows never continue nor count, and the answers are the model's, per batch, pipelined and pooled."""
    model, batches = mixed_model()
    x = torch.cat(batches)
    served = compile_for_serving(model, x[:16], batch_sizes=[8, 16], rest_buckets=(4, 8, 16), backend="eager")
    assert not served.pad_batches  # the CPU's default: there padding costs compute
    served.pad_batches = True
    stage = served._stage("front", model.policies[0])
    sizes, run = [], stage.fn
    stage.fn = lambda inputs: sizes.append(len(inputs[0])) or run(inputs)
    odd = [x[:3], x[3:8], x[8:19], x[19:35], x[35:59]]  # 3, 5, 11, 16 and 24 samples
    expected = [model(batch) for batch in odd]
    seen = model.samples_seen
    for batch, want in zip(odd, expected, strict=True):
        assert_same_answers(served(batch), want)
    assert model.samples_seen - seen == sum(len(batch) for batch in odd)  # padding is not traffic
    for got, want in zip(served.stream(odd), expected, strict=True):
        assert_same_answers(got, want)
    for answer, want in zip(served.pooled_router(rest_batch=8, max_wait=1).run(odd), expected, strict=True):
        assert_same_answers(answer.output, want)
    assert set(sizes) == {8, 16, 24}  # 3 and 5 ran at 8, 11 at 16; 24 is larger than any warmed size
    assert 0 < sum(int(w.exited.sum()) for w in expected) < len(x[:59])
    model.threshold = sidenet.NEVER_EXIT  # every sample of a padded batch continues: its padding does not
    for answer, batch in zip(served.pooled_router(rest_batch=8, max_wait=1).run(odd), odd, strict=True):
        assert not answer.output.exited.any() and len(answer.output.logits) == len(batch)
        torch.testing.assert_close(answer.output.logits, model(batch, mode="main").logits, atol=1e-5, rtol=0)


def test_new_threshold_is_served() -> None:
    model, batches = mixed_model()
    served = compile_for_serving(model, batches[0], backend="eager")
    model.threshold = sidenet.NEVER_EXIT
    output = served(batches[0])
    assert not output.exited.any()
    torch.testing.assert_close(output.logits, model(batches[0], mode="main").logits, atol=1e-5, rtol=0)


def test_text_length_and_row_buckets_answer_as_the_model() -> None:
    pytest.importorskip("transformers")
    from test_text_split import attached, make_batch, tiny_encoder

    model = attached(tiny_encoder("bert"), tap=2)
    batches = [make_batch([7, 3, 12, 5, 12, 1, 9, 4], seed=seed) for seed in range(3)]
    model.threshold = threshold_between(torch.cat([model(b, mode="side").confidence for b in batches]), 0.5)
    served = compile_for_serving(model, batches[0], rest_buckets=(2, 4, 8), length_buckets=(4, 8, 16), backend="eager")
    for batch in batches:
        output, reference = served(batch), model(batch)
        assert torch.equal(output.exited, reference.exited)
        torch.testing.assert_close(output.logits, reference.logits, atol=1e-5, rtol=0)
    # Padded to 16 tokens: FLOPs are those of the padded batch (what ran), never fewer than eager's.
    assert bool((output.flops >= reference.flops).all())


def test_inductor_on_cpu_keeps_the_faster_form_of_each_stage() -> None:
    torch.manual_seed(0)
    mainnet = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    model = sidenet.attach(mainnet, 2, input_shape=(16,), hidden=8, seed=0)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    model.threshold = threshold_between(model(x, mode="side").confidence, 0.5)
    served = compile_for_serving(model, x, backend="inductor")
    assert set(served.stage_backends.values()) <= {"inductor", "eager"}
    assert served.compile_seconds > 0
    output, reference = served(x), model(x)
    assert torch.equal(output.exited, reference.exited)
    torch.testing.assert_close(output.logits, reference.logits, atol=1e-5, rtol=1e-5)


def test_autotune_compiles_every_stage_in_max_autotune_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """``autotune=True``: each stage goes to ``torch.compile`` with max-autotune's mode less its CUDA graphs
    (the graph backends capture stages themselves), and the answers stay the model's."""
    from sidenet.compiled_stages import AUTOTUNE_MODE

    modes: list[str | None] = []
    compile_ = torch.compile

    def recording(fn: object, **options: object) -> object:
        modes.append(options.get("mode"))  # type: ignore[arg-type]
        return compile_(fn, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "compile", recording)
    torch.manual_seed(0)
    mainnet = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    model = sidenet.attach(mainnet, 2, input_shape=(16,), hidden=8, seed=0)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    model.threshold = threshold_between(model(x, mode="side").confidence, 0.5)
    served = compile_for_serving(model, x, backend="inductor", autotune=True)
    assert served.autotune and modes == [AUTOTUNE_MODE, AUTOTUNE_MODE]  # the front and the rest
    for stage in served._stages.values():  # compiled whatever the warm-up timing kept
        stage.backend = "inductor"
    with torch.no_grad():
        output, reference = served(x), model(x)
    assert torch.equal(output.exited, reference.exited) and 0 < int(output.exited.sum()) < len(x)
    torch.testing.assert_close(output.logits, reference.logits, atol=1e-5, rtol=1e-5)
    modes.clear()
    compile_for_serving(model, x, backend="inductor")
    assert modes == [None, None]  # torch.compile's default mode unless asked


def test_new_thresholds_are_an_input_not_a_recompilation() -> None:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    mainnet = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    model = sidenet.attach(mainnet, 2, input_shape=(16,), hidden=8, seed=0)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    scores = model(x, mode="side").confidence
    model.threshold = threshold_between(scores, 0.5)
    served = compile_for_serving(model, x, backend="inductor")
    for stage in served._stages.values():  # keep both stages compiled whatever the warm-up timing said
        stage.backend = "inductor"
    served(x)
    graphs = counters["stats"]["unique_graphs"]
    # More values than dynamo's recompile limit (8): a threshold baked into the graph would fall back to eager.
    for quantile in (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95):
        model.threshold = threshold_between(scores, quantile)
        output, reference = served(x), model(x)
        assert torch.equal(output.exited, reference.exited) and 0 < int(output.exited.sum()) < len(x)
        torch.testing.assert_close(output.logits, reference.logits, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(served._stages) == 2  # one front and one rest: the threshold is an input


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backend": "tensorrt"}, "backend must be one of"),
        ({"backend": "cuda_graph"}, "needs the model and the example on a CUDA device"),
        ({"batch_sizes": [0]}, "batch sizes must be positive"),
        ({"backend": "eager", "autotune": True}, "compiles none"),
    ],
)
def test_bad_options_are_named(options: dict, message: str) -> None:
    model, batches = mixed_model()
    with pytest.raises(ValueError, match=message):
        compile_for_serving(model, batches[0], **options)


def test_only_adaptive_models_are_served() -> None:
    with pytest.raises(ValueError, match="takes a sidenet.AdaptiveModel"):
        compile_for_serving(build_tiny_mainnet(), make_images(4))  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_answer_as_the_model(dtype: torch.dtype) -> None:
    model, batches = cuda_mixed_model(dtype)
    served = compile_for_serving(model, batches[0], backend="cuda_graph")  # the eager kernels: exits identical
    assert served.stage_backends == {"front": "cuda_graph", "rest": "cuda_graph"}
    expected = [model(x) for x in batches]
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    for output, reference in zip(served.stream(batches), expected, strict=True):
        assert torch.equal(output.exited, reference.exited)
        torch.testing.assert_close(output.logits.float(), reference.logits.float(), atol=tolerance, rtol=0)
    routed = served.pooled_router(rest_batch=16).run(batches)
    for answer, reference in zip(routed, expected, strict=True):
        assert torch.equal(answer.output.exited, reference.exited)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cuda_stream_waits_once_per_batch_on_an_event() -> None:
    model, batches = mixed_model()
    model = model.to("cuda")
    batches = [x.to("cuda") for x in batches]
    served = compile_for_serving(model, batches[0], rest_buckets=(8, 24))  # the default backend, few shapes
    list(served.stream(batches))  # warm-up: every shape captured
    waits: list[str] = []
    allowed = {"tolist": torch.Tensor.tolist, "synchronize": torch.cuda.Event.synchronize}

    def permitted(name: str):
        def wait(self, *args, **kwargs):
            waits.append(name)
            torch.cuda.set_sync_debug_mode(0)
            try:
                return allowed[name](self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error")

        return wait

    torch.Tensor.tolist = permitted("tolist")  # type: ignore[method-assign]
    torch.cuda.Event.synchronize = permitted("synchronize")  # type: ignore[method-assign]
    torch.cuda.set_sync_debug_mode("error")
    try:
        outputs = list(served.stream(batches))
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.Tensor.tolist = allowed["tolist"]  # type: ignore[method-assign]
        torch.cuda.Event.synchronize = allowed["synchronize"]  # type: ignore[method-assign]
    assert len(outputs) == len(batches)
    # One wait per batch, on the event after its count (tolist then reads pinned host memory).
    assert waits == ["synchronize", "tolist"] * len(batches)


def test_each_stage_compiles_once_at_warm_up() -> None:
    """The rest runs at many row counts: marked dynamic in its rows it compiles once, not once for the first
    count and again when Dynamo sees a second; and the CPU's faster-form timing runs without grad, as the
    stages serve (Dynamo guards on grad mode: timed with grad, each stage compiled twice)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    mainnet = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    model = sidenet.attach(mainnet, 2, input_shape=(16,), hidden=8, seed=0)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    model.threshold = threshold_between(model(x, mode="side").confidence, 0.5)
    graphs = counters["stats"]["unique_graphs"]
    served = compile_for_serving(model, x, backend="inductor")
    assert counters["stats"]["unique_graphs"] - graphs == 2  # the front and the rest
    for stage in served._stages.values():
        stage.backend = "inductor"
    for rows in (5, 9, 17):  # other counts of continuing samples: the same rest graph
        served.rest(served.model.split.trunk(x[:rows]))
    assert counters["stats"]["unique_graphs"] - graphs == 2
