"""``compile_for_serving(..., rest_shapes="static")``: the rest compiled once per row bucket (static shapes,
where inductor may lay convolutions out channels-last) instead of once for all row counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sidenet
from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images, threshold_between
from sidenet import compile_for_serving
from sidenet.compiled_stages import Stage
from test_compiled import assert_same_answers, cuda_mixed_model, mixed_model
from test_compiled_graphs import assert_near_the_model


def linear_model() -> tuple[sidenet.AdaptiveModel, torch.Tensor]:
    torch.manual_seed(0)
    mainnet = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    model = sidenet.attach(mainnet, 2, input_shape=(16,), hidden=8, seed=0)
    return model, torch.randn(32, 16, generator=torch.Generator().manual_seed(1))


def test_static_rest_compiles_a_graph_per_bucket_and_answers_as_the_model() -> None:
    from torch._dynamo.utils import counters

    model, x = linear_model()
    scores = model(x, mode="side").confidence
    model.threshold = threshold_between(scores, 0.2)
    graphs = counters["stats"]["unique_graphs"]
    served = compile_for_serving(model, x, rest_buckets=(4, 8, 16), backend="inductor", rest_shapes="static")
    assert counters["stats"]["unique_graphs"] - graphs == 4  # the front, and the rest at each of 3 buckets
    for stage in served._stages.values():  # compiled, whatever the CPU's warm-up timing kept
        stage.backend = "inductor"
    rest = served._stage("rest", None)
    assert rest.rows == "static" and len(rest._compiled.compiled_shapes) == 3
    for quantile in (0.1, 0.2, 0.4):  # about 3, 6 and 13 continuing samples: buckets 4, 8 and 16
        model.threshold = threshold_between(scores, quantile)
        reference = model(x)
        continuing = int((~reference.exited).sum())
        assert 0 < continuing <= 16
        assert_same_answers(served(x), reference)
    assert counters["stats"]["unique_graphs"] - graphs == 4  # no count of continuing samples compiled anew


def test_static_and_dynamic_rests_answer_alike_on_a_convolutional_mainnet() -> None:
    model, batches = mixed_model()
    static = compile_for_serving(model, batches[0], rest_buckets=(8, 16, 24), backend="inductor", rest_shapes="static")
    dynamic = compile_for_serving(model, batches[0], rest_buckets=(8, 16, 24), backend="inductor")
    assert static.rest_shapes == "static" and dynamic.rest_shapes == "dynamic"
    for x in batches:
        assert_same_answers(static(x), dynamic(x), atol=1e-4)


# torch 2.11 (the GPU image's) runs the static graph's CPU convolutions without mkldnn in the contiguous
# layout and fails the channels-last strides inductor planned (seen in `make gpu-rehearsal`): an artefact of
# switching mkldnn off on a CPU, which the GPU path does not take; this project's lock (2.14) runs it.
OLD_TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14)


@pytest.mark.skipif(OLD_TORCH, reason="before torch 2.14, CPU convolutions without mkldnn break inductor's layout")
@pytest.mark.parametrize(("rows", "channels_last"), [("dynamic", False), ("static", True)])
def test_inductor_lays_convolutions_out_channels_last_only_in_a_rest_of_static_shapes(
    rows: str, channels_last: bool
) -> None:
    """Why ``rest_shapes="static"`` exists. Inductor decides per graph whether to run its convolutions
    channels-last (``GraphLowering.decide_layout_opt``), and decides against it where their shapes are symbolic
    (pytorch/pytorch#102670): a rest compiled for every row count gets the slower layout on a GPU, one compiled
    per row bucket the one the MainNet compiled alone gets. On the CPU inductor's mkldnn convolutions are always
    channels-last, so mkldnn is switched off here to take the path a GPU's graphs take; the compilation caches
    too, which would skip the decision for a graph compiled before."""
    import torch._inductor.graph as inductor_graph

    model = sidenet.attach(build_tiny_mainnet(), "layer1", input_shape=IMAGE_SHAPE, hidden=16, pool_size=2, seed=0)
    with torch.no_grad():
        state = model.split.trunk(make_images(16))
    stage = Stage(model.split.rest, "inductor", name="rest", rows=rows)
    decide, decisions = inductor_graph.GraphLowering.decide_layout_opt, []

    def recorded(gm: torch.fx.GraphModule, *, is_inference: bool) -> bool:
        decisions.append(decide(gm, is_inference=is_inference))
        return decisions[-1]

    inductor_graph.GraphLowering.decide_layout_opt = staticmethod(recorded)
    try:
        # Every compilation cache off, not the FX graph cache alone: AOTAutograd's cache serves compiled graphs
        # too, keyed without the mkldnn switch, and a graph from it skips the decision. (With only the FX graph
        # cache off, one full run on this CPU failed here: a kernel expected its convolution channels-last and
        # met it contiguous; not reproduced in the runs after it.)
        with (
            torch.backends.mkldnn.flags(enabled=False),
            torch.compiler.config.patch(force_disable_caches=True),
            torch.no_grad(),
        ):
            for count in (4, 8, 16):
                stage(state[:count])
    finally:
        inductor_graph.GraphLowering.decide_layout_opt = staticmethod(decide)
    assert set(decisions) == {channels_last}  # every graph compiled: one per count (static), one or two (dynamic)
    assert len(decisions) == 3 if rows == "static" else len(decisions) < 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rest_shapes": "static"}, "rest_shapes='static' compiles a graph per row bucket: give rest_buckets"),
        ({"rest_shapes": "per-bucket", "rest_buckets": (4,)}, "rest_shapes must be 'dynamic' or 'static'"),
    ],
)
def test_rest_shapes_are_checked(kwargs: dict, message: str) -> None:
    model, x = linear_model()
    with pytest.raises(ValueError, match=message):
        compile_for_serving(model, x, backend="inductor", **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_static_rest_captures_compiled_kernels_per_bucket(dtype: torch.dtype) -> None:
    model, batches = cuda_mixed_model(dtype)
    served = compile_for_serving(model, batches[0], rest_buckets=(8, 24), rest_shapes="static")
    assert served.stage_backends == {"front": "inductor_cuda_graph", "rest": "inductor_cuda_graph"}
    assert len(served._stage("rest", None)._compiled.compiled_shapes) == 2  # one graph per bucket
    assert_near_the_model(served, model, batches, dtype)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_a_channels_last_mainnet_keeps_its_rest_channels_last_in_one_graph_for_all_row_counts(
    memory_format: torch.memory_format, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other way to the fast layout, without a compilation per bucket: inductor declines to choose
    channels-last for symbolic shapes, but keeps the layout the eager model runs in, so a MainNet converted
    with ``.to(memory_format=torch.channels_last)`` (and routed channels-last: ``tests/test_memory_format.py``)
    runs the convolutions of its dynamic rest channels-last. Seen on the CPU with mkldnn off (the path a GPU's
    graphs take), by recording the layout of every convolution the compiled rest calls. Row counts stay under
    16: from 16 rows the CPU's convolution without mkldnn runs contiguous even in eager PyTorch (another
    backend; cuDNN keeps channels-last at any batch), and the compiled graph follows eager."""
    from torch._inductor.select_algorithm import extern_kernels

    mainnet = build_tiny_mainnet().to(memory_format=memory_format)
    model = sidenet.attach(mainnet, "layer1", input_shape=IMAGE_SHAPE, hidden=16, pool_size=2, seed=0)
    with torch.no_grad():
        state = model.split.trunk(make_images(16).contiguous(memory_format=memory_format))
    stage = Stage(model.split.rest, "inductor", name="rest", rows="dynamic")
    layouts: list[bool] = []
    convolution = extern_kernels.convolution

    def recorded(x: torch.Tensor, weight: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return convolution(x, weight, *args, **kwargs)

    monkeypatch.setattr(extern_kernels, "convolution", recorded)
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]

    with torch.backends.mkldnn.flags(enabled=False), inductor_config.patch(fx_graph_cache=False), torch.no_grad():
        for count in (2, 4, 8):
            got = stage(state[:count])
            torch.testing.assert_close(got, model.split.rest(state[:count]), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one graph for the three row counts
    assert layouts and set(layouts) == {memory_format == torch.channels_last}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_channels_last_mainnet_serves_with_a_dynamic_rest(dtype: torch.dtype) -> None:
    model, batches = cuda_mixed_model(dtype)
    model.split.mainnet.to(memory_format=torch.channels_last)
    batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    served = compile_for_serving(model, batches[0], rest_buckets=(8, 24))
    assert served.rest_shapes == "dynamic" and served.stage_backends["rest"] == "inductor_cuda_graph"
    assert_near_the_model(served, model, batches, dtype)
