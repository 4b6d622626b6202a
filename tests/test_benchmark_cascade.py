"""The cascade section of the two workload steps (benchmarks/cascade.py) on a tiny MainNet: its JSON has
the keys the issue names (``taps``, ``thresholds``, ``accuracy``, ``accuracy_drop``, ``exit_rate``,
``flops_fraction``, ``speedup.batchN``, and the compiled serving mode's rows) with consistent values, a
fold's routed answers agree with its record, and BENCHMARKS.md's rendering (benchmarks/sections_cascade.py)
reads it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from benchmarks.cascade import Fold, cascade_section
from benchmarks.sections_cascade import cascade_lines, cascade_sentence
from torch.utils.data import TensorDataset

import sidenet
from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images
from sidenet.data import make_loader

TAPS = ("stem", "layer1", "layer2")


@pytest.fixture(scope="module")
def section() -> dict:
    """Candidates at three taps of a tiny ResNet whose labels are its own predictions; two folds that
    choose on one half and report on the other, as the SST-2 step does."""
    torch.manual_seed(0)
    mainnet = build_tiny_mainnet()
    images = make_images(128, seed=3)
    with torch.no_grad():
        labels = mainnet(images).argmax(1)
    train = make_loader(TensorDataset(images[:64], labels[:64]), 32)
    candidates = []
    for k, tap in enumerate(TAPS):
        model = sidenet.attach(mainnet, tap, input_shape=IMAGE_SHAPE, hidden=16, pool_size=2, seed=k)
        model.fit(train, epochs=3, progress=False)
        candidates.append(model)
    halves = [TensorDataset(images[64:96], labels[64:96]), TensorDataset(images[96:], labels[96:])]
    loaders = [make_loader(h, 16) for h in halves]
    folds = [Fold(loaders[i], loaders[1 - i], [x for x, _ in loaders[1 - i]]) for i in range(2)]
    singles = [candidates[1], candidates[1]]
    rule = {"max_accuracy_drop": 0.1}
    result = cascade_section(
        candidates,
        folds,
        rule,
        mainnet,
        singles,
        "batch16",
        1,
        deploy=make_loader(TensorDataset(images[64:], labels[64:]), 16),
        serving_backend="eager",
        mainnet_compiled=mainnet,  # the timing, not the compiler, is under test here
    )
    return json.loads(json.dumps(result, default=float))  # as the step writes it


def test_section_has_the_issue_keys_with_consistent_values(section: dict) -> None:
    for key in ("taps", "thresholds", "accuracy", "accuracy_drop", "exit_rate", "flops_fraction"):
        assert key in section
    assert "batch16" in section["speedup"] and section["speedup"]["batch16"] > 0
    # The compiled serving mode is timed beside the MainNet, each fold's choice compiled.
    assert section["speedup"]["batch16_compiled"] > 0 and section["compiled"]["best_mainnet"] in (
        "mainnet",
        "mainnet_compiled",
    )
    assert len(section["compiled"]["stage_backends"]) == len(section["folds"])
    assert len(section["taps"]) == len(section["thresholds"])
    assert set(map(str, section["taps"])) <= set(TAPS)
    assert section["accuracy_drop"] == pytest.approx(section["mainnet_accuracy"] - section["accuracy"])
    assert 0 <= section["exit_rate"] <= 1 and section["flops_fraction"] > 0
    assert section["oracle_flops_fraction"] <= 1 + 1e-9
    if section["oracle_flops_fraction"] < 1:
        expected = (1 - section["flops_fraction"]) / (1 - section["oracle_flops_fraction"])
        assert section["share_of_oracle_saving"] == pytest.approx(expected)
    for fold in section["folds"]:
        # The routed answers of a fold are those its record predicts (vision: FLOPs exactly).
        if fold["record_point"] is not None:
            outcome = fold["outcome"]
            assert outcome["exits"] / outcome["samples"] == pytest.approx(fold["record_point"]["exit_rate"])
            assert outcome["flops"] / outcome["samples"] == pytest.approx(fold["record_point"]["mean_flops"])
        assert set(fold["families"]) >= {"shared", "equal_disagreement", "geometric", "search_all_taps"}
        assert fold["candidates"][0]["taps"] == [] and fold["candidates"][0]["relative_compute"] == 1.0
        # The same rule priced in time: every part of all candidates timed, shares of the MainNet's time.
        priced = fold["time_priced"]
        assert len(priced["part_seconds"]["segments"]) == len(TAPS) + 1 == len(priced["flops_shares"]["segments"])
        assert sum(priced["part_seconds"]["shares"]["segments"]) == pytest.approx(1.0)
        assert set(map(str, priced["taps"])) <= set(TAPS) and len(priced["taps"]) == len(priced["thresholds"])
        # Timed on fewer rows too; both choices forecast per sample and per routed batch on the reporting part.
        assert priced["part_seconds"]["rows"][-1] == priced["part_seconds"]["batch_size"]
        for forecast in (priced["forecast"], fold["time_forecast"]):
            assert set(forecast) == {"per_sample", "batches"} and all(0 < v < 3 for v in forecast.values())
    # Tensor operations per batch: the cascade's own (SideNets, routing) beside the MainNet's.
    ops = section["operations_per_batch"]
    assert set(ops) == {"mainnet", "cascade"} and ops["mainnet"] > 0 and ops["cascade"] > 0
    timed = section["time_priced"]
    assert timed["accuracy_drop"] == pytest.approx(section["mainnet_accuracy"] - timed["accuracy"])
    assert section["speedup"]["batch16_time_priced"] > 0 and 0 < timed["flops_fraction"] <= 1.5


def test_benchmarks_md_renders_the_section(section: dict) -> None:
    workload = {
        "cascade": section,
        "tap": "layer1",
        "adaptive": {"accuracy": 0.9, "accuracy_drop": 0.0, "exit_rate": 0.5, "flops_fraction": 0.6},
        "speedup": {"batch16": 1.2},
    }
    text = "\n".join(cascade_lines(workload, "batch16", "images"))
    assert "Cascade of SideNets" in text and "oracle of the cascade" in text and "Choice evidence" in text
    assert "compiled serving mode" in text and "over the best MainNet alone" in text
    assert "cascade chosen for time" in text and "share of the MainNet's time (of its FLOPs): → `stem`" in text
    assert "chosen for time: priced per sample" in text and "chosen in FLOPs: priced per sample" in text
    ops = section["operations_per_batch"]
    assert f"the cascade chosen in FLOPs {ops['cascade']:.0f}, the MainNet alone {ops['mainnet']:.0f}." in text
    assert not any(math.isnan(v) for v in section["speedup"].values())
    assert "a cascade of sidenets" in cascade_sentence(workload, "batch16").lower()
    assert cascade_lines({"tap": "x"}, "batch16", "images") == []
