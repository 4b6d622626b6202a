"""AdaptiveModel: equivalences with MainNet and SideNet, batch invariance, gather/scatter for any exit
mask, per-sample FLOPs, input validation."""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import sidenet
from helpers import IMAGE_SHAPE, NUM_CLASSES, make_images, threshold_between
from sidenet import NEVER_EXIT, AdaptiveModel, ClassCountMismatchError, ExitPolicy, SideNet

ATOL = 1e-5
HYPOTHESIS = settings(max_examples=20, deadline=None)


@torch.no_grad()
def reference(model: AdaptiveModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MainNet logits, SideNet logits and SideNet confidence, computed without routing."""
    main = model.split.mainnet(x)
    side = model.sidenet(model.split.features(model.split.trunk(x)))
    return main, side, model.policy.confidence(side)


class ForcedPolicy(ExitPolicy):
    """An exit policy whose mask is set by the test."""

    mask: torch.Tensor

    def exits(self, confidence: torch.Tensor) -> torch.Tensor:
        return self.mask.clone()


# -- equivalences -------------------------------------------------------------------------------


@torch.no_grad()
def test_never_exit_equals_mainnet(tiny_model: AdaptiveModel, images) -> None:
    x = images(12)
    tiny_model.threshold = NEVER_EXIT
    out = tiny_model(x)
    torch.testing.assert_close(out.logits, tiny_model.split.mainnet(x), rtol=0, atol=ATOL)
    assert not out.exited.any()
    profile = tiny_model.flop_profile(x)
    assert torch.all(out.flops == profile.trunk + profile.side + profile.rest)


@torch.no_grad()
@pytest.mark.parametrize(
    ("threshold", "mode"),
    [(0.0, "adaptive"), (NEVER_EXIT, "side")],  # threshold 0 exits all; side mode ignores the threshold
)
def test_sidenet_answers_everything(tiny_model: AdaptiveModel, images, threshold: float, mode: str) -> None:
    x = images(12)
    tiny_model.threshold = threshold
    out = tiny_model(x, mode=mode)
    _, side, confidence = reference(tiny_model, x)
    torch.testing.assert_close(out.logits, side, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.confidence, confidence)
    assert out.exited.all()
    profile = tiny_model.flop_profile(x)
    assert torch.all(out.flops == profile.trunk + profile.side)


@torch.no_grad()
def test_mode_main_equals_mainnet(tiny_model: AdaptiveModel, images) -> None:
    x = images(8)
    tiny_model.threshold = 0.0  # the threshold must not matter in main mode
    out = tiny_model(x, mode="main")
    torch.testing.assert_close(out.logits, tiny_model.split.mainnet(x), rtol=0, atol=ATOL)
    assert not out.exited.any()
    assert torch.isnan(out.confidence).all()
    assert torch.all(out.flops == tiny_model.flop_profile(x).mainnet)


def test_unknown_mode_raises(tiny_model: AdaptiveModel, images) -> None:
    with pytest.raises(ValueError, match="mode"):
        tiny_model(images(2), mode="fast")


@torch.no_grad()
def test_adaptive_mixes_side_and_main(tiny_model: AdaptiveModel, images) -> None:
    x = images(16)
    main, side, confidence = reference(tiny_model, x)
    tiny_model.threshold = threshold_between(confidence, 0.5)
    out = tiny_model(x)
    expected_exit = confidence >= tiny_model.threshold
    assert 0 < int(expected_exit.sum()) < len(x)
    assert torch.equal(out.exited, expected_exit)
    torch.testing.assert_close(out.logits, torch.where(expected_exit[:, None], side, main), rtol=0, atol=ATOL)
    assert torch.equal(out.predictions, out.logits.argmax(1))
    assert torch.equal(tiny_model.predict(x), out.predictions)


@torch.no_grad()
def test_running_exit_statistics(tiny_model: AdaptiveModel, images) -> None:
    assert math.isnan(tiny_model.observed_exit_rate)
    tiny_model.threshold = 0.0
    tiny_model(images(6))
    tiny_model.threshold = NEVER_EXIT
    tiny_model(images(4))
    tiny_model(images(3), mode="main")  # other modes are not counted
    tiny_model(images(3), mode="side")
    assert (tiny_model.samples_seen, tiny_model.samples_exited) == (10, 6)
    assert tiny_model.observed_exit_rate == pytest.approx(0.6)
    tiny_model.reset_stats()
    assert tiny_model.samples_seen == 0 and math.isnan(tiny_model.observed_exit_rate)


def test_train_mode_keeps_mainnet_frozen(tiny_model: AdaptiveModel) -> None:
    tiny_model.train()
    assert tiny_model.sidenet.training
    assert not any(m.training for m in tiny_model.split.modules())
    tiny_model.eval()
    assert not tiny_model.sidenet.training


def test_gradients_reach_only_the_sidenet(tiny_model: AdaptiveModel, images) -> None:
    tiny_model.threshold = 0.0
    tiny_model(images(4)).logits.sum().backward()
    assert all(p.grad is not None for p in tiny_model.sidenet.mlp.parameters())


# -- gather / scatter ---------------------------------------------------------------------------


@HYPOTHESIS
@given(mask=st.lists(st.booleans(), min_size=1, max_size=10), seed=st.integers(0, 2**16))
@example(mask=[False] * 6, seed=0)
@example(mask=[True] * 6, seed=0)
@example(mask=[True], seed=1)
@example(mask=[False, True, False, True, True, False], seed=2)
@torch.no_grad()
def test_any_exit_mask_routes_rows_correctly(shared_model: AdaptiveModel, mask: list[bool], seed: int) -> None:
    x = make_images(len(mask), seed)
    exit_mask = torch.tensor(mask)
    main, side, confidence = reference(shared_model, x)
    saved = shared_model.policy
    forced = ForcedPolicy(0.5)
    forced.mask = exit_mask
    shared_model.policy = forced
    try:
        out = shared_model(x)
    finally:
        shared_model.policy = saved
    assert torch.equal(out.exited, exit_mask)
    torch.testing.assert_close(out.logits[exit_mask], side[exit_mask], rtol=0, atol=ATOL)
    torch.testing.assert_close(out.logits[~exit_mask], main[~exit_mask], rtol=0, atol=ATOL)
    torch.testing.assert_close(out.confidence, confidence, rtol=0, atol=ATOL)
    profile = shared_model.flop_profile(x)
    expected_flops = profile.trunk + profile.side + (~exit_mask).double() * profile.rest
    assert torch.equal(out.flops.double(), expected_flops)


@HYPOTHESIS
@given(mask=st.lists(st.booleans(), min_size=1, max_size=8), seed=st.integers(0, 2**16))
@example(mask=[False] * 4, seed=0)
@example(mask=[True] * 4, seed=0)
def test_any_exit_mask_on_nested_state(mask: list[bool], seed: int) -> None:
    """A CallableSplit whose state is a dict with a tuple inside: the default select keeps every
    tensor's rows in order."""
    torch.manual_seed(0)
    body, aux, head = nn.Linear(6, 5), nn.Linear(6, 3), nn.Linear(8, 3)

    def trunk(x: torch.Tensor) -> dict:
        return {"h": torch.relu(body(x)), "extra": (aux(x), "untouched")}

    def rest(state: dict) -> torch.Tensor:
        assert state["extra"][1] == "untouched"
        return head(torch.cat([state["h"], state["extra"][0]], dim=1))

    mainnet = nn.ModuleDict({"body": body, "aux": aux, "head": head})
    split = sidenet.CallableSplit(trunk, rest, mainnet=mainnet, features=lambda s: s["h"], num_classes=3)
    model = AdaptiveModel(split, SideNet((5,), 3, hidden=4))
    x = torch.randn(len(mask), 6, generator=torch.Generator().manual_seed(seed))
    exit_mask = torch.tensor(mask)
    forced = ForcedPolicy(0.5)
    forced.mask = exit_mask
    model.policy = forced
    with torch.no_grad():
        out = model(x)
        state = trunk(x)
        side, main = model.sidenet(state["h"]), rest(state)
    torch.testing.assert_close(out.logits[exit_mask], side[exit_mask], rtol=0, atol=ATOL)
    torch.testing.assert_close(out.logits[~exit_mask], main[~exit_mask], rtol=0, atol=ATOL)


# -- batch invariance ---------------------------------------------------------------------------


@HYPOTHESIS
@given(data=st.data())
@torch.no_grad()
def test_batch_invariance(shared_model: AdaptiveModel, data: st.DataObject) -> None:
    """A sample's logits, exit and confidence do not depend on the rest of its batch."""
    n = 10
    x = make_images(n, seed=data.draw(st.integers(0, 2**16), label="seed"))
    _, _, confidence = reference(shared_model, x)
    quantile = data.draw(st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]), label="quantile")
    # Strictly between two confidences: no sample sits on the threshold, where float32 rounding that
    # differs between batch sizes could flip its exit.
    threshold = threshold_between(confidence, quantile)
    rows = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True), label="rows")
    index = torch.tensor(rows)
    saved = shared_model.threshold
    shared_model.threshold = threshold
    try:
        whole = shared_model(x)
        part = shared_model(x[index])
    finally:
        shared_model.threshold = saved
    torch.testing.assert_close(part.confidence, whole.confidence[index], rtol=0, atol=ATOL)
    assert torch.equal(part.exited, whole.exited[index])
    torch.testing.assert_close(part.logits, whole.logits[index], rtol=0, atol=ATOL)
    torch.testing.assert_close(part.flops, whole.flops[index])


@torch.no_grad()
def test_batch_invariance_single_samples(tiny_model: AdaptiveModel, images) -> None:
    x = images(6)
    _, _, confidence = reference(tiny_model, x)
    tiny_model.threshold = threshold_between(confidence, 0.5)
    whole = tiny_model(x)
    assert 0 < int(whole.exited.sum()) < len(x)
    for i in range(len(x)):
        one = tiny_model(x[i : i + 1])
        assert bool(one.exited[0]) == bool(whole.exited[i])
        torch.testing.assert_close(one.logits[0], whole.logits[i], rtol=0, atol=ATOL)


# -- settings and validation --------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), -math.inf, "high", None, "0.5", True, 5])
def test_bad_threshold_raises(tiny_model: AdaptiveModel, threshold: object) -> None:
    with pytest.raises(ValueError, match="threshold"):
        tiny_model.threshold = threshold
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveModel(tiny_model.split, tiny_model.sidenet, threshold=threshold)
    with pytest.raises(ValueError, match="threshold"):
        tiny_model.policy.threshold = threshold  # frozen: no assignment bypasses the validation
    assert tiny_model.threshold == 0.9


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0, NEVER_EXIT])
def test_valid_thresholds_accepted(tiny_model: AdaptiveModel, threshold: float) -> None:
    tiny_model.threshold = threshold
    assert tiny_model.threshold == threshold
    assert tiny_model.policy.threshold == threshold


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan, True, "2"])
def test_bad_temperature_raises(tiny_model: AdaptiveModel, temperature: object) -> None:
    with pytest.raises(ValueError, match="temperature"):
        tiny_model.temperature = temperature
    with pytest.raises(ValueError, match="temperature"):
        tiny_model.policy.temperature = temperature
    assert tiny_model.temperature == 1.0


def test_bad_policy_kind_raises(tiny_model: AdaptiveModel) -> None:
    with pytest.raises(ValueError, match="unknown exit policy"):
        tiny_model.policy_kind = "variance"
    with pytest.raises(ValueError, match="kind.*model.policy_kind"):
        tiny_model.policy.kind = "variance"  # frozen: the rule is replaced through the model
    assert tiny_model.policy_kind == "max_softmax"


def test_setters_replace_the_policy(tiny_model: AdaptiveModel) -> None:
    """Each setter installs a new policy with the other settings kept; one held by a caller (to
    restore it later) is left as it was."""
    saved = tiny_model.policy
    tiny_model.threshold, tiny_model.temperature, tiny_model.policy_kind = np.float32(0.5), 2, "margin"
    assert (tiny_model.threshold, tiny_model.temperature, tiny_model.policy_kind) == (0.5, 2.0, "margin")
    assert (saved.threshold, saved.temperature, saved.kind) == (0.9, 1.0, "max_softmax")
    tiny_model.policy = saved
    assert tiny_model.threshold == 0.9


def test_temperature_setter_keeps_threshold(tiny_model: AdaptiveModel) -> None:
    tiny_model.threshold = 0.4
    tiny_model.temperature = 2.0
    assert (tiny_model.threshold, tiny_model.temperature) == (0.4, 2.0)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.zeros(2, 3, 16, 16), "1 input channels, got 3"),
        (torch.zeros(2, 16, 16), r"shape \(N, 1, H, W\)"),
        (torch.zeros(2, 1, 1, 16, 16), r"shape \(N, 1, H, W\)"),
        (torch.zeros(0, 1, 16, 16), "empty batch"),
        (torch.tensor(1.0), "empty batch"),
        (torch.full((2, 1, 16, 16), float("nan")), "NaN"),
        (torch.zeros(2, 1, 16, 16).index_fill_(0, torch.tensor([1]), float("inf")), "infinite"),
        (np.zeros((2, 1, 16, 16), dtype=np.float32), "tensor"),
        (torch.zeros(2, 1, 16, 16, dtype=torch.uint8), "expected floating-point images, got torch.uint8"),
    ],
    ids=["channels", "rank3", "rank5", "empty", "scalar", "nan", "inf", "numpy", "integer-pixels"],
)
def test_bad_inputs_raise(tiny_model: AdaptiveModel, x: object, message: str) -> None:
    for mode in ("adaptive", "main"):
        with pytest.raises(ValueError, match=message):
            tiny_model(x, mode=mode)


def test_nan_input_passes_when_checks_are_off(tiny_model: AdaptiveModel, images) -> None:
    tiny_model.check_inputs = False
    x = images(2)
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        out = tiny_model(x, mode="main")
    assert torch.isnan(out.logits[0]).any()


def test_class_count_mismatch(tiny_model: AdaptiveModel) -> None:
    wrong = SideNet(tiny_model.sidenet.feature_shape, NUM_CLASSES + 1, hidden=8)
    with pytest.raises(ClassCountMismatchError, match=rf"{NUM_CLASSES + 1} classes.*MainNet predicts {NUM_CLASSES}"):
        AdaptiveModel(tiny_model.split, wrong)
    assert issubclass(ClassCountMismatchError, ValueError)


def test_flop_profile_is_cached_per_sample_shape(tiny_model: AdaptiveModel) -> None:
    profile = tiny_model.flop_profile(torch.zeros(3, *IMAGE_SHAPE))
    assert tiny_model.flop_profile(torch.zeros(7, *IMAGE_SHAPE)) is profile
    assert list(tiny_model.flop_ledger.profiles) == [IMAGE_SHAPE]
    assert min(profile.trunk, profile.side, profile.rest) > 0


@torch.no_grad()
def test_batch_mode_exits_only_when_every_sample_is_confident(tiny_model: AdaptiveModel, images) -> None:
    x = images(10)
    confidence = tiny_model(x, mode="side").confidence
    main = tiny_model(x, mode="main").logits
    side = tiny_model(x, mode="side").logits
    tiny_model.threshold = threshold_between(confidence, 0.0)  # everyone confident: the SideNet answers all
    out = tiny_model(x, mode="batch")
    assert out.exited.all()
    torch.testing.assert_close(out.logits, side, rtol=0, atol=ATOL)
    tiny_model.threshold = threshold_between(confidence, 0.5)  # some are not: the MainNet answers all
    out = tiny_model(x, mode="batch")
    assert not out.exited.any()
    torch.testing.assert_close(out.logits, main, rtol=0, atol=ATOL)
    profile = tiny_model.flop_profile(x)
    assert torch.all(out.flops == profile.trunk + profile.side + profile.rest)


def test_answers_keep_no_mainnet_state_alive(tiny_model: AdaptiveModel, images, monkeypatch) -> None:
    """An answer computes its FLOPs and exit stages when read, from what it holds: never the batch's MainNet
    state at the tap (a ResNet-50's layer1 at batch 256 is hundreds of MB), which it kept alive until read."""
    states: list[weakref.ref] = []
    trunk = tiny_model.split.trunk

    def watched(x: torch.Tensor) -> torch.Tensor:
        state = trunk(x)
        states.append(weakref.ref(state))
        return state

    monkeypatch.setattr(tiny_model.split, "trunk", watched)
    x = images(16)
    main, side, confidence = reference(tiny_model, x)
    tiny_model.threshold = threshold_between(confidence, 0.5)  # some exit, some go on
    before = len(states)
    with torch.no_grad():
        answers = [tiny_model(x), tiny_model.front_pass(x).answers(tiny_model.num_taps)]
    gc.collect()
    assert len(states) >= before + 2 and all(state() is None for state in states)
    routed = answers[0]  # read afterwards, the bookkeeping is still right
    assert 0 < int(routed.exited.sum()) < 16 and torch.equal(routed.exit_stage, (~routed.exited).long())
    assert torch.all(routed.flops[routed.exited] < routed.flops[~routed.exited].min())
