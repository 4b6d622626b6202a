"""Device and precision: attach, fit, sweep, calibrate, save/load, the pooled router, the report and FLOPs
counting with float16 and bfloat16 MainNets (a tiny CIFAR ResNet on 3x8x8 images and a tiny BERT), held
to the float32 model; confidences and exits in float32 whatever the MainNet's dtype; a MainNet on the
'meta' device refused with a clear error; the same pipeline on CUDA in bfloat16 where a GPU is present.

Tolerances against float32 are stated per dtype in ``CONFIDENCE_TOLERANCE`` and ``LOGIT_TOLERANCE``:
a few units of the dtype's precision, measured on these models with margin (bfloat16 keeps 8 bits of
mantissa, float16 11).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import sidenet
from helpers import randomize_batchnorm, threshold_between, tiny_bert
from sidenet import NEVER_EXIT, AdaptiveModel, MainNetMismatchError, TradeoffCurve, collect
from sidenet.calibration import calibrate, calibration_metrics, sidenet_logits
from sidenet.models.cifar_resnet import cifar_resnet
from sidenet.report import ReportSettings, build_report
from sidenet.serving import PooledRouter
from sidenet.training import cache_features, train_sidenet

HALF = [torch.float16, torch.bfloat16]
# Largest |confidence - float32 model's confidence| and |logit difference| / logit scale accepted.
CONFIDENCE_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
LOGIT_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 4e-2}
IMAGE = (3, 8, 8)
CLASSES = 4
VOCAB, LAYERS = 100, 3


# -- the two MainNets ---------------------------------------------------------------------------------
def vision_mainnet() -> nn.Module:
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=CLASSES, in_channels=IMAGE[0], width=8)
    return randomize_batchnorm(model).eval()


def text_mainnet() -> nn.Module:
    return tiny_bert(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=CLASSES,
        initializer_range=0.2,
    )


def vision_batches(seed: int, n: int = 4, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches in float32 on the CPU, as a user's loader gives them: class k
    brightens channel k % 3 of the image and shifts it, so that a SideNet learns something."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        labels = torch.randint(0, CLASSES, (size,), generator=generator)
        images = torch.randn(size, *IMAGE, generator=generator)
        images[torch.arange(size), labels % 3] += 1.5 * (1 + labels // 3).float()[:, None, None]
        batches.append((images, labels))
    return batches


def text_batches(seed: int, n: int = 3, size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Right-padded random sentences of lengths 2..11, as a TextCollator gives them; the label is the
    first token's id modulo the class count, so that a SideNet learns something."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        lengths = torch.randint(2, 12, (size,), generator=generator)
        ids = torch.zeros(size, int(lengths.max()), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, length in enumerate(lengths.tolist()):
            ids[i, :length] = torch.randint(5, VOCAB, (length,), generator=generator)
            mask[i, :length] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids[:, 0] % CLASSES})
    return batches


@dataclass
class Case:
    """One MainNet family: how to build it, attach to it, and feed it."""

    name: str
    mainnet: Any  # () -> nn.Module in float32 on the CPU
    attach_options: dict[str, Any]
    batches: Any  # (seed) -> list of loader batches (float32 CPU images, or token dicts)

    def attach(self, mainnet: nn.Module, **options: Any) -> AdaptiveModel:
        return sidenet.attach(mainnet, seed=0, **{**self.attach_options, **options})

    def inputs(self, batch: Any, dtype: torch.dtype, device: str = "cpu") -> Any:
        """A loader batch's model inputs on ``device``, float tensors in ``dtype`` (labels dropped)."""
        if isinstance(batch, dict):
            return {key: value.to(device) for key, value in batch.items() if key != "labels"}
        return batch[0].to(device=device, dtype=dtype)


CASES = {
    "vision": Case("vision", vision_mainnet, {"tap": "layer1", "input_shape": IMAGE, "hidden": 16}, vision_batches),
    "text": Case("text", text_mainnet, {"tap": 2, "hidden": 16}, text_batches),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


@pytest.fixture(scope="module")
def reference(case: Case) -> AdaptiveModel:
    """The float32 model, its SideNet fitted for a few steps: what the half-precision models must match."""
    model = case.attach(case.mainnet())
    model.fit(case.batches(0), epochs=3, lr=5e-3, batch_size=16, distill_weight=0.0, progress=False)  # random MainNet
    return model


def half_twin(case: Case, reference: AdaptiveModel, dtype: torch.dtype) -> AdaptiveModel:
    """The reference model with MainNet and SideNet cast to ``dtype`` (same weights, rounded)."""
    model = case.attach(case.mainnet().to(dtype))
    model.sidenet.load_state_dict(reference.sidenet.state_dict())
    model.policy = reference.policy
    return model


def confidences(model: AdaptiveModel, batches: list, case: Case, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.front_pass(case.inputs(b, dtype), "side").confidence for b in batches])


# -- attach -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_attach_places_example_and_sidenet_in_the_mainnets_dtype(case: Case, dtype: torch.dtype) -> None:
    model = case.attach(case.mainnet().to(dtype), threshold=0.5)
    assert {p.dtype for p in model.sidenet.parameters()} == {dtype}
    if case.name == "vision":
        assert model.config.input_dtype == str(dtype).removeprefix("torch.")
        assert model.config.input_shape == list(IMAGE)
    x = case.inputs(case.batches(5, n=1)[0], dtype)
    with torch.no_grad():
        out = model(x)
    # The score and the exit rule are float32 whatever the MainNet: exits are the float32 comparison.
    assert out.confidence.dtype == torch.float32 and out.logits.dtype == dtype
    assert torch.equal(out.exited, out.confidence >= torch.tensor(0.5, dtype=torch.float32))


# -- fit ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_fit_on_a_float32_loader(case: Case, reference: AdaptiveModel, dtype: torch.dtype) -> None:
    """The loader gives float32 CPU batches, as users' loaders do; fit moves them to the MainNet and
    trains a float32 master copy of the perceptron (float16 AdamW steps would underflow), then keeps the
    SideNet in the MainNet's dtype. The losses follow the float32 model's fit."""
    model = case.attach(case.mainnet().to(dtype))
    model.fit(case.batches(0), epochs=3, lr=5e-3, batch_size=16, distill_weight=0.0, progress=False)
    assert {p.dtype for p in model.sidenet.parameters()} == {dtype}
    assert all(torch.isfinite(p.float()).all() for p in model.sidenet.parameters())
    got = [epoch["loss"] for epoch in model.history_]
    expected = [epoch["loss"] for epoch in reference.history_]
    np.testing.assert_allclose(got, expected, rtol=2 * CONFIDENCE_TOLERANCE[dtype])
    assert got[-1] < got[0]


@pytest.mark.parametrize("dtype", HALF)
def test_feature_cache_is_float32_and_training_keeps_the_sidenets_dtype(case: Case, dtype: torch.dtype) -> None:
    model = case.attach(case.mainnet().to(dtype))
    cache = cache_features(model, case.batches(0, n=2), progress=False)
    assert cache.features.dtype == cache.mainnet_logits.dtype == torch.float32
    history = train_sidenet(model.sidenet, cache, epochs=2, batch_size=8, progress=False, val_cache=cache)
    assert np.isfinite([h["loss"] for h in history]).all()
    assert {p.dtype for p in model.sidenet.parameters()} == {dtype}
    assert history[-1]["val_accuracy"] == history[-1]["accuracy"]


# -- sweep, calibrate ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_sweep_scores_in_float32_close_to_the_float32_model(
    case: Case, reference: AdaptiveModel, dtype: torch.dtype
) -> None:
    model = half_twin(case, reference, dtype)
    batches = case.batches(1)
    curve = sidenet.sweep(model, batches, progress=False)
    assert isinstance(curve, TradeoffCurve)
    record = curve.record
    # float32 scores (stored as float64 numbers), equal bit for bit to those the routed model computes
    assert np.array_equal(record.confidence.astype(np.float32).astype(np.float64), record.confidence)
    routed = confidences(model, batches, case, dtype)
    assert np.array_equal(routed.numpy().astype(np.float64), record.confidence)
    expected = collect(reference, batches, progress=False).confidence
    assert np.abs(record.confidence - expected).max() <= CONFIDENCE_TOLERANCE[dtype]
    np.testing.assert_array_equal(record.mainnet_flops, collect(reference, batches, progress=False).mainnet_flops)
    # A chosen threshold exits in the routed half model exactly the samples the curve counts.
    model.threshold = threshold_between(record.confidence, 0.5)
    with torch.no_grad():
        exits = sum(int(model(case.inputs(b, dtype)).exited.sum()) for b in batches)
    assert exits == round(curve.at(model.threshold)["exit_rate"] * len(record))


@pytest.mark.parametrize("dtype", HALF)
def test_calibrate(case: Case, reference: AdaptiveModel, dtype: torch.dtype) -> None:
    model = half_twin(case, reference, dtype)
    temperature = calibrate(model, case.batches(1), progress=False)
    saved = reference.temperature
    try:
        expected = calibrate(reference, case.batches(1), progress=False)
    finally:
        reference.temperature = saved
    assert 0.1 < expected < 10  # inside fit_temperature's bounds: a fitted value, not a bound hit
    assert model.temperature == temperature
    # Where the NLL is flat in T (near-uniform SideNet scores), T itself moves with rounding; what must
    # hold is that the half model's T scales the float32 SideNet's logits about as well as its own T.
    logits, labels = sidenet_logits(reference, case.batches(1), progress=False)
    nll = lambda t: calibration_metrics(logits, labels, temperature=t).nll  # noqa: E731
    assert nll(temperature) - nll(expected) <= CONFIDENCE_TOLERANCE[dtype] / 10
    assert temperature == pytest.approx(expected, rel=10 * CONFIDENCE_TOLERANCE[dtype])


# -- save and load ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_save_load_round_trip_on_a_half_mainnet(
    case: Case, reference: AdaptiveModel, dtype: torch.dtype, tmp_path: Path
) -> None:
    model = half_twin(case, reference, dtype)
    folder = sidenet.save_sidenet(model, tmp_path / "half")
    loaded = sidenet.load_sidenet(case.mainnet().to(dtype), folder)
    assert {p.dtype for p in loaded.sidenet.parameters()} == {dtype}
    x = case.inputs(case.batches(3, n=1)[0], dtype)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.exited, b.exited)


@pytest.mark.parametrize("dtype", HALF)
def test_float32_sidenet_onto_a_cast_mainnet(
    case: Case, reference: AdaptiveModel, dtype: torch.dtype, tmp_path: Path
) -> None:
    """Trained in float32, served in half precision: the cast changes the MainNet's fingerprint, and the
    refusal says so and how to load anyway."""
    folder = sidenet.save_sidenet(reference, tmp_path / "float32")
    cast = case.mainnet().to(dtype)
    with pytest.raises(MainNetMismatchError, match=rf"float32.*{str(dtype).removeprefix('torch.')}.*check_fingerprint"):
        sidenet.load_sidenet(cast, folder)
    loaded = sidenet.load_sidenet(cast, folder, check_fingerprint=False)
    for name, value in reference.sidenet.state_dict().items():
        assert torch.equal(loaded.sidenet.state_dict()[name], value.to(dtype))


# -- serving ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_pooled_router_answers_as_forward(case: Case, reference: AdaptiveModel, dtype: torch.dtype) -> None:
    model = half_twin(case, reference, dtype)
    batches = [case.inputs(b, dtype) for b in case.batches(4)]
    model.threshold = threshold_between(confidences(model, case.batches(4), case, dtype), 0.5)
    answered = PooledRouter(model, rest_batch=12, max_wait=2).run(batches)
    assert [routed.batch_id for routed in answered] == list(range(len(batches)))
    for x, routed in zip(batches, answered, strict=True):
        with torch.no_grad():
            expected = model(x)
        assert torch.equal(routed.output.exited, expected.exited)
        assert torch.equal(routed.output.confidence, expected.confidence)
        assert routed.output.confidence.dtype == torch.float32
        # The rest runs on other batch compositions than forward's: equal up to the dtype's rounding.
        scale = float(expected.logits.abs().max())
        torch.testing.assert_close(
            routed.output.logits, expected.logits, rtol=0, atol=LOGIT_TOLERANCE[dtype] * max(1.0, scale)
        )


# -- report -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_report_data(case: Case, reference: AdaptiveModel, dtype: torch.dtype) -> None:
    """The report of a half model from float32 loaders, timing included; its JSON holds finite numbers."""
    model = half_twin(case, reference, dtype)
    settings = ReportSettings(max_accuracy_drop=0.05, timing_samples=16, repeats=1, table_rows=3)
    report = build_report(model, case.batches(5, n=2), case.batches(6, n=2), settings, progress=False)
    data = report.to_dict()
    json.dumps(data)
    # NaN and inf have their own meanings in a report (never exit; a shift check on too few samples):
    # the calibration numbers, which half precision could spoil, must all be finite.
    assert all(np.isfinite(value) for value in numbers_in(data["calibration"]))
    assert data["mainnet"]["flops"] == collect(reference, case.batches(6, n=2), progress=False).mainnet_flops.mean()
    assert report.timing is not None and report.timing.mainnet.throughput > 0


def numbers_in(data: Any) -> list[float]:
    """Every number in a JSON-ready structure."""
    if isinstance(data, dict):
        return [number for value in data.values() for number in numbers_in(value)]
    if isinstance(data, list):
        return [number for value in data for number in numbers_in(value)]
    return [float(data)] if isinstance(data, int | float) and not isinstance(data, bool) else []


# -- FLOPs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
def test_flops_of_a_half_model_equal_the_float32_models(
    case: Case, reference: AdaptiveModel, dtype: torch.dtype
) -> None:
    model = half_twin(case, reference, dtype)
    batch = case.batches(7, n=1)[0]
    assert model.flop_profile(case.inputs(batch, dtype)) == reference.flop_profile(case.inputs(batch, torch.float32))
    saved = reference.policy
    try:
        with torch.no_grad():
            for threshold in (0.0, NEVER_EXIT):  # everyone exits (trunk + SideNet), nobody does
                model.threshold = reference.threshold = threshold
                got = model(case.inputs(batch, dtype)).flops
                expected = reference(case.inputs(batch, torch.float32)).flops
                assert torch.equal(got, expected)
    finally:
        reference.policy = saved


# -- devices ------------------------------------------------------------------------------------------
def test_meta_mainnet_is_refused_clearly(case: Case, reference: AdaptiveModel, tmp_path: Path) -> None:
    """A MainNet on the 'meta' device has shapes but no weights: nothing can be checked, measured or
    trained on it, so attach and load refuse it and say how to materialise it."""
    with torch.device("meta"):
        meta = case.mainnet()
    options = {key: value for key, value in case.attach_options.items() if key != "tap"}
    with pytest.raises(ValueError, match=r"'meta' device.*load_state_dict"):
        sidenet.attach(meta, case.attach_options["tap"], **options)
    folder = sidenet.save_sidenet(reference, tmp_path / "saved")
    with pytest.raises(ValueError, match=r"'meta' device"):
        sidenet.load_sidenet(meta, folder)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bfloat16_pipeline(case: Case) -> None:
    """attach, fit, sweep and the pooled router on a CUDA bfloat16 MainNet, fed from CPU float32 loaders."""
    mainnet = case.mainnet().to("cuda", torch.bfloat16)
    model = case.attach(mainnet)
    assert {(p.device.type, p.dtype) for p in model.sidenet.parameters()} == {("cuda", torch.bfloat16)}
    model.fit(case.batches(0), epochs=2, batch_size=16, progress=False)
    curve = sidenet.sweep(model, case.batches(1), progress=False)
    assert np.array_equal(curve.record.confidence.astype(np.float32).astype(np.float64), curve.record.confidence)
    batches = [case.inputs(b, torch.bfloat16, "cuda") for b in case.batches(1)]
    model.threshold = threshold_between(curve.record.confidence, 0.5)
    answered = PooledRouter(model, rest_batch=12, max_wait=2).run(batches)
    for x, routed in zip(batches, answered, strict=True):
        with torch.no_grad():
            expected = model(x)
        assert routed.output.logits.device.type == "cuda" and torch.equal(routed.output.exited, expected.exited)
    assert model.samples_seen == 2 * sum(len(b[0] if isinstance(b, tuple) else b["labels"]) for b in case.batches(1))
