"""Cascades of SideNets in the routing core: all thresholds at "never" give the MainNet, a first
threshold of 0 the first SideNet, mixed thresholds what routing by hand gives; batch invariance, FLOPs
over segments, one host wait per tap reached, batch mode, and the errors of a bad cascade. A CIFAR
ResNet, an ``nn.Sequential`` and a tiny BERT (sentences of different lengths) each hold a cascade.
Training and saving cascades: test_cascade_checkpoint.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import sidenet
from helpers import IMAGE_SHAPE, NUM_CLASSES, build_tiny_mainnet, make_images, threshold_between
from sidenet import NEVER_EXIT, AdaptiveModel, CallableSplit, SideNet, TapError, count_flops
from sidenet.timing import count_operations
from test_host_waits import counting_reads

ATOL = 1e-5  # as test_routing.py and test_text_split.py
KINDS = ["resnet", "sequential", "text"]
TEXT_LENGTHS = [7, 3, 12, 5, 12, 1, 9, 4, 11, 2, 6, 8, 10, 3, 5, 12]


def sequential_mainnet(seed: int = 0) -> nn.Sequential:
    """A small convolutional ``nn.Sequential`` for 1x16x16 images and 4 classes, in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, NUM_CLASSES),
    ).eval()


def cascade(kind: str) -> tuple[AdaptiveModel, Any]:
    """A cascade of three SideNets (two for the ``nn.Sequential``) and a batch of inputs for it."""
    if kind == "text":
        pytest.importorskip("transformers")
        from test_text_split import make_batch, tiny_encoder

        model = sidenet.attach(tiny_encoder("bert"), [1, 2, 3], hidden=16, seed=0)
        return model, make_batch(TEXT_LENGTHS, seed=1)
    mainnet, taps = (
        (build_tiny_mainnet(), ["stem", "layer1", "layer2"]) if kind == "resnet" else (sequential_mainnet(), [2, 4])
    )
    model = sidenet.attach(mainnet, taps, input_shape=IMAGE_SHAPE, hidden=16, pool_size=2, seed=0)
    return model, make_images(32, seed=1)


@torch.no_grad()
def by_hand(model: AdaptiveModel, x: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Each SideNet's logits and score on the features of its tap, taken from that tap's own trunk
    (no segment run between taps, no routing), and the MainNet's own logits."""
    sides = [head(split.features(split.trunk(x))) for split, head in zip(model.splits, model.sidenets, strict=True)]
    scores = [rule.confidence(side) for rule, side in zip(model.policies, sides, strict=True)]
    return sides, scores, model.split.mainnet_logits(x)


def expected_routing(model: AdaptiveModel, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit stage (first SideNet whose score clears its threshold, else the number of SideNets) and
    logits per sample, from :func:`by_hand`."""
    sides, scores, main = by_hand(model, x)
    stage = torch.full((len(main),), model.num_taps)
    for k in reversed(range(model.num_taps)):
        stage = torch.where(scores[k] >= model.thresholds[k], k, stage)
    logits = torch.stack([*sides, main])[stage, torch.arange(len(main))]
    return stage, logits


def set_mixed_thresholds(model: AdaptiveModel, x: Any, quantile: float = 0.6) -> None:
    """Thresholds between the scores of the samples that reach each tap, so that some exit at every
    SideNet and some reach the MainNet (never on a sample's own score)."""
    _, scores, _ = by_hand(model, x)
    reaching = torch.ones(len(scores[0]), dtype=torch.bool)
    thresholds = []
    for score in scores:
        thresholds.append(threshold_between(score[reaching], quantile))
        reaching &= score < thresholds[-1]
    model.thresholds = thresholds


def read_as_on_an_accelerator(model: AdaptiveModel) -> None:
    """Make ``model`` read device values as it would on an accelerator: no input value checks, and the
    attention mask built, not skipped after reading it."""
    model.check_values = False
    for split in model.splits:
        split.allows_mask_skip = lambda mask: False  # type: ignore[method-assign]


def chunk(x: Any, index: torch.Tensor) -> Any:
    """The samples ``index`` of a batch; for text, padded only to their longest sentence."""
    if isinstance(x, torch.Tensor):
        return x[index]
    width = int(x["attention_mask"][index].sum(1).max())
    return {key: value[index, :width] for key, value in x.items()}


def assert_same_logits(got: torch.Tensor, want: torch.Tensor, kind: str) -> None:
    """Bit for bit for vision, within the text tests' tolerance for text."""
    if kind == "text":
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    else:
        assert torch.equal(got, want), (got - want).abs().max()


# -- equivalences -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_never_exit_everywhere_reproduces_the_mainnet(kind: str) -> None:
    model, x = cascade(kind)
    model.thresholds = NEVER_EXIT
    out = model(x)
    main = model(x, mode="main")
    assert_same_logits(out.logits, main.logits, kind)
    assert_same_logits(out.logits, model.split.mainnet_logits(x), kind)
    assert torch.equal(out.exit_stage, torch.full((len(out.logits),), model.num_taps))
    assert not out.exited.any()


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_first_threshold_zero_reproduces_the_first_sidenet(kind: str) -> None:
    model, x = cascade(kind)
    model.thresholds = [0.0] + [NEVER_EXIT] * (model.num_taps - 1)
    out = model(x)
    side = model(x, mode="side")
    assert torch.equal(out.logits, side.logits)
    torch.testing.assert_close(out.logits, by_hand(model, x)[0][0], rtol=0, atol=ATOL)
    assert torch.equal(out.exit_stage, torch.zeros(len(out.logits), dtype=torch.long)) and out.exited.all()
    profile = model.flop_profile(x)
    assert torch.all(out.flops == profile.trunk + profile.side)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_mixed_thresholds_route_each_sample_to_its_first_confident_sidenet(kind: str) -> None:
    model, x = cascade(kind)
    set_mixed_thresholds(model, x)
    stage, logits = expected_routing(model, x)
    assert set(stage.tolist()) == set(range(model.num_taps + 1))  # the test has power: every stage answers
    out = model(x)
    assert torch.equal(out.exit_stage, stage)
    assert torch.equal(out.exited, stage < model.num_taps)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=ATOL)
    # The confidence is the score at the last SideNet each sample reached.
    _, scores, _ = by_hand(model, x)
    reached = torch.stack(scores)[stage.clamp(max=model.num_taps - 1), torch.arange(len(stage))]
    torch.testing.assert_close(out.confidence, reached, rtol=0, atol=ATOL)


# -- batch invariance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_routing_a_batch_equals_routing_its_samples_alone_and_in_chunks(kind: str) -> None:
    model, x = cascade(kind)
    set_mixed_thresholds(model, x)
    whole = model(x)
    n = len(whole.logits)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    pieces = [order[:5], order[5:12], order[12:], *torch.arange(n).split(1)]
    # Text: a sample whose score lies within the tolerance of a threshold it meets may flip with the
    # rounding of another padding; vision: every sample's exit must agree.
    _, scores, _ = by_hand(model, x)
    far = torch.ones(n, dtype=torch.bool)
    if kind == "text":
        for k in range(model.num_taps):
            far &= (whole.exit_stage < k) | ((scores[k] - model.thresholds[k]).abs() > ATOL)
        assert int(far.sum()) >= n - 2
    for index in pieces:
        part, rows = model(chunk(x, index)), far[index]
        assert torch.equal(part.exit_stage[rows], whole.exit_stage[index][rows])
        torch.testing.assert_close(part.logits[rows], whole.logits[index][rows], rtol=0, atol=ATOL)
        if kind != "text":
            assert torch.equal(part.flops, whole.flops[index])
        elif rows.all():
            # Padding cut to the chunk's (then the continuing samples') longest sentence: never more than
            # in the whole batch (unless a sample near a threshold went deeper and lengthened it).
            assert torch.all(part.flops <= whole.flops[index])
    if kind == "text":  # the shorter padding of single sentences shows in their FLOPs
        alone = torch.cat([model(chunk(x, i)).flops for i in torch.arange(n).split(1)])
        assert torch.any(alone < whole.flops)


# -- FLOPs ----------------------------------------------------------------------------------------------


def one_sample_states(model: AdaptiveModel, x: Any) -> list[Any]:
    """The MainNet's state at each tap for the first sample of ``x`` (text: padded as in ``x``), each
    from that tap's own trunk."""
    first = x[:1] if isinstance(x, torch.Tensor) else {key: value[:1] for key, value in x.items()}
    with torch.no_grad():
        return [split.trunk(first) for split in model.splits]


@pytest.mark.parametrize("kind", ["resnet", "sequential"])
def test_flops_of_each_sample_add_up_over_the_segments_it_ran(kind: str) -> None:
    model, x = cascade(kind)
    set_mixed_thresholds(model, x)
    out = model(x)
    profile, ledger, splits = model.flop_profile(x), model.flop_ledger, model.splits
    states = one_sample_states(model, x)
    steps = [ledger.step(k, states[k - 1], profile) for k in range(1, model.num_taps)]
    rest = ledger.rest(states[-1], None, profile, part=model.num_taps - 1)
    spent = [profile.trunk + profile.side + sum(steps[:k]) for k in range(model.num_taps)]
    expected = torch.tensor([*spent, spent[-1] + rest], dtype=torch.float64)[out.exit_stage]
    assert torch.equal(out.flops.double(), expected)
    # Each step is the MainNet's segment between two taps plus the next SideNet, counted here directly.
    segments = []
    for k in range(1, model.num_taps):
        segment, state = count_flops(splits[k - 1].advance, states[k - 1], splits[k])
        side, _ = count_flops(lambda s, k=k: model.sidenets[k](splits[k].features(s)), state)
        assert steps[k - 1] == segment + side > side > 0
        segments.append(segment)
    trunk, _ = count_flops(splits[0].trunk, x[:1])
    last_rest, _ = count_flops(splits[-1].rest, states[-1])
    assert last_rest == rest and trunk == profile.trunk
    main = model(x, mode="main").flops
    assert torch.all(main == trunk + sum(segments) + last_rest) and float(main[0]) == profile.mainnet


@torch.no_grad()
def test_text_flops_at_never_exit_are_the_mainnet_and_every_sidenet() -> None:
    model, x = cascade("text")
    model.thresholds = NEVER_EXIT
    out = model(x)
    states = one_sample_states(model, x)
    sides = [
        count_flops(lambda s, k=k: model.sidenets[k](model.splits[k].features(s)), state)[0]
        for k, state in enumerate(states)
    ]
    assert all(side > 0 for side in sides)
    assert torch.all(out.flops.double() == float(model(x, mode="main").flops[0]) + sum(sides))


# -- host waits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_routed_cascade_reads_one_value_per_tap_reached(kind: str) -> None:
    model, x = cascade(kind)
    read_as_on_an_accelerator(model)
    set_mixed_thresholds(model, x)
    mixed = list(model.thresholds)
    everyone_by_second = mixed[:1] + [0.0] * (model.num_taps - 1)
    # (thresholds, taps reached, the last stage that answers)
    cases = [(mixed, model.num_taps, model.num_taps), ([0.0] * model.num_taps, 1, 0), (everyone_by_second, 2, 1)]
    for thresholds, reached, last in cases:
        model.thresholds = thresholds
        out = model(x)  # warm-up: FLOPs are measured once per input size
        assert int(out.exit_stage.max()) == last
        with counting_reads() as reads:
            model(x)
        assert reads == ["tolist"] * reached


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_routed_cascade_computes_scores_flops_and_exit_stages_when_read(kind: str) -> None:
    """A cascade's answers are assembled from each tap's: the logits and exit flags on the routed path,
    the exit stages, latest scores and FLOPs per sample only when read (five operations a tap reached
    while they were assembled on every batch), once, with the values routing by hand gives."""
    model, x = cascade(kind)
    read_as_on_an_accelerator(model)
    set_mixed_thresholds(model, x)
    stage, logits = expected_routing(model, x)
    model(x)  # warm-up: FLOPs are measured once per input size
    outputs: list[sidenet.AdaptiveOutput] = []
    routed = count_operations(lambda: outputs.append(model(x)))
    out = outputs[0]
    assert not {"full", "index_add"} & set(routed), routed
    if kind != "text":  # (text's splits build attention masks with these)
        assert not {"where", "lt"} & set(routed), routed
    # Logits and exit flags scattered back at each tap but the last (after it: the logits alone).
    assert routed["index_copy"] == 2 * model.num_taps - 1, routed
    assert torch.equal(out.exited, stage < model.num_taps)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=ATOL)
    read = count_operations(lambda: (out.exit_stage, out.confidence, out.flops))
    assert read["where"] >= model.num_taps and read["index_add"] == model.num_taps - 1, read
    assert count_operations(lambda: (out.exit_stage, out.confidence, out.flops)) == {}
    assert torch.equal(out.exit_stage, stage)
    _, scores, _ = by_hand(model, x)
    reached = torch.stack(scores)[stage.clamp(max=model.num_taps - 1), torch.arange(len(stage))]
    torch.testing.assert_close(out.confidence, reached, rtol=0, atol=ATOL)
    assert torch.all(out.flops[stage == 0] < out.flops[stage == model.num_taps].min())


# -- batch mode -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["resnet", "text"])
@torch.no_grad()
def test_batch_mode_lets_a_sidenet_answer_only_when_every_remaining_sample_clears_it(kind: str) -> None:
    model, x = cascade(kind)
    set_mixed_thresholds(model, x)
    mixed = list(model.thresholds)
    sides, _, main = by_hand(model, x)
    n = len(main)
    # Mixed everywhere: no SideNet has every sample, so the MainNet answers them all.
    out = model(x, mode="batch")
    assert torch.equal(out.exit_stage, torch.full((n,), model.num_taps))
    torch.testing.assert_close(out.logits, main, rtol=0, atol=ATOL)
    # The first SideNet is not confident for all, the second (threshold 0) is: all exit at the second.
    model.thresholds = [mixed[0], 0.0, *mixed[2:]]
    out = model(x, mode="batch")
    assert torch.equal(out.exit_stage, torch.ones(n, dtype=torch.long)) and out.exited.all()
    torch.testing.assert_close(out.logits, sides[1], rtol=0, atol=ATOL)
    adaptive = model(x)  # per-sample routing lets some exit at the first instead
    assert int((adaptive.exit_stage == 0).sum()) > 0
    assert torch.all(out.flops >= adaptive.flops) and torch.any(out.flops > adaptive.flops)


# -- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "taps", [["layer2", "layer1"], ["layer1", "layer1"], ["layer1", "layer1.0"], ["stem", "layer3", "layer2"]]
)
def test_taps_must_go_deeper_one_after_another(taps: list[str]) -> None:
    with pytest.raises(TapError, match="go deeper"):
        sidenet.attach(build_tiny_mainnet(), taps, input_shape=IMAGE_SHAPE, hidden=16, pool_size=2)


def callable_splits() -> tuple[list[CallableSplit], list[SideNet]]:
    """Two CallableSplits of one nn.Sequential (which cannot run between their cuts) and a SideNet each."""
    net = sequential_mainnet()
    splits = [
        CallableSplit(trunk=net[:cut], rest=net[cut:], mainnet=net, num_classes=NUM_CLASSES, tap=cut) for cut in (2, 4)
    ]
    heads = [SideNet(tuple(split.trunk(make_images(1)).shape[1:]), NUM_CLASSES, 16, 2) for split in splits]
    return splits, heads


def test_callable_splits_cannot_hold_a_cascade() -> None:
    splits, heads = callable_splits()
    with pytest.raises(ValueError, match="not to a ready MainNetSplit"):
        sidenet.attach(splits[0], [2, 4], input_shape=IMAGE_SHAPE)
    with pytest.raises(TapError, match="cannot run the MainNet between two taps"):
        AdaptiveModel(splits, heads, threshold=NEVER_EXIT)


@pytest.mark.parametrize("case", ["callable", "decreasing"])
def test_adaptive_model_refuses_splits_that_cannot_form_a_cascade_when_built(case: str) -> None:
    if case == "callable":
        splits, heads = callable_splits()
    else:
        model, _ = cascade("resnet")
        splits, heads = list(reversed(model.splits)), list(reversed(model.sidenets))
    with pytest.raises((TapError, ValueError)):
        AdaptiveModel(splits, heads, threshold=0.0)


def test_thresholds_of_the_wrong_length_and_single_settings_are_refused() -> None:
    model, _ = cascade("resnet")
    for wrong in ([0.5, 0.5], [0.5] * 4):
        with pytest.raises(ValueError, match="one value per SideNet"):
            model.thresholds = wrong
    with pytest.raises(ValueError, match="one value per SideNet"):
        AdaptiveModel(list(model.splits), list(model.sidenets), threshold=[0.5, 0.5])
    with pytest.raises(ValueError, match="one value per SideNet"):
        AdaptiveModel(list(model.splits), list(model.sidenets), temperature=[1.0])
    with pytest.raises(ValueError, match="needs as many exit policies"):
        model.policies = model.policies[:2]
    for name, plural in [("threshold", "thresholds"), ("temperature", "policies"), ("policy_kind", "policies")]:
        with pytest.raises(ValueError, match=f"use model.{plural} instead of model.{name}"):
            getattr(model, name)
        with pytest.raises(ValueError, match=f"model.{plural}"):
            setattr(model, name, "margin" if name == "policy_kind" else 0.5)
    model.thresholds = 0.7  # one number for all; the rules are otherwise unchanged
    assert model.thresholds == (0.7, 0.7, 0.7) and model.taps == ("stem", "layer1", "layer2")


def test_split_and_sidenet_counts_must_match() -> None:
    model, _ = cascade("resnet")
    splits, heads = list(model.splits), list(model.sidenets)
    with pytest.raises(ValueError, match="one SideNet per split: got 3 splits and 2 SideNets"):
        AdaptiveModel(splits, heads[:2])
    with pytest.raises(ValueError, match="one SideNet per split: got 2 splits and 3 SideNets"):
        AdaptiveModel(splits[:2], heads)
    with pytest.raises(ValueError, match="needs as many configs"):
        AdaptiveModel(splits, heads, config=list(model.configs[:2]))
