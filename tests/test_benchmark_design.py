"""The SideNet design study (benchmarks/sidenet_design.py) on a tiny MainNet and synthetic images: its
caches pool as the SideNet pools, its curves from the cache are those ``sidenet.sweep`` gives, its
cross-fitting pools the halves' reports, and a study's result has the schema and invariants that
BENCHMARKS.md's section (benchmarks/sections_design.py) reads."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from benchmarks import sidenet_design as design
from benchmarks.sections_design import design_section
from torch.utils.data import TensorDataset

import sidenet
from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images
from sidenet.data import make_loader

TAP = "layer1"
POOLS = (1, 2, 7)  # 7 is the library's default grid, so that the default configuration can run


@pytest.fixture(scope="module")
def tiny() -> tuple[design.Workload, dict[str, TensorDataset], torch.nn.Module]:
    """A workload of a tiny ResNet whose labels are its own predictions (the MainNet is always right),
    cached in chunks of 40 (96 training images: three chunks, the last one short)."""
    mainnet = build_tiny_mainnet()
    datasets = {}
    for seed, (part, n) in enumerate((("train", 96), ("val", 64), ("test", 64))):
        images = make_images(n, seed=seed + 1)
        with torch.no_grad():
            datasets[part] = TensorDataset(images, mainnet(images).argmax(1))
    work = design.image_workload("tiny", mainnet, TAP, datasets, {"max_accuracy_drop": 0.05}, POOLS, epochs=2, chunk=40)
    return work, datasets, mainnet


def test_cached_maps_pool_as_the_sidenet_does(tiny: tuple) -> None:
    work, datasets, mainnet = tiny
    model = sidenet.attach(mainnet, TAP, input_shape=IMAGE_SHAPE, pool_size=2)
    direct = sidenet.cache_features(model, make_loader(datasets["train"], 32), progress=False)
    cached = work.caches[2]["train"]
    torch.testing.assert_close(cached.features, direct.features)
    torch.testing.assert_close(cached.mainnet_logits, direct.mainnet_logits)
    assert torch.equal(cached.labels, direct.labels)


def test_curve_from_the_cache_is_the_sweep(tiny: tuple) -> None:
    work, datasets, _ = tiny
    key = (2, 8, 0.5)
    model = design.make_model(work, key, seed=0)
    sidenet.train_sidenet(model.sidenet, work.caches[2]["train"], epochs=3, distill_weight=0.5, progress=False)
    side = model.flop_profile(work.example).side
    mine = design.design_curve(model, work.caches[2]["val"], work.flops["val"], side)
    swept = sidenet.sweep(model, make_loader(datasets["val"], 16), progress=False)
    np.testing.assert_allclose(mine.record.confidence, swept.record.confidence, atol=1e-6)
    assert np.array_equal(mine.record.agree, swept.record.agree)
    assert len(mine) == len(swept)
    np.testing.assert_allclose(mine.relative_compute, swept.relative_compute, rtol=1e-12)
    np.testing.assert_allclose(mine.accuracy, swept.accuracy)
    rule = {"max_accuracy_drop": 0.05}
    assert mine.at(mine.threshold_for(**rule)) == pytest.approx(swept.at(swept.threshold_for(**rule)))


def _record(agree: bool, n: int = 40) -> sidenet.SweepRecord:
    """Every sample costs 2 FLOPs in trunk and SideNet and 8 in the rest; the MainNet is always right and
    the SideNet agrees with it everywhere (``agree``) or nowhere."""
    confidence = np.random.default_rng(0).uniform(0.1, 1.0, n)
    return sidenet.SweepRecord(
        confidence=confidence,
        side_correct=np.full(n, agree),
        main_correct=np.ones(n, dtype=bool),
        agree=np.full(n, agree),
        trunk_side_flops=np.full(n, 2.0),
        rest_flops=np.full(n, 8.0),
        mainnet_flops=np.full(n, 10.0),
    )


def test_crossfit_pools_the_two_halves() -> None:
    rule = {"max_disagreement": 0.0}
    # A SideNet that always agrees: both halves let every sample exit, at the trunk + SideNet cost.
    agreeing = design.crossfit(sidenet.TradeoffCurve(_record(agree=True)), rule)
    assert agreeing == pytest.approx({"accuracy": 1.0, "accuracy_drop": 0.0, "exit_rate": 1.0, "flops_fraction": 0.2})
    # One that never agrees: nothing may exit, and every sample pays the SideNet on top of the MainNet.
    never = design.crossfit(sidenet.TradeoffCurve(_record(agree=False)), rule)
    assert never == pytest.approx({"accuracy": 1.0, "accuracy_drop": 0.0, "exit_rate": 0.0, "flops_fraction": 1.0})


def test_study_result_schema_and_invariants(tiny: tuple) -> None:
    work = tiny[0]
    args = argparse.Namespace(hidden=[4, 8], distill=[0.0, 1.0], max_share=1.0, seeds=2, top=1)
    result = design.study(work, args)
    json.dumps(result, allow_nan=False)  # the JSON the step writes: no NaN or infinity
    default = tuple(result["default_config"])
    assert default == (design.DEFAULTS["pool_size"], design.DEFAULTS["hidden"], design.DEFAULTS["distill_weight"])
    rows, configs, summary = result["rows"], result["configs"], result["summary"]
    # Stage 1: every grid SideNet and the default at seed 0; stage 2: each distillation weight at the
    # default's size; stage 3: the default and the best other configuration at seed 1.
    assert {design.key_of(r) for r in rows if r["stage"] == 1} == {
        *((p, h, design.DEFAULTS["distill_weight"]) for p in POOLS for h in args.hidden),
        default,
    }
    pool, hidden = design.DEFAULTS["pool_size"], design.DEFAULTS["hidden"]
    assert {(pool, hidden, w) for w in args.distill} <= {design.key_of(r) for r in rows}
    seed0 = [design.key_of(c) for c in design.aggregate([r for r in rows if r["seed"] == 0], "test")]
    best = next(k for k in seed0 if k != default)  # the best other configuration after stages 1 and 2
    assert sorted(design.key_of(r) for r in rows if r["seed"] == 1) == sorted([default, best])
    assert len({(design.key_of(r), r["seed"]) for r in rows}) == len(rows)  # no configuration run twice
    for row in rows:
        v, t = row["val"], row["test"]
        assert v["accuracy_drop"] <= work.rule["max_accuracy_drop"] + 1e-9  # the rule holds where it was chosen
        trunk = work.flops["val"].trunk[0] / work.mainnet_flops
        for p in (v, t):
            assert 0.0 <= p["exit_rate"] <= 1.0
            assert trunk + row["sidenet_flops_share"] - 1e-12 <= p["flops_fraction"] <= 1 + row["sidenet_flops_share"]
        assert (
            trunk + row["sidenet_flops_share"] - 1e-12 <= v["oracle_flops_fraction"] <= 1 + row["sidenet_flops_share"]
        )
    shares = {design.key_of(r)[:2]: r["sidenet_flops_share"] for r in rows}
    for p in POOLS:  # a wider hidden layer or a finer grid costs more
        assert shares[p, 4] < shares[p, 8]
    for h in args.hidden:
        assert shares[1, h] < shares[2, h] < shares[7, h]
    fractions = [c["val_flops_fraction"] for c in configs]
    assert fractions == sorted(fractions)
    assert summary["default"]["seeds"] == 2 and summary["winner"]["seeds"] == 2
    assert summary["winner"]["val_flops_fraction"] == min(c["val_flops_fraction"] for c in configs if c["seeds"] == 2)
    assert summary["gain_points_val"] == pytest.approx(
        100 * (summary["default"]["val_flops_fraction"] - summary["winner"]["val_flops_fraction"])
    )
    bands = {b["band"]: b for b in summary["equal_cost"]}
    assert sum(b["configs"] for b in bands.values()) == len(configs)
    assert bands[0]["best"]["val_flops_fraction"] <= summary["default"]["val_flops_fraction"]
    for band in bands.values():
        members = [
            c for c in configs if round(math.log2(c["sidenet_flops_share"] / shares[default[:2]])) == band["band"]
        ]
        assert band["best"]["val_flops_fraction"] == min(c["val_flops_fraction"] for c in members)
    # The BENCHMARKS.md section renders every configuration from this result.
    result_file = {
        "command": "python -m benchmarks.sidenet_design",
        "machine": {"date": "today", "cpu": "cpu", "cores": 2, "torch": torch.__version__, "commit": "abc"},
        "quick": False,
        "defaults": design.DEFAULTS,
        "settings": {
            "fmnist_train": None,
            "sst2_train": 30000,
            "eval_limit": None,
            "fmnist_epochs": 2,
            "sst2_epochs": 2,
            "seeds": 2,
            "top": 1,
            "max_share": 1.0,
        },
        "tasks": {
            "fmnist": {
                **work.meta,
                "rule": work.rule,
                "held_out": "test",
                "epochs": 2,
                "mainnet_flops": work.mainnet_flops,
                "cache_seconds": 1.0,
                "seconds": 2.0,
                **result,
            }
        },
        "seconds": 3.0,
    }
    text = "\n".join(design_section(json.loads(json.dumps(result_file))))
    assert text.startswith("## ") and "nan" not in text.lower().split()
    assert sum(line.startswith("| ") and "|" in line[2:] for line in text.splitlines()) >= len(configs)
