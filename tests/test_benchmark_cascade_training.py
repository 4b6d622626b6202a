"""The cascade-training comparison (benchmarks/cascade_training.py) on a tiny MainNet and synthetic
images: a trained cascade's record built from the cache is the one ``sidenet.collect_cascade`` gives,
every variant shares the first SideNet and the SideNets' cost, and the result has what BENCHMARKS.md's
section (benchmarks/sections_cascade_training.py) reads."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from benchmarks import cascade_training as study
from benchmarks.sections_cascade_training import cascade_training_section
from torch.utils.data import TensorDataset

from helpers import build_tiny_mainnet, make_images

TAPS = {"stem": 2, "layer1": 2, "layer2": 1}


@pytest.fixture(scope="module")
def tiny() -> study.Workload:
    """A tiny ResNet whose labels are its own predictions, with a cascade of three candidate SideNets."""
    mainnet = build_tiny_mainnet()
    datasets = {}
    for seed, (part, n) in enumerate((("train", 96), ("val", 64), ("test", 48))):
        images = make_images(n, seed=seed + 1)
        with torch.no_grad():
            datasets[part] = TensorDataset(images, mainnet(images).argmax(1))
    return study.image_workload("tiny", mainnet, TAPS, datasets, {"max_accuracy_drop": 0.05}, epochs=2)


def test_record_from_the_cache_is_collect_cascade(tiny: study.Workload) -> None:
    heads = tiny.fresh(1)
    for k, head in enumerate(heads):
        study.sidenet.train_sidenet(head, tiny.train[k], epochs=2, progress=False)
    check = study.check_scored(tiny, heads)  # raises when they differ
    assert check["max_confidence_difference"] < 1e-5 and check["prediction_mismatch"] == 0.0
    cached = study.scored(tiny.parts["test"], heads, tiny.cascade)
    assert not np.array_equal(cached.confidence, tiny.parts["test"].record.confidence)  # the new heads' scores
    np.testing.assert_array_equal(cached.segment_flops, tiny.parts["test"].record.segment_flops)


def test_variants_share_the_first_sidenet_and_render(tiny: study.Workload) -> None:
    rows = study.train_variants(tiny, 0, study.REACH, exit_share=0.5)
    assert [r["reach"] for r in rows] == list(study.REACH) and "cache_check" in rows[0]
    first = {r["per_tap"][0]["val_sidenet_accuracy"] for r in rows}
    assert len(first) == 1  # reach never changes the first SideNet
    assert rows[0]["effective_share"] == [None, None, None]
    assert all(0 < s <= 1 for r in rows[1:] for s in r["effective_share"][1:])
    for r in rows:
        assert 0 <= r["val"]["flops_fraction"] <= 1.1 and r["val"]["accuracy_drop"] <= 0.05 + 1e-12
        assert r["held_out"]["oracle_flops_fraction"] <= 1.1
    summary = study.summarise(rows, study.REACH)
    assert summary["winner_on_val"] == min(rows, key=lambda r: r["val"]["flops_fraction"])["reach"]
    task = {
        **tiny.meta,
        "rule": tiny.rule,
        "held_out": "test",
        "epochs": 2,
        "mainnet_flops": 1.0,
        "sidenet_flops_share": {t: 0.01 for t in TAPS},
        "cache_seconds": 1.0,
        "seconds": 2.0,
        "rows": rows,
        "summary": summary,
    }
    args = argparse.Namespace(**{k: None for k in study.SETTINGS})
    args.exit_share = 0.5
    result = {
        "command": "python -m benchmarks.cascade_training",
        "machine": {"date": "now", "cpu": "cpu", "cores": 2, "torch": "x", "commit": None},
        "settings": vars(args),
        "tasks": {"tiny": task},
        "winner_on_val": summary["winner_on_val"],
        "winners_by_task": {"tiny": summary["winner_on_val"]},
        "seconds": 3.0,
    }
    text = "\n".join(cascade_training_section(result))
    assert f"**{summary['by_reach'][summary['winner_on_val']]['val_flops_fraction']:.4f}**" in text
    assert text.count("| 0 | ") == len(study.REACH)  # one per-run row per variant
