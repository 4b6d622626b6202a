"""SST-2 loading (GLUE TSV), where it is looked for, the held-out partition, and tokenised batches with
dynamic padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sidenet import datasets
from sidenet.datasets import DataNotFoundError, load_sst2, read_sst2_tsv, sst2_datasets, sst2_splits
from sidenet.loaders import TextCollator, TextDataset, make_loader

TRAIN = "label\tsentence\n0\thide new secretions\n1\ta warm , funny film\n0\tdull\n1\tgreat acting\n1\tfun\n"
DEV = "sentence\tlabel\nit 's a charming and often affecting journey .\t1\nunflinchingly bleak .\t0\n"
WORDS = "a warm funny film great acting fun dull hide new secretions it 's charming and often affecting journey ."


@pytest.fixture()
def sst2_dir(tmp_path: Path) -> Path:
    (tmp_path / "train.tsv").write_text(TRAIN)
    (tmp_path / "dev.tsv").write_text(DEV)
    return tmp_path


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS.split()))]
    return transformers.BertTokenizer(vocab={token: i for i, token in enumerate(tokens)})


def test_read_sst2_either_column_order(sst2_dir: Path) -> None:
    train = read_sst2_tsv(sst2_dir / "train.tsv")
    assert len(train) == 5 and train[1] == ("a warm , funny film", 1) and train.labels == [0, 1, 0, 1, 1]
    dev = read_sst2_tsv(sst2_dir / "dev.tsv")
    assert dev[1] == ("unflinchingly bleak .", 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("text\tlabel\nfoo\t1\n", "lacks 'sentence' and 'label'"),
        ("label\tsentence\n2\tfoo\n", "line 2"),
        ("label\tsentence\n1\tfoo\textra\n", "line 2"),
        ("label\tsentence\n", "no samples"),
    ],
)
def test_read_sst2_rejects_bad_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_sst2_tsv(path)


def test_load_sst2_from_folder_and_missing_folder(sst2_dir: Path, tmp_path: Path) -> None:
    assert len(load_sst2("dev", sst2_dir)) == 2
    with pytest.raises(DataNotFoundError, match="does not hold"):
        load_sst2("train", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be one of"):
        load_sst2("test", sst2_dir)


def test_sst2_datasets_hold_val_out_of_train(sst2_dir: Path) -> None:
    parts = sst2_datasets(sst2_dir, val_size=2)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [3, 2, 2]
    assert set(parts["train"].sentences).isdisjoint(parts["val"].sentences)
    assert parts["test"].sentences == read_sst2_tsv(sst2_dir / "dev.tsv").sentences
    assert sst2_datasets(sst2_dir, val_size=2)["val"].sentences == parts["val"].sentences  # seeded
    assert sst2_splits is sst2_datasets  # the name of earlier releases


def test_collator_pads_per_batch_and_truncates(tokenizer) -> None:
    data = TextDataset(["fun", "a warm funny film great acting", "dull", "great"], [1, 1, 0, 1])
    collate = TextCollator(tokenizer, max_length=5)
    batches = list(make_loader(data, batch_size=2, collate_fn=collate))
    first, second = batches
    assert set(first) >= {"input_ids", "attention_mask", "labels"}
    assert first["input_ids"].shape == (2, 5)  # [CLS] + 6 words + [SEP] truncated to 5
    assert second["input_ids"].shape == (2, 3)  # padded to its own longest: [CLS] word [SEP]
    assert first["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert torch.equal(second["labels"], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-empty list of sentences"):
        collate.encode([])
    with pytest.raises(ValueError, match="max_length"):
        TextCollator(tokenizer, max_length=1)


def test_load_sst2_explains_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIDENET_SST2_DIR", raising=False)
    monkeypatch.setenv("SIDENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "_sst2_from_datasets", lambda split: None)  # no `datasets`, or no internet
    with pytest.raises(DataNotFoundError, match=r"--data.*SIDENET_SST2_DIR.*cache.*pip install datasets") as info:
        load_sst2("train")
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    # Nothing beside the package or the repository is looked in: an installed sidenet has no checkout.
    assert "shared" not in str(info.value)
    (tmp_path / "cache" / "data" / "sst2").mkdir(parents=True)
    (tmp_path / "cache" / "data" / "sst2" / "dev.tsv").write_text(DEV)
    assert len(load_sst2("dev")) == 2  # sidenet's cache folder is found without --data


def test_load_sst2_from_the_environment_variable(
    sst2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "_sst2_from_datasets", lambda split: pytest.fail("downloaded"))
    monkeypatch.setenv("SIDENET_SST2_DIR", str(sst2_dir))
    assert len(load_sst2("dev")) == 2
    # --data wins over the variable; a variable naming a folder without the files is an error, not a download.
    with pytest.raises(DataNotFoundError, match="--data .*nowhere does not hold"):
        load_sst2("dev", tmp_path / "nowhere")
    monkeypatch.setenv("SIDENET_SST2_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataNotFoundError, match=r"\$SIDENET_SST2_DIR=.*empty does not hold the SST-2 file dev.tsv"):
        load_sst2("dev")


def test_real_sst2_passed_explicitly(sst2_data_dir: Path) -> None:
    """The real GLUE files (see tests/conftest.py for where they are found), passed as ``data_dir``."""
    parts = sst2_datasets(sst2_data_dir)
    assert {name: len(part) for name, part in parts.items()} == {"train": 65349, "val": 2000, "test": 872}
    assert set(parts["test"].labels) == {0, 1} and sum(parts["test"].labels) == 444
