"""Training and saving cascades of SideNets: one MainNet pass caches every tap, fit trains every
SideNet and nothing of the MainNet, and a saved cascade (``cascade.json`` + ``cascade/tap-K``) loads
back with its answers, taps and thresholds, refusing tampered files and another MainNet. Routing of
cascades: test_cascade.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import sidenet
from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images, separable_dataset
from sidenet import AdaptiveModel, CheckpointError, ExitPolicy, MainNetMismatchError, load_sidenet, save_sidenet
from sidenet.config import CASCADE_FOLDER, CASCADE_NAME, CONFIG_NAME, WEIGHTS_NAME
from sidenet.training import cache_features, cache_tap_features
from test_cascade import set_mixed_thresholds
from test_checkpoint import flip_data_bytes

FAST = {"epochs": 4, "lr": 1e-2, "batch_size": 32, "progress": False}  # as test_training.py
TAPS = ["stem", "layer1", "layer2"]


def vision_cascade(mainnet: nn.Module | None = None) -> AdaptiveModel:
    return sidenet.attach(
        mainnet or build_tiny_mainnet(), TAPS, input_shape=IMAGE_SHAPE, hidden=16, pool_size=2, seed=0
    )


def text_cascade() -> tuple[AdaptiveModel, dict[str, torch.Tensor]]:
    pytest.importorskip("transformers")
    from test_text_split import make_batch, tiny_encoder

    model = sidenet.attach(tiny_encoder("bert"), [1, 3], hidden=16, seed=0, split_options={"features": "mean"})
    return model, make_batch([7, 3, 12, 5, 12, 1, 9, 4, 11, 2, 6, 8], seed=2)


# -- training -----------------------------------------------------------------------------------------


def test_fit_trains_every_sidenet_and_leaves_the_mainnet_untouched() -> None:
    model = vision_cascade()
    mainnet = model.split.mainnet
    before_main = {key: value.clone() for key, value in mainnet.state_dict().items()}
    before = [{key: value.clone() for key, value in head.state_dict().items()} for head in model.sidenets]
    model.fit(DataLoader(separable_dataset(128), batch_size=32), **FAST)
    for k, head in enumerate(model.sidenets):
        assert any(not torch.equal(value, before[k][key]) for key, value in head.state_dict().items()), k
    for key, value in mainnet.state_dict().items():
        assert torch.equal(value, before_main[key]), key
    assert [record["tap"] for record in model.history_] == [k for k in range(3) for _ in range(FAST["epochs"])]
    assert not any(m.training for m in model.modules())


def test_cache_tap_features_runs_each_mainnet_module_once_per_batch() -> None:
    model = vision_cascade()
    mainnet = model.split.mainnet
    loader = DataLoader(separable_dataset(96), batch_size=32)
    calls: dict[str, int] = {}
    hooks = [
        module.register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        for name, module in mainnet.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    ]
    try:
        caches = cache_tap_features(model, loader, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == len(hooks) and set(calls.values()) == {3}  # every weighted module, once per batch
    images = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    with torch.no_grad():
        for k, (split, head) in enumerate(zip(model.splits, model.sidenets, strict=True)):
            expected = head.pooled(split.features(split.trunk(images)))
            torch.testing.assert_close(caches[k].features, expected, rtol=0, atol=1e-5)
            assert torch.equal(caches[k].labels, labels)
        torch.testing.assert_close(caches[0].mainnet_logits, mainnet(images), rtol=0, atol=1e-5)
    # The first tap's cache is what one SideNet at that tap caches.
    single = sidenet.attach(mainnet, TAPS[0], input_shape=IMAGE_SHAPE, hidden=16, pool_size=2, seed=0)
    alone = cache_features(single, loader, progress=False)
    assert torch.equal(alone.features, caches[0].features)
    assert torch.equal(alone.mainnet_logits, caches[0].mainnet_logits)


# -- save and load ------------------------------------------------------------------------------------


def assert_same_model(a: AdaptiveModel, b: AdaptiveModel, x: Any) -> None:
    assert (a.taps, a.thresholds, a.policies) == (b.taps, b.thresholds, b.policies)
    with torch.no_grad():
        got, want = b(x), a(x)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.exit_stage, want.exit_stage)
    assert torch.equal(got.flops, want.flops)


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[AdaptiveModel, Path, torch.Tensor]:
    """A vision cascade with mixed thresholds and a temperature per SideNet, saved."""
    model = vision_cascade()
    x = make_images(32, seed=4)
    model.policies = [ExitPolicy(0.5, temperature=t) for t in (1.0, 1.5, 2.0)]
    set_mixed_thresholds(model, x)
    return model, save_sidenet(model, tmp_path / "cascade"), x


def test_cascade_round_trip(saved: tuple[AdaptiveModel, Path, torch.Tensor]) -> None:
    model, folder, x = saved
    assert (folder / CASCADE_NAME).is_file() and (folder / CASCADE_FOLDER / "tap-1" / WEIGHTS_NAME).is_file()
    loaded = load_sidenet(build_tiny_mainnet(), folder)  # a fresh copy of the same MainNet
    assert loaded.num_taps == 3 and [p.temperature for p in loaded.policies] == [1.0, 1.5, 2.0]
    assert set(model(x).exit_stage.tolist()) == {0, 1, 2, 3}
    assert_same_model(model, loaded, x)


def test_text_cascade_round_trip(tmp_path: Path) -> None:
    model, batch = text_cascade()
    set_mixed_thresholds(model, batch)
    loaded = load_sidenet(model.split.mainnet, save_sidenet(model, tmp_path / "text"))
    assert [split.options() for split in loaded.splits] == [{"features": "mean"}] * 2
    assert_same_model(model, loaded, batch)


def test_a_single_sidenet_saved_over_a_cascade_loads_as_one(saved: tuple[AdaptiveModel, Path, torch.Tensor]) -> None:
    model, folder, x = saved
    listing = (folder / CASCADE_NAME).read_text()
    single = sidenet.attach(model.split.mainnet, "layer1", input_shape=IMAGE_SHAPE, hidden=16, pool_size=2, seed=5)
    single.threshold = 0.3
    save_sidenet(single, folder)
    assert not (folder / CASCADE_NAME).exists() and not (folder / CASCADE_FOLDER).exists()
    loaded = load_sidenet(model.split.mainnet, folder)
    assert loaded.num_taps == 1 and loaded.taps == ("layer1",)
    assert_same_model(single, loaded, x)
    # The old cascade's listing put back beside the new SideNet belongs to another save.
    (folder / CASCADE_NAME).write_text(listing)
    with pytest.raises(CheckpointError, match="belongs to another save"):
        load_sidenet(model.split.mainnet, folder)


def edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda f: edit_json(f / CASCADE_FOLDER / "tap-1" / CONFIG_NAME, hidden=8), "changed after saving"),
        (lambda f: edit_json(f / CASCADE_FOLDER / "tap-1" / CONFIG_NAME, threshold=0.1), "set model.thresholds"),
        (lambda f: (f / CASCADE_FOLDER / "tap-2" / CONFIG_NAME).unlink(), "missing"),
        (lambda f: flip_data_bytes(f / CASCADE_FOLDER / "tap-1" / WEIGHTS_NAME, 100), "sha256"),
        (lambda f: (f / CASCADE_NAME).write_text("{not json"), "corrupt"),
        (lambda f: edit_json(f / CASCADE_NAME, stages=[{"folder": "cascade/tap-1"}]), "corrupt"),
        (lambda f: edit_json(f / CASCADE_NAME, first_weights_sha256="0" * 64), "belongs to another save"),
        (
            lambda f: edit_json(f / CASCADE_NAME, stages=[{"folder": "..", "config_sha256": "0" * 64}]),
            "outside",
        ),
    ],
    ids=["structural", "exit-rule", "missing", "weights", "not-json", "no-checksum", "other-save", "outside"],
)
def test_tampered_cascade_files_are_refused(saved: tuple[AdaptiveModel, Path, torch.Tensor], tamper, message) -> None:
    model, folder, _ = saved
    tamper(folder)
    with pytest.raises(CheckpointError, match=message):
        load_sidenet(model.split.mainnet, folder)


def test_cascade_on_another_mainnet_or_a_split_is_refused(saved: tuple[AdaptiveModel, Path, torch.Tensor]) -> None:
    model, folder, x = saved
    with pytest.raises(MainNetMismatchError, match="trained on a different MainNet"):
        load_sidenet(build_tiny_mainnet(seed=1), folder)
    with pytest.raises(CheckpointError, match="load it onto the MainNet"):
        load_sidenet(model.split, folder)
    # The first SideNet's exit rule may still be edited by hand, as one SideNet's may.
    edit_json(folder / CONFIG_NAME, threshold=0.0)
    loaded = load_sidenet(model.split.mainnet, folder)
    assert loaded.thresholds == (0.0, *model.thresholds[1:])
    assert torch.equal(loaded(x).exit_stage, torch.zeros(len(x), dtype=torch.long))
