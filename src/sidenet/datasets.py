"""The demo's datasets: Fashion-MNIST (images) and SST-2 (text), found, read and partitioned into
``train`` / ``val`` / ``test``. The loaders over them are built with :mod:`sidenet.loaders`.

Fashion-MNIST is read from the official IDX gzip files, looked for in this order: a folder the user
names, Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``), sidenet's
cache, and finally torchvision's download (which needs the internet).

SST-2 is read from GLUE's TSV files (``train.tsv``, ``dev.tsv``: a header naming the ``sentence`` and
``label`` columns), looked for in a folder the user names (``--data``), then the folder named by the
environment variable ``SIDENET_SST2_DIR``, then sidenet's cache (``<cache>/data/sst2``), and finally
the ``datasets`` library's ``glue/sst2`` (internet). Nothing is looked up relative to this package: an
installed sidenet has no repository beside it.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from sidenet.errors import DataNotFoundError
from sidenet.loaders import TextDataset
from sidenet.paths import cache_dir

__all__ = [
    "DataNotFoundError",
    "FASHION_MNIST_CLASSES",
    "DEBIAN_FASHION_MNIST_DIR",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "fashion_mnist_datasets",
    "fashion_mnist_splits",
    "read_idx",
    "normalize_fashion_mnist",
    "SST2_CLASSES",
    "SST2_ENV_VAR",
    "sst2_cache_dir",
    "read_sst2_tsv",
    "load_sst2",
    "sst2_datasets",
    "sst2_splits",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
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
SST2_CLASSES = ("negative", "positive")
# Names the folder of SST-2's train.tsv and dev.tsv when no --data is given.
SST2_ENV_VAR = "SIDENET_SST2_DIR"
SST2_VALIDATION_SIZE = 2000
_SST2_FILES = {"train": "train.tsv", "dev": "dev.tsv"}


# -- Fashion-MNIST ------------------------------------------------------------------------------------


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
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: its header declares {ndim} dimensions but the file ends first")
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
    except Exception:
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


# Pillow's modes of 16-bit grey images (and of 32-bit integer ones, in which Pillow opens some of them).
WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def eight_bit(image: Any) -> Any:
    """A 16-bit grey PIL image as an 8-bit one, its values scaled from 0-65535 down to 0-255; any other image
    as it is. Pillow's own ``convert("L")`` clips such values at 255 instead, which turns almost every pixel
    of a 16-bit picture white (a classifier then answers confidently and wrongly)."""
    if image.mode not in WIDE_GREY_MODES:
        return image
    from PIL import Image

    values = np.asarray(image, dtype=np.float64) / 257.0  # 65535 / 257 = 255
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def normalize_fashion_mnist(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn uint8 images of shape (N, 28, 28) into normalised float tensors of shape (N, 1, 28, 28)."""
    tensor = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)
    return tensor.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD).unsqueeze(1)


def load_fashion_mnist(split: str, data_dir: str | Path | None = None, download: bool = True) -> TensorDataset:
    """Load the ``"train"`` (60,000) or ``"test"`` (10,000) file as normalised (N, 1, 28, 28) images."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    folder = find_fashion_mnist(data_dir, download=download)
    image_file, label_file = _FILES[split]
    images = read_idx(folder / image_file)
    labels = read_idx(folder / label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"inconsistent Fashion-MNIST files in {folder}: {images.shape} vs {labels.shape}")
    return TensorDataset(normalize_fashion_mnist(images), torch.as_tensor(labels.astype(np.int64)))


def fashion_mnist_datasets(
    data_dir: str | Path | None = None, download: bool = True, seed: int = 0
) -> dict[str, TensorDataset]:
    """The three data partitions sidenet uses: ``train`` (55,000 images for the MainNet and the
    SideNet), ``val`` (5,000 held out of the training file, for choosing thresholds) and ``test``
    (10,000, reported on, never used for choices)."""
    full = load_fashion_mnist("train", data_dir, download)
    images, labels = full.tensors
    train, val = _holdout(len(full), VALIDATION_SIZE, seed)
    return {
        "train": TensorDataset(images[train], labels[train]),
        "val": TensorDataset(images[val], labels[val]),
        "test": load_fashion_mnist("test", data_dir, download),
    }


def _holdout(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random partition of ``range(n)`` into (the rest, ``size`` held-out indices)."""
    if not 0 < size < n:
        raise ValueError(f"cannot hold out {size} of {n} samples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[size:], order[:size]


# -- SST-2 --------------------------------------------------------------------------------------------


def read_sst2_tsv(path: str | Path) -> TextDataset:
    """Read a GLUE SST-2 TSV file: a header naming ``sentence`` and ``label`` (in either order), then
    one tab-separated sample per line; labels are 0 (negative) or 1 (positive)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read SST-2 file {path}: {exc}") from exc
    header = lines[0].split("\t") if lines else []
    if "sentence" not in header or "label" not in header:
        raise ValueError(f"{path} is not an SST-2 TSV file: its header {header} lacks 'sentence' and 'label'")
    text_col, label_col = header.index("sentence"), header.index("label")
    sentences, labels = [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header) or fields[label_col].strip() not in ("0", "1"):
            raise ValueError(f"{path}, line {number}: expected {len(header)} tab-separated fields with a 0/1 label")
        sentences.append(fields[text_col].strip())
        labels.append(int(fields[label_col]))
    if not sentences:
        raise ValueError(f"{path} holds no samples")
    return TextDataset(sentences, labels)


def sst2_cache_dir() -> Path:
    """Where sidenet looks for SST-2's TSV files when no folder is named: ``<cache>/data/sst2``."""
    return cache_dir() / "data" / "sst2"


def _sst2_from_datasets(split: str) -> TextDataset | None:
    try:
        from datasets import load_dataset  # the Hugging Face library, not this module

        data = load_dataset("glue", "sst2", split="validation" if split == "dev" else split)
    except Exception:
        return None
    return TextDataset(data["sentence"], data["label"])


def _sst2_help() -> str:
    """Every place SST-2 is looked for, and how to get it: the end of every SST-2 DataNotFoundError."""
    return (
        f"sidenet looks in the folder given with --data, then in the folder named by ${SST2_ENV_VAR}, "
        f"then in {sst2_cache_dir()}, for GLUE's train.tsv and dev.tsv (a header naming 'sentence' and "
        "'label'), and finally tries `datasets.load_dataset('glue', 'sst2')`, which needs `pip install "
        "datasets` and the internet. Download SST-2 from https://gluebenchmark.com/tasks into a folder and "
        f"pass it with --data (or set {SST2_ENV_VAR})."
    )


def load_sst2(split: str, data_dir: str | Path | None = None, download: bool = True) -> TextDataset:
    """Load SST-2's ``"train"`` (67,349 phrases) or ``"dev"`` (872 sentences) file (see module doc).

    A folder named by ``data_dir`` or ``$SIDENET_SST2_DIR`` must hold the file: a wrong name is an
    error, not a reason to download.

    Raises:
        DataNotFoundError: with instructions, when no source works.
    """
    if split not in _SST2_FILES:
        raise ValueError(f"split must be one of {sorted(_SST2_FILES)}, got {split!r}")
    name = _SST2_FILES[split]
    named = os.environ.get(SST2_ENV_VAR)
    folder, source = None, ""
    if data_dir is not None:
        folder, source = Path(data_dir), f"--data {data_dir}"
    elif named:
        folder, source = Path(named), f"${SST2_ENV_VAR}={named}"
    if folder is not None:
        if not (folder.expanduser() / name).is_file():
            raise DataNotFoundError(f"{source} does not hold the SST-2 file {name}. {_sst2_help()}")
        return read_sst2_tsv(folder.expanduser() / name)
    if (sst2_cache_dir() / name).is_file():
        return read_sst2_tsv(sst2_cache_dir() / name)
    found = _sst2_from_datasets(split) if download else None
    if found is not None:
        return found
    raise DataNotFoundError(f"SST-2 was not found. {_sst2_help()}")


def sst2_datasets(
    data_dir: str | Path | None = None, download: bool = True, seed: int = 0, val_size: int = SST2_VALIDATION_SIZE
) -> dict[str, TextDataset]:
    """The three data partitions: ``train`` (SST-2 train less ``val``), ``val`` (held out of train, for
    choices) and ``test`` (SST-2 dev; GLUE's test file has no labels). Train holds short phrases, dev
    full sentences: a threshold chosen on ``val`` transfers to ``test`` only as far as they are alike."""
    full = load_sst2("train", data_dir, download)
    train, val = _holdout(len(full), val_size, seed)
    return {"train": full.subset(train), "val": full.subset(val), "test": load_sst2("dev", data_dir, download)}


# The names before "split" came to mean only a cut MainNet (sidenet.MainNetSplit).
fashion_mnist_splits = fashion_mnist_datasets
sst2_splits = sst2_datasets
