"""Compatibility: ``sidenet.data`` was one module for loader plumbing and the demo's datasets. They now
live apart, in :mod:`sidenet.loaders` (core: loaders, batches, text collation) and
:mod:`sidenet.datasets` (demo: Fashion-MNIST and SST-2); this module re-exports both so that code
written against ``sidenet.data`` (``from sidenet.data import TextCollator, make_loader``) keeps working.
New code should import from the two modules directly.
"""

from __future__ import annotations

from sidenet.datasets import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    SST2_CLASSES,
    SST2_ENV_VAR,
    SST2_VALIDATION_SIZE,
    VALIDATION_SIZE,
    DataNotFoundError,
    fashion_mnist_datasets,
    fashion_mnist_splits,
    find_fashion_mnist,
    load_fashion_mnist,
    load_sst2,
    normalize_fashion_mnist,
    read_idx,
    read_sst2_tsv,
    sst2_cache_dir,
    sst2_datasets,
    sst2_splits,
)
from sidenet.loaders import (
    TextCollator,
    TextDataset,
    batch_count,
    iter_batches,
    length_grouped,
    make_loader,
    prefix_loader,
    split_loader,
)

__all__ = [
    "DataNotFoundError",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "DEBIAN_FASHION_MNIST_DIR",
    "VALIDATION_SIZE",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "fashion_mnist_datasets",
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
    "SST2_ENV_VAR",
    "SST2_VALIDATION_SIZE",
    "sst2_cache_dir",
    "TextDataset",
    "TextCollator",
    "read_sst2_tsv",
    "load_sst2",
    "sst2_datasets",
    "sst2_splits",
]
