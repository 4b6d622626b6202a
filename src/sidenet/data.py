"""Datasets used by the demo, the tests and the benchmarks: Fashion-MNIST (images) and SST-2 (text).

Fashion-MNIST is read from the official IDX gzip files, looked for in this order: a folder the user
names, Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``), sidenet's
cache, and finally torchvision's download (which needs the internet).

SST-2 is read from GLUE's TSV files (``train.tsv``, ``dev.tsv``: a header naming the ``sentence`` and
``label`` columns), looked for in a folder the user names, then ``../shared/data/sst2`` beside the
repository, then sidenet's cache, and finally the ``datasets`` library's ``glue/sst2`` (internet).
Text batches are dicts of ``input_ids``, ``attention_mask`` and ``labels``, tokenised by the
MainNet's own tokenizer and padded per batch to their longest sentence (see :class:`TextCollator`).
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

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
    "prefix_loader",
    "split_loader",
    "iter_batches",
    "batch_count",
    "length_grouped",
    "SST2_CLASSES",
    "SST2_DIR",
    "TextDataset",
    "TextCollator",
    "read_sst2_tsv",
    "load_sst2",
    "sst2_splits",
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
SST2_CLASSES = ("negative", "positive")
# The GLUE files shared beside a checkout of the repository (read in place, never copied).
SST2_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sst2"
SST2_VALIDATION_SIZE = 2000
_SST2_FILES = {"train": "train.tsv", "dev": "dev.tsv"}


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
    tensor = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)
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
    train, val = _holdout(len(full), VALIDATION_SIZE, seed)
    return {
        "train": TensorDataset(images[train], labels[train]),
        "val": TensorDataset(images[val], labels[val]),
        "test": load_fashion_mnist("test", data_dir, download),
    }


def _holdout(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of ``range(n)`` into (the rest, ``size`` held-out indices)."""
    if not 0 < size < n:
        raise ValueError(f"cannot hold out {size} of {n} samples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[size:], order[:size]


def make_loader(
    dataset: Dataset,
    batch_size: int = 256,
    shuffle: bool = False,
    seed: int = 0,
    collate_fn: Callable[[list], Any] | None = None,
) -> DataLoader:
    """A single-process DataLoader (in-memory data needs no workers), seeded when shuffling;
    ``collate_fn`` makes the batches (a :class:`TextCollator` for text)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate_fn)


def prefix_loader(loader: DataLoader, limit: int | None) -> DataLoader:
    """``loader`` over its first ``limit`` samples, with its batch size and collate function (all of
    them when ``limit`` is None): for quick trials on part of a split."""
    if limit is None:
        return loader
    if limit < 1:
        raise ValueError(f"the sample limit must be at least 1, got {limit}")
    keep = range(min(limit, len(loader.dataset)))  # type: ignore[arg-type]
    return make_loader(Subset(loader.dataset, keep), loader.batch_size or 1, collate_fn=loader.collate_fn)


def split_loader(loader: DataLoader, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Two loaders over disjoint random halves of ``loader``'s dataset, with its batch size and
    collate function (e.g. to calibrate on one half of a split and evaluate on the other)."""
    n = len(loader.dataset)  # type: ignore[arg-type]
    if n < 2:
        raise ValueError("cannot halve a dataset of fewer than 2 samples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    halves = (sorted(order[: n // 2]), sorted(order[n // 2 :]))
    size = loader.batch_size or 1
    return tuple(  # type: ignore[return-value]
        make_loader(Subset(loader.dataset, half), size, collate_fn=loader.collate_fn) for half in halves
    )


def iter_batches(loader: Iterable) -> Iterator[tuple[Any, torch.Tensor]]:
    """Yield ``(inputs, labels)`` from a loader of ``(inputs, labels, ...)`` tuples (vision) or of dicts
    (or BatchEncodings) holding a ``labels`` key beside the model inputs (text)."""
    for batch in loader:
        if isinstance(batch, Mapping):
            if "labels" not in batch:
                raise ValueError(f"a dict batch needs a 'labels' key; it has {sorted(batch)}")
            yield batch, batch["labels"]
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            yield batch[0], batch[1]
        else:
            raise ValueError("expected a loader of (inputs, labels) batches or dicts with a 'labels' key")


def batch_count(loader: Iterable) -> int | None:
    """Number of batches of ``loader`` when it knows it (for progress bars), else ``None``."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _sentence_lengths(dataset: Any) -> list[int] | None:
    """Character lengths of a :class:`TextDataset`'s sentences (through ``Subset``s), else None."""
    if isinstance(dataset, Subset):
        inner = _sentence_lengths(dataset.dataset)
        return None if inner is None else [inner[int(i)] for i in dataset.indices]
    sentences = getattr(dataset, "sentences", None)
    return [len(s) for s in sentences] if isinstance(sentences, list) else None


def length_grouped(loader: Iterable) -> Iterable:
    """``loader``'s samples in batches of sentences of similar length, for passes whose sample order
    does not matter (caching SideNet inputs). Dynamic padding pads each batch to its longest sentence;
    SST-2 train's phrases in file order make batches about three times longer than their content, and
    sorted batches almost none. Loaders of anything but sentences come back unchanged."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return loader
    lengths = _sentence_lengths(loader.dataset)
    if lengths is None:
        return loader
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    size = loader.batch_size
    batches = [order[start : start + size] for start in range(0, len(order), size)]
    return DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn)


# -- SST-2 ------------------------------------------------------------------------------------------


class TextDataset(Dataset):
    """Sentences and their integer labels; items are ``(sentence, label)`` pairs."""

    def __init__(self, sentences: Sequence[str], labels: Sequence[int]) -> None:
        if len(sentences) != len(labels):
            raise ValueError(f"{len(sentences)} sentences but {len(labels)} labels")
        self.sentences = list(sentences)
        self.labels = [int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.sentences[index], self.labels[index]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> TextDataset:
        """The samples ``indices``, in that order."""
        picked = [int(i) for i in indices]
        return TextDataset([self.sentences[i] for i in picked], [self.labels[i] for i in picked])


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


def _sst2_from_datasets(split: str) -> TextDataset | None:
    try:
        from datasets import load_dataset

        data = load_dataset("glue", "sst2", split="validation" if split == "dev" else split)
    except Exception:  # noqa: BLE001 - not installed or no internet; the caller explains
        return None
    return TextDataset(data["sentence"], data["label"])


def load_sst2(split: str, data_dir: str | Path | None = None, download: bool = True) -> TextDataset:
    """Load SST-2's ``"train"`` (67,349 phrases) or ``"dev"`` (872 sentences) split (see module doc).

    Raises:
        DataNotFoundError: with instructions, when no source works.
    """
    if split not in _SST2_FILES:
        raise ValueError(f"split must be one of {sorted(_SST2_FILES)}, got {split!r}")
    if data_dir is not None:
        path = Path(data_dir).expanduser() / _SST2_FILES[split]
        if not path.is_file():
            raise DataNotFoundError(f"--data {data_dir} does not hold the SST-2 file {_SST2_FILES[split]}")
        return read_sst2_tsv(path)
    candidates = [SST2_DIR, cache_dir() / "data" / "sst2"]
    for folder in candidates:
        if (folder / _SST2_FILES[split]).is_file():
            return read_sst2_tsv(folder / _SST2_FILES[split])
    found = _sst2_from_datasets(split) if download else None
    if found is not None:
        return found
    raise DataNotFoundError(
        f"SST-2 was not found. sidenet looks in the folder given with --data, then in {candidates[0]} and "
        f"{candidates[1]} for GLUE's train.tsv and dev.tsv (a header naming 'sentence' and 'label'), and "
        "finally tries `datasets.load_dataset('glue', 'sst2')`, which needs `pip install datasets` and the "
        "internet. Download SST-2 from https://gluebenchmark.com/tasks into a folder and pass it with --data."
    )


def sst2_splits(
    data_dir: str | Path | None = None, download: bool = True, seed: int = 0, val_size: int = SST2_VALIDATION_SIZE
) -> dict[str, TextDataset]:
    """``train`` (SST-2 train less ``val``), ``val`` (held out of train, for choices) and ``test``
    (SST-2 dev; GLUE's test split has no labels). Train holds short phrases, dev full sentences: a
    threshold chosen on ``val`` transfers to ``test`` only as far as they are alike."""
    full = load_sst2("train", data_dir, download)
    train, val = _holdout(len(full), val_size, seed)
    return {"train": full.subset(train), "val": full.subset(val), "test": load_sst2("dev", data_dir, download)}


class TextCollator:
    """Tokenise a list of ``(sentence, label)`` pairs into one batch, padded to its longest sentence.

    Args:
        tokenizer: the MainNet's own tokenizer (``AutoTokenizer.from_pretrained`` of its folder).
        max_length: longer sentences are truncated to this many tokens.
    """

    def __init__(self, tokenizer: Any, max_length: int = 64) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length

    def encode(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise sentences into ``input_ids``, ``attention_mask`` (and ``token_type_ids`` if the
        tokenizer makes them), padded to the longest."""
        if not sentences or not all(isinstance(s, str) for s in sentences):
            raise ValueError("expected a non-empty list of sentences (strings)")
        encoded = self.tokenizer(
            list(sentences), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return dict(encoded)

    def __call__(self, items: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        batch = self.encode([sentence for sentence, _ in items])
        batch["labels"] = torch.tensor([label for _, label in items], dtype=torch.long)
        return batch
