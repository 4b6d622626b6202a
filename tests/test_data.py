"""Fashion-MNIST files (the IDX reader, finding the files, loading and partitioning them), the loader
plumbing of sidenet.loaders, and sidenet.data re-exporting both."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Subset, TensorDataset

from sidenet import data, datasets, loaders
from sidenet.datasets import (
    DEBIAN_FASHION_MNIST_DIR,
    DataNotFoundError,
    fashion_mnist_datasets,
    fashion_mnist_splits,
    find_fashion_mnist,
    load_fashion_mnist,
    normalize_fashion_mnist,
    read_idx,
)
from sidenet.errors import SidenetError
from sidenet.loaders import TextDataset, iter_batches, length_grouped, make_loader, prefix_loader, split_loader

FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray | bytes) -> Path:
    raw = array if isinstance(array, bytes) else idx_bytes(array)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(raw)
    else:
        path.write_bytes(raw)
    return path


def write_fashion_mnist(folder: Path, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        FILES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        FILES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        FILES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array)
    return arrays


# -- read_idx -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 28, 28), (0, 3)])
def test_read_idx_round_trip(tmp_path: Path, suffix: str, shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    result = read_idx(write_idx(tmp_path / f"data{suffix}", array))
    assert result.dtype == np.uint8 and result.shape == shape
    assert np.array_equal(result, array)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "only 0 bytes"),
        (b"\x00\x00", "only 2 bytes"),
        (struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 2) + b"\x00" * 8, "unsigned bytes"),  # floats
        (struct.pack(">HBB", 0x1F8B, 0x08, 1) + struct.pack(">I", 2) + b"\x00\x00", "not an IDX file"),
        (struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">I", 5), "truncated"),  # header cut short
        (struct.pack(">HBB", 0, 0x08, 2) + struct.pack(">II", 3, 4) + b"\x01" * 11, "truncated"),
        (struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 3) + b"\x01" * 4, "header says"),
    ],
    ids=["empty", "short", "float-type", "bad-magic", "short-header", "short-data", "long-data"],
)
def test_read_idx_rejects_bad_files(tmp_path: Path, raw: bytes, message: str) -> None:
    for suffix in (".gz", ".idx"):
        with pytest.raises(ValueError, match=message):
            read_idx(write_idx(tmp_path / f"bad{suffix}", raw))


def test_read_idx_rejects_broken_gzip(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x.gz", np.zeros((50, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-30])  # cut inside the compressed stream
    with pytest.raises(ValueError, match="cannot read IDX file"):
        read_idx(path)
    (tmp_path / "plain.gz").write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="cannot read IDX file"):
        read_idx(tmp_path / "plain.gz")
    with pytest.raises(ValueError, match="cannot read IDX file"):
        read_idx(tmp_path / "missing.gz")


# -- finding and loading ----------------------------------------------------------------------------


def test_find_in_given_folder(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path / "fm")
    assert find_fashion_mnist(tmp_path / "fm", download=False) == tmp_path / "fm"
    # torchvision's layout below the given folder is found too.
    write_fashion_mnist(tmp_path / "tv" / "FashionMNIST" / "raw")
    assert find_fashion_mnist(str(tmp_path / "tv"), download=False) == tmp_path / "tv" / "FashionMNIST" / "raw"


def test_given_folder_lacking_files(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    (tmp_path / FILES[3]).unlink()
    with pytest.raises(DataNotFoundError, match="--data") as info:
        find_fashion_mnist(tmp_path)
    assert FILES[3] in str(info.value)
    assert isinstance(info.value, SidenetError) and isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, ValueError)


def test_nothing_found_explains_how_to_get_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "debian")
    monkeypatch.setenv("SIDENET_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError) as info:
        find_fashion_mnist(download=False)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data" in message
    assert str(tmp_path / "debian") in message
    # The Debian folder and sidenet's cache are looked in, in that order.
    write_fashion_mnist(tmp_path / "cache" / "data" / "FashionMNIST" / "raw")
    assert find_fashion_mnist(download=False) == tmp_path / "cache" / "data" / "FashionMNIST" / "raw"
    write_fashion_mnist(tmp_path / "debian")
    assert find_fashion_mnist(download=False) == tmp_path / "debian"


def test_load_synthetic_files(tmp_path: Path) -> None:
    arrays = write_fashion_mnist(tmp_path)
    train = load_fashion_mnist("train", tmp_path, download=False)
    images, labels = train.tensors
    assert images.shape == (12, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == arrays[FILES[1]].tolist()
    torch.testing.assert_close(images, normalize_fashion_mnist(arrays[FILES[0]]))
    test = load_fashion_mnist("test", tmp_path, download=False)
    assert len(test) == 5
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", tmp_path)


def test_inconsistent_files(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / FILES[1], np.zeros(11, dtype=np.uint8))
    with pytest.raises(ValueError, match="inconsistent"):
        load_fashion_mnist("train", tmp_path)


def test_data_partitions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fashion_mnist(tmp_path, n_train=20, n_test=6)
    monkeypatch.setattr(datasets, "VALIDATION_SIZE", 5)
    parts = fashion_mnist_datasets(tmp_path, download=False, seed=0)
    assert {name: len(ds) for name, ds in parts.items()} == {"train": 15, "val": 5, "test": 6}
    full = load_fashion_mnist("train", tmp_path).tensors[0]
    rows = torch.cat([parts["train"].tensors[0], parts["val"].tensors[0]]).flatten(1)
    # train and val partition the training file
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, full.flatten(1).tolist()))
    again = fashion_mnist_datasets(tmp_path, download=False, seed=0)
    assert torch.equal(again["val"].tensors[0], parts["val"].tensors[0])
    assert fashion_mnist_splits is fashion_mnist_datasets  # the name of earlier releases


def test_normalize() -> None:
    images = np.array([[[0, 255]]], dtype=np.uint8)
    out = normalize_fashion_mnist(images)
    assert out.shape == (1, 1, 1, 2)
    expected = (torch.tensor([0.0, 1.0]) - datasets.FASHION_MNIST_MEAN) / datasets.FASHION_MNIST_STD
    torch.testing.assert_close(out[0, 0, 0], expected)


def test_loaders() -> None:
    dataset = TensorDataset(torch.arange(10).float(), torch.arange(10))
    batches = list(iter_batches(make_loader(dataset, batch_size=4)))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    first = [y.tolist() for _, y in make_loader(dataset, 4, shuffle=True, seed=3)]
    second = [y.tolist() for _, y in make_loader(dataset, 4, shuffle=True, seed=3)]
    assert first == second and sorted(sum(first, [])) == list(range(10))
    with pytest.raises(ValueError, match="inputs, labels"):
        list(iter_batches([torch.zeros(2)]))


@pytest.mark.skipif(
    not all((DEBIAN_FASHION_MNIST_DIR / name).is_file() for name in FILES),
    reason=f"Fashion-MNIST is not installed in {DEBIAN_FASHION_MNIST_DIR}",
)
def test_real_fashion_mnist() -> None:
    assert find_fashion_mnist(download=False) == DEBIAN_FASHION_MNIST_DIR
    folder = DEBIAN_FASHION_MNIST_DIR
    train_images, test_labels = read_idx(folder / FILES[0]), read_idx(folder / FILES[3])
    assert train_images.shape == (60000, 28, 28) and test_labels.shape == (10000,)
    assert read_idx(folder / FILES[1]).shape == (60000,) and read_idx(folder / FILES[2]).shape == (10000, 28, 28)
    assert set(np.unique(test_labels).tolist()) == set(range(10))
    test = load_fashion_mnist("test", folder, download=False)
    images, labels = test.tensors
    assert images.shape == (10000, 1, 28, 28) and labels.shape == (10000,)
    assert abs(float(images.mean())) < 0.1  # normalised with the training statistics


def test_split_loader_halves_are_disjoint_and_cover_the_data() -> None:
    dataset = TensorDataset(torch.arange(11).float()[:, None], torch.arange(11))
    first, second = split_loader(make_loader(dataset, 4))
    seen = [int(y) for loader in (first, second) for _, labels in loader for y in labels]
    assert sorted(seen) == list(range(11)) and first.batch_size == 4
    assert len(first.dataset) == 5 and len(second.dataset) == 6
    with pytest.raises(ValueError, match="fewer than 2"):
        split_loader(make_loader(TensorDataset(torch.zeros(1, 1), torch.zeros(1)), 4))


def test_prefix_loader_keeps_the_first_samples() -> None:
    loader = make_loader(TensorDataset(torch.arange(11).float()[:, None], torch.arange(11)), 4)
    assert prefix_loader(loader, None) is loader
    assert [int(y) for _, labels in prefix_loader(loader, 6) for y in labels] == list(range(6))
    assert len(prefix_loader(loader, 50).dataset) == 11 and prefix_loader(loader, 6).batch_size == 4
    with pytest.raises(ValueError, match="at least 1"):
        prefix_loader(loader, 0)


@given(st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=40), st.integers(1, 7), st.booleans())
@settings(max_examples=50, deadline=None)
def test_length_grouped_keeps_every_sample_in_sorted_batches(sentences: list[str], size: int, subset: bool) -> None:
    dataset = TextDataset(sentences, list(range(len(sentences))))
    if subset:  # the way split_loader and quick runs hand datasets over
        dataset = Subset(dataset, list(range(len(sentences)))[::-1])
    batches = list(length_grouped(make_loader(dataset, size, collate_fn=list)))
    flat = [item for batch in batches for item in batch]
    assert sorted(label for _, label in flat) == list(range(len(sentences)))  # each sample exactly once
    assert all(len(batch) <= size for batch in batches)
    lengths = [len(text) for text, _ in flat]
    assert lengths == sorted(lengths)


def test_length_grouped_leaves_other_loaders_alone() -> None:
    loader = make_loader(TensorDataset(torch.zeros(5, 1), torch.arange(5)), 2)
    assert length_grouped(loader) is loader
    batches = [[1, 2], [3]]
    assert length_grouped(batches) is batches


def test_sidenet_data_re_exports_loaders_and_datasets() -> None:
    """``sidenet.data`` stays importable (the README's ``from sidenet.data import TextCollator, make_loader``):
    it holds the very objects of the two modules it was split into, every name of both."""
    for module in (loaders, datasets):
        assert all(getattr(data, name) is getattr(module, name) for name in module.__all__)
    assert set(data.__all__) == set(loaders.__all__) | set(datasets.__all__) | {
        "FASHION_MNIST_MEAN",
        "FASHION_MNIST_STD",
        "VALIDATION_SIZE",
        "SST2_VALIDATION_SIZE",
    }
