"""The cascade-training comparison (benchmarks/cascade_training.py) on a tiny MainNet and synthetic
images: a trained cascade's record built from the cache is the one ``sidenet.collect_cascade`` gives,
every variant shares the first SideNet, ztw's later SideNets read the earlier logits and pay for them,
and the result has what BENCHMARKS.md's section (benchmarks/sections_cascade_training.py) reads."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from benchmarks import cascade_training as study
from benchmarks.sections_cascade_training import VARIANTS as LABELS
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


def test_ztw_reads_the_earlier_logits_and_pays_for_them(tiny: study.Workload) -> None:
    fresh = tiny.fresh(2)
    options = {"epochs": 2, "seed": 2, "progress": False}
    study.sidenet.train_sidenet(fresh[0], tiny.train[0], **options)
    heads = study.train_ztw(tiny, fresh, 2, options)
    assert heads[0] is fresh[0]
    classes = fresh[0].num_classes
    for k, head in enumerate(heads[1:], start=1):
        assert head.in_features == tiny.train[k].features.shape[1] + k * classes and head.hidden == fresh[k].hidden
    part = tiny.parts["test"]
    ztw = study.ztw_part(part, heads)
    base = study.scored(part, heads[:1] + fresh[1:], tiny.cascade)  # the same first SideNet, plain later ones
    got = study.scored(ztw, heads, tiny.cascade)
    np.testing.assert_array_equal(got.confidence[:, 0], base.confidence[:, 0])  # SideNet 0 as in "all"
    np.testing.assert_array_equal(ztw.record.side_flops[:, 0], part.record.side_flops[:, 0])
    extra = ztw.record.side_flops - part.record.side_flops
    for k in range(1, len(heads)):
        np.testing.assert_allclose(extra[:, k], 2 * k * classes * fresh[k].hidden)
    # SideNet 2 reads SideNet 1's logits: changing SideNet 1 changes SideNet 2's scores.
    with torch.no_grad():
        heads[1].mlp[2].bias.add_(torch.arange(classes, dtype=torch.float32))
    changed = study.scored(study.ztw_part(part, heads), heads, tiny.cascade)
    assert not np.array_equal(changed.confidence[:, 2], got.confidence[:, 2])
    # A cascade skipping SideNet 1 still pays for it at SideNet 2, which reads its logits.
    paid = study.with_skipped(ztw.record, [0, 2])
    np.testing.assert_allclose(paid.side_flops[:, 1], ztw.record.side_flops[:, 1:3].sum(1))
    np.testing.assert_array_equal(paid.segment_flops, ztw.record.restrict([0, 2]).segment_flops)


def test_variants_share_the_first_sidenet_and_render(tiny: study.Workload) -> None:
    rows = study.train_variants(tiny, 0, study.VARIANTS, exit_share=0.5)
    assert [r["reach"] for r in rows] == list(study.VARIANTS) and "cache_check" in rows[0]
    first = {r["per_tap"][0]["val_sidenet_accuracy"] for r in rows}
    assert len(first) == 1  # reach never changes the first SideNet
    assert rows[0]["effective_share"] == rows[-1]["effective_share"] == [None, None, None]
    assert all(0 < s <= 1 for r in rows[1:-1] for s in r["effective_share"][1:])
    for r in rows:
        assert 0 <= r["val"]["flops_fraction"] <= 1.1 and r["val"]["accuracy_drop"] <= 0.05 + 1e-12
        assert r["held_out"]["oracle_flops_fraction"] <= 1.1
    summary = study.summarise(rows, study.VARIANTS)
    reach_rows = [r for r in rows if r["reach"] in study.REACH]
    assert summary["winner_on_val"] == min(reach_rows, key=lambda r: r["val"]["flops_fraction"])["reach"]
    ztw_gap = rows[-1]["val"]["flops_fraction"] - rows[0]["val"]["flops_fraction"]
    assert summary["ztw_minus_all"]["val_flops_fraction"] == pytest.approx(ztw_gap)
    task = {
        **tiny.meta,
        "rule": tiny.rule,
        "held_out": "test",
        "epochs": 2,
        "mainnet_flops": 1.0,
        "sidenet_flops_share": {t: 0.01 for t in TAPS},
        "ztw_extra_flops_share": {t: 0.001 * k for k, t in enumerate(TAPS)},
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
    assert text.count("| 0 | ") == len(study.VARIANTS)  # one per-run row per variant
    assert f"| {LABELS['ztw']} | 1 | " in text
    assert f"ztw minus all (FLOPs fraction, mean over seeds): validation {ztw_gap:+.4f}" in text
