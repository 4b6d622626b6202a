"""Datasets used by the demo, the tests and the benchmarks.

Fashion-MNIST is read from the official IDX gzip files, looked for in this order: a folder the user
names, Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``), sidenet's
cache, and finally torchvision's download (which needs the internet).
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sidenet.paths import cache_dir

__all__ = [
    "DataNotFoundError",
    "FASHION_MNIST_CLASSES",
    "DEBIAN_FASHION_MNIST_DIR",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "fashion_mnist_splits",
    "read_idx",
    "normalize_fashion_mnist",
    "make_loader",
    "iter_batches",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Mean and standard deviation of the training images' pixels in [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# The samples of the training file held out from MainNet and SideNet training, for choosing thresholds.
VALIDATION_SIZE = 5000


class DataNotFoundError(ValueError, FileNotFoundError):
    """Raised when a dataset cannot be found locally nor downloaded."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4:
        raise ValueError(f"{path} is not an IDX file: only {len(raw)} bytes")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def _has_files(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in _FILES.values() for name in pair)


def _download_with_torchvision(root: Path) -> Path | None:
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception:  # noqa: BLE001 - any failure means "not available"; the caller explains
        return None
    folder = root / "FashionMNIST" / "raw"
    return folder if _has_files(folder) else None


def find_fashion_mnist(data_dir: str | Path | None = None, download: bool = True) -> Path:
    """Return a folder holding the four Fashion-MNIST IDX gzip files.

    Raises:
        DataNotFoundError: with instructions, when no source works.
    """
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        for candidate in (folder, folder / "FashionMNIST" / "raw"):
            if _has_files(candidate):
                return candidate
        raise DataNotFoundError(
            f"--data {folder} does not hold the Fashion-MNIST files "
            f"({', '.join(name for pair in _FILES.values() for name in pair)})."
        )
    candidates = [DEBIAN_FASHION_MNIST_DIR, cache_dir() / "data" / "FashionMNIST" / "raw"]
    for candidate in candidates:
        if _has_files(candidate):
            return candidate
    if download:
        folder = _download_with_torchvision(cache_dir() / "data")
        if folder is not None:
            return folder
    raise DataNotFoundError(
        "Fashion-MNIST was not found. sidenet looks in the folder given with --data, then in "
        f"{DEBIAN_FASHION_MNIST_DIR} (Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist`), "
        f"then in {candidates[1]}, and finally tries torchvision's download, which needs the "
        "internet. Install the Debian package, or download the four *-ubyte.gz files from "
        "https://github.com/zalandoresearch/fashion-mnist into a folder and pass it with --data."
    )


def normalize_fashion_mnist(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn uint8 images of shape (N, 28, 28) into normalised float tensors of shape (N, 1, 28, 28)."""
    tensor = torch.as_tensor(np.asarray(images), dtype=torch.float32).div_(255.0)
    return tensor.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD).unsqueeze(1)


def load_fashion_mnist(split: str, data_dir: str | Path | None = None, download: bool = True) -> TensorDataset:
    """Load the ``"train"`` (60,000) or ``"test"`` (10,000) split as normalised (N, 1, 28, 28) images."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    folder = find_fashion_mnist(data_dir, download=download)
    image_file, label_file = _FILES[split]
    images = read_idx(folder / image_file)
    labels = read_idx(folder / label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"inconsistent Fashion-MNIST files in {folder}: {images.shape} vs {labels.shape}")
    return TensorDataset(normalize_fashion_mnist(images), torch.as_tensor(labels.astype(np.int64)))


def fashion_mnist_splits(
    data_dir: str | Path | None = None, download: bool = True, seed: int = 0
) -> dict[str, TensorDataset]:
    """The three splits sidenet uses: ``train`` (55,000 images for the MainNet and the SideNet),
    ``val`` (5,000 held out of the training file, for choosing thresholds) and ``test`` (10,000,
    reported on, never used for choices)."""
    full = load_fashion_mnist("train", data_dir, download)
    images, labels = full.tensors
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    train, val = order[VALIDATION_SIZE:], order[:VALIDATION_SIZE]
    return {
        "train": TensorDataset(images[train], labels[train]),
        "val": TensorDataset(images[val], labels[val]),
        "test": load_fashion_mnist("test", data_dir, download),
    }


def make_loader(dataset: Dataset, batch_size: int = 256, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A single-process DataLoader (in-memory tensors need no workers), seeded when shuffling."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def iter_batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, labels)`` from a loader whose batches are pairs (or longer tuples)."""
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("expected a loader of (inputs, labels) batches")
        yield batch[0], batch[1]
