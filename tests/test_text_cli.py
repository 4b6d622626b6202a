"""The CLI on a tiny text task: fit, sweep and predict (sentences on the command line and from a file)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sidenet import cli
from sidenet.loaders import TextCollator, TextDataset, make_loader
from sidenet.tasks import TASKS, Sst2Task

transformers = pytest.importorskip("transformers")
runner = CliRunner()
WORDS = ["great", "fun", "warm", "dull", "bad", "boring", "film", "the", "a", "plot", "acting", "."]


def sentences(n: int, seed: int) -> TextDataset:
    """Random sentences labelled positive when they hold more of great/fun/warm than of dull/bad/boring."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(2, 12))
        score = sum(w in WORDS[:3] for w in words) - sum(w in WORDS[3:6] for w in words)
        texts.append(" ".join(words))
        labels.append(int(score > 0))
    return TextDataset(texts, labels)


class TinyTextTask(Sst2Task):
    """SST-2-shaped task with a random 3-layer BERT and 64 synthetic sentences per split."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "tinytext"
        tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
        tokenizer = transformers.BertTokenizer(vocab={token: i for i, token in enumerate(tokens)})
        self._collator = TextCollator(tokenizer, max_length=16)
        config = transformers.BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
        )
        torch.manual_seed(0)
        self._model = transformers.BertForSequenceClassification(config).eval()
        self._splits = {name: sentences(64, seed) for seed, name in enumerate(("train", "val", "test"))}

    def mainnet(self, data_dir=None, progress=True):
        return self._model

    def loaders(self, data_dir=None, batch_size=16):
        return {name: make_loader(ds, batch_size, collate_fn=self.collator) for name, ds in self._splits.items()}


@pytest.fixture()
def text_task(monkeypatch: pytest.MonkeyPatch) -> TinyTextTask:
    task = TinyTextTask()
    monkeypatch.setitem(TASKS, "tinytext", task)
    return task


def test_text_fit_sweep_predict(text_task: TinyTextTask, tmp_path: Path) -> None:
    out = tmp_path / "side"
    args = ["fit", "--task", "tinytext", "--tap", "1", "--out", str(out), "--epochs", "3", "--features", "mean", "-q"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "sidenet_config.json").read_text())
    assert config["tap"] == 1 and config["split_options"] == {"features": "mean"}

    result = runner.invoke(cli.app, ["sweep", "--sidenet", str(out), "--split", "test", "-q"])
    assert result.exit_code == 0, result.output
    assert "MainNet alone" in result.output

    file = tmp_path / "sentences.txt"
    file.write_text("a great warm film\n\nthe plot is dull .\n")
    result = runner.invoke(
        cli.app, ["predict", "--sidenet", str(out), "--threshold", "0", "great fun", "--file", str(file)]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("great fun\t") and "the plot is dull ." in lines[2]
    assert all("answered by SideNet" in line and line.split("\t")[1] in ("negative", "positive") for line in lines)


def test_text_tap_out_of_range_and_no_inputs(text_task: TinyTextTask, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["fit", "--task", "tinytext", "--tap", "3", "--out", str(tmp_path), "-q"])
    assert result.exit_code == 2 and "valid taps: 1, 2" in result.output
    result = runner.invoke(cli.app, ["predict", "--sidenet", str(tmp_path)])
    assert result.exit_code == 2 and "--file" in result.output


def test_text_cascade_priced_in_time_on_several_batches(text_task: TinyTextTask, tmp_path: Path) -> None:
    """``--cost time`` on text: the parts timed on four validation batches (their lengths differ), priced
    at their mean, and the saved timing says how many."""
    out = tmp_path / "timed"
    args = ["fit", "--task", "tinytext", "--taps", "1,2", "--out", str(out), "--epochs", "2", "--features", "mean"]
    result = runner.invoke(cli.app, [*args, "--max-drop", "1", "--cost", "time", "-q"])
    assert result.exit_code == 0, result.output
    timing = json.loads((out / "sidenet_config.json").read_text())["metadata"]["threshold_choice"]["part_seconds"]
    assert timing["batches"] == 4 and timing["batch_size"] == 16 and timing["rows"] == [1, 2, 4, 8, 16]
    assert "on 4 batches of 16" in result.output
