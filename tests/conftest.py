"""Small shared fixtures: a tiny CIFAR ResNet MainNet on 1x16x16 images, a SideNet attached to it, and
a linearly separable synthetic task (builders in helpers.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import sidenet
from helpers import IMAGE_SHAPE, build_tiny_mainnet, make_images, separable_dataset

# The tensors here are tiny: one thread is fastest, and avoids intra-op threads spinning against
# whatever else runs on a small CI machine. OMP_NUM_THREADS still wins when set.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture()
def tiny_mainnet() -> nn.Module:
    """A random CIFAR ResNet-8 (width 8) for 1x16x16 images and 4 classes, in eval mode."""
    return build_tiny_mainnet()


@pytest.fixture()
def make_mainnet() -> Callable[..., nn.Module]:
    return build_tiny_mainnet


@pytest.fixture()
def images() -> Callable[..., torch.Tensor]:
    """``images(n, seed=0)``: a batch of random 1x16x16 images."""
    return make_images


@pytest.fixture()
def tiny_model(tiny_mainnet: nn.Module) -> sidenet.AdaptiveModel:
    """A fresh SideNet attached at ``layer1`` of :func:`tiny_mainnet`."""
    return sidenet.attach(tiny_mainnet, "layer1", input_shape=IMAGE_SHAPE, hidden=32, pool_size=2, seed=0)


@pytest.fixture()
def separable_loader() -> DataLoader:
    return DataLoader(separable_dataset(128), batch_size=32)


@pytest.fixture(scope="module")
def shared_model() -> sidenet.AdaptiveModel:
    """Like :func:`tiny_model` but built once per module, for hypothesis tests; tests must restore
    anything they change on it."""
    return sidenet.attach(build_tiny_mainnet(), "layer1", input_shape=IMAGE_SHAPE, hidden=32, pool_size=2, seed=0)


# Everything of a built-in task that trains, loads or reads a MainNet or data.
EXPENSIVE_TASK_METHODS = ("mainnet", "loaders", "pretrain", "read_inputs", "_train", "_load_cached")


@pytest.fixture()
def touched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Makes the built-in tasks' expensive methods fail the test when called (for CLI argument checks
    that must come before any work); returns the names of those called."""
    from sidenet.tasks import TASKS

    calls: list[str] = []
    for task in (TASKS["fmnist"], TASKS["sst2"]):
        for method in EXPENSIVE_TASK_METHODS:

            def forbidden(*args: object, _name: str = f"{task.name}.{method}", **kwargs: object) -> None:
                calls.append(_name)
                raise AssertionError(f"{_name} called before the arguments were checked")

            monkeypatch.setattr(task, method, forbidden)
    return calls


def find_sst2_dir() -> Path | None:
    """The real SST-2 files for the tests: ``$SIDENET_SST2_DIR``, else ``../shared/data/sst2`` beside the
    repository (the tests may use the checkout's surroundings; the library never does). None when
    neither holds ``train.tsv`` and ``dev.tsv``."""
    named = os.environ.get("SIDENET_SST2_DIR")
    candidates = [Path(named)] if named else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2")
    for folder in candidates:
        if (folder / "train.tsv").is_file() and (folder / "dev.tsv").is_file():
            return folder
    return None


@pytest.fixture(scope="session")
def sst2_data_dir() -> Path:
    """The folder of the real SST-2 files, passed to sidenet explicitly (``data_dir`` / ``--data``);
    skips the test where there is none."""
    folder = find_sst2_dir()
    if folder is None:
        pytest.skip("SST-2 not found: set SIDENET_SST2_DIR or put train.tsv and dev.tsv in ../shared/data/sst2")
    return folder
