"""Loader plumbing the library runs on, whatever the dataset: seeded loaders, prefixes and halves of a
loader, ``(inputs, labels)`` pairs out of tuple or dict batches, and sentences batched with dynamic
padding (:class:`TextDataset`, :class:`TextCollator`, :func:`length_grouped`).

The demo's datasets (Fashion-MNIST, SST-2) live in :mod:`sidenet.datasets`; nothing here reads files.
Text batches are dicts of ``input_ids``, ``attention_mask`` and ``labels``, tokenised by the MainNet's
own tokenizer and padded per batch to their longest sentence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = [
    "make_loader",
    "prefix_loader",
    "split_loader",
    "iter_batches",
    "batch_count",
    "length_grouped",
    "TextDataset",
    "TextCollator",
]


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
    them when ``limit`` is None): for quick trials on part of a data partition."""
    if limit is None:
        return loader
    if limit < 1:
        raise ValueError(f"the sample limit must be at least 1, got {limit}")
    keep = range(min(limit, len(loader.dataset)))  # type: ignore[arg-type]
    return make_loader(Subset(loader.dataset, keep), loader.batch_size or 1, collate_fn=loader.collate_fn)


def split_loader(loader: DataLoader, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Two loaders over disjoint random halves of ``loader``'s dataset, with its batch size and
    collate function (e.g. to calibrate on one half of a data partition and evaluate on the other)."""
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


# -- sentences ----------------------------------------------------------------------------------------


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
