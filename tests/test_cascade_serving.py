"""Cascades beyond ``model(x)``: ``PooledRouter`` (continuing samples pooled at the first tap, the rest of
the cascade run on the pool), ``with_taps`` (a sub-cascade sharing the SideNets), the sweep of a cascade
(a ``CascadeCurve`` that agrees with routing), per-SideNet temperature scaling."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import sidenet
from sidenet import AdaptiveModel, CascadeCurve
from sidenet.calibration import calibrate
from sidenet.serving import PooledRouter
from test_cascade import KINDS, cascade, chunk, set_mixed_thresholds


def batches_of(x: Any, size: int) -> list[Any]:
    n = len(x["input_ids"]) if isinstance(x, dict) else len(x)
    return [chunk(x, torch.arange(start, min(start + size, n))) for start in range(0, n, size)]


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_pooled_router_answers_a_cascade_as_routing_each_batch_does(kind: str) -> None:
    model, x = cascade(kind)
    set_mixed_thresholds(model, x)
    batches = batches_of(x, 5)
    model.reset_stats()
    direct = [model(batch) for batch in batches]
    # Routed eagerly, the exits are counted on the host from the counts routing reads at each tap.
    exits = sum(int((d.exit_stage < model.num_taps).sum()) for d in direct)
    assert model.samples_exited == exits and model.samples_seen == sum(len(d.exited) for d in direct)
    model.reset_stats()
    pooled = PooledRouter(model, rest_batch=6, max_wait=2).run(batches)
    assert [routed.batch_id for routed in pooled] == list(range(len(batches)))
    for want, routed in zip(direct, pooled, strict=True):
        got = routed.output
        assert torch.equal(got.exit_stage, want.exit_stage)
        assert torch.equal(got.exited, want.exited)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.confidence, want.confidence, rtol=0, atol=1e-6)
        if kind != "text":  # text: the pool is padded to its longest sentence, so FLOPs may differ
            torch.testing.assert_close(got.flops, want.flops)
    stages = torch.cat([d.exit_stage for d in direct])
    assert len(set(stages.tolist())) > 1  # the thresholds spread the samples over several exits
    # Exits at later SideNets are counted once their pooled pass has run.
    assert model.samples_seen == len(stages) and model.samples_exited == int((stages < model.num_taps).sum())


def test_with_taps_shares_sidenets_and_routes_as_a_cascade_of_those_taps() -> None:
    model, x = cascade("resnet")
    model.thresholds = (0.99, 0.0, 0.5)
    sub = model.with_taps(["stem", "layer2"])
    assert sub.taps == ("stem", "layer2") and sub.thresholds == (0.99, 0.5)
    assert sub.sidenets[1] is model.sidenets[2] and sub.split.mainnet is model.split.mainnet
    by_hand = AdaptiveModel([model.splits[0], model.splits[2]], [model.sidenets[0], model.sidenets[2]])
    by_hand.thresholds = (0.99, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(sub(x).logits, by_hand(x).logits, rtol=0, atol=0)
    one = model.with_taps(["layer1"])
    assert one.num_taps == 1 and one.threshold == 0.0 and one.sidenet is model.sidenets[1]
    assert model.with_taps("layer1").sidenet is model.sidenets[1]  # one tap by name, not its letters
    for bad in (["layer2", "stem"], ["layer3"], [], ["stem", "stem"], "layer3"):
        with pytest.raises(ValueError, match="taps"):
            model.with_taps(bad)
    with pytest.raises(ValueError, match="kept none says the MainNet alone"):
        model.with_taps([])  # e.g. choose_taps(...).taps when no SideNet pays


@pytest.mark.parametrize("kind", ["resnet", "text"])
def test_sweep_of_a_cascade_agrees_with_routing_at_its_points(kind: str) -> None:
    model, x = cascade(kind)
    labels = torch.arange(len(x["input_ids"]) if isinstance(x, dict) else len(x)) % 2
    loader = [({**x, "labels": labels} if isinstance(x, dict) else (x, labels))]
    curve = sidenet.sweep(model, loader, progress=False)
    assert isinstance(curve, CascadeCurve) and curve.record.num_taps == model.num_taps
    for index in (0, len(curve) // 3, len(curve) // 2, len(curve) - 1):
        point = curve.point(index)
        model.thresholds = point["thresholds"]
        with torch.no_grad():
            out = model(x)
        assert float(out.exited.float().mean()) == pytest.approx(point["exit_rate"])
        assert float((out.predictions == labels).float().mean()) == pytest.approx(point["accuracy"])
        if kind == "resnet":  # vision: the record's FLOPs are routing's exactly
            assert float(out.flops.double().mean()) == pytest.approx(point["mean_flops"], rel=1e-6)
        else:  # text: routing cuts padding at each tap, so it costs at most what the record says
            assert float(out.flops.double().mean()) <= point["mean_flops"] * (1 + 1e-6)


def test_calibrate_fits_one_temperature_per_sidenet() -> None:
    model, x = cascade("resnet")
    labels = torch.arange(len(x)) % model.sidenet.num_classes
    passes: list[int] = []
    hook = model.split.mainnet.conv1.register_forward_hook(lambda module, args, out: passes.append(len(out)))
    temperatures = calibrate(model, [(x, labels)], progress=False)
    hook.remove()
    assert passes == [len(x)]  # the MainNet's first layer ran once for every SideNet's logits
    assert isinstance(temperatures, tuple) and len(temperatures) == model.num_taps
    assert tuple(rule.temperature for rule in model.policies) == temperatures
    for tap, value in zip(model.taps, temperatures, strict=True):
        assert calibrate(model.with_taps([tap]), [(x, labels)], progress=False) == pytest.approx(value)


@torch.no_grad()
def test_live_audit_counts_exits_at_later_sidenets_of_a_cascade() -> None:
    from sidenet.audit import LiveAudit

    model, x = cascade("resnet")
    model.thresholds = (sidenet.NEVER_EXIT, 0.0, 0.0)  # everyone exits at the second SideNet
    audit = LiveAudit(share=1.0, tolerance=0.05)
    PooledRouter(model, rest_batch=8, audit=audit).run(batches_of(x, 8))
    second = model.sidenets[1](model.splits[1].features(model.splits[1].trunk(x))).argmax(1)
    main = model.split.mainnet(x).argmax(1)
    assert audit.audited == len(x)
    assert audit.disagreed == int((second != main).sum()) > 0
