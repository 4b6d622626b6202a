"""SST-2 loading (GLUE TSV), the held-out split, and tokenised batches with dynamic padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sidenet.data import (
    DataNotFoundError,
    TextCollator,
    TextDataset,
    load_sst2,
    make_loader,
    read_sst2_tsv,
    sst2_splits,
)

TRAIN = "label\tsentence\n0\thide new secretions\n1\ta warm , funny film\n0\tdull\n1\tgreat acting\n1\tfun\n"
DEV = "sentence\tlabel\nit 's a charming and often affecting journey .\t1\nunflinchingly bleak .\t0\n"
WORDS = "a warm funny film great acting fun dull hide new secretions it 's charming and often affecting journey ."


@pytest.fixture()
def sst2_dir(tmp_path: Path) -> Path:
    (tmp_path / "train.tsv").write_text(TRAIN)
    (tmp_path / "dev.tsv").write_text(DEV)
    return tmp_path


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - a transformers tokenizer
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


def test_sst2_splits_hold_val_out_of_train(sst2_dir: Path) -> None:
    splits = sst2_splits(sst2_dir, val_size=2)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [3, 2, 2]
    assert set(splits["train"].sentences).isdisjoint(splits["val"].sentences)
    assert splits["test"].sentences == read_sst2_tsv(sst2_dir / "dev.tsv").sentences
    assert sst2_splits(sst2_dir, val_size=2)["val"].sentences == splits["val"].sentences  # seeded


def test_collator_pads_per_batch_and_truncates(tokenizer) -> None:  # noqa: ANN001
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
    import sidenet.data as data

    monkeypatch.setattr(data, "SST2_DIR", tmp_path / "shared")
    monkeypatch.setenv("SIDENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_sst2_from_datasets", lambda split: None)  # no `datasets`, or no internet
    with pytest.raises(DataNotFoundError, match=r"--data.*pip install datasets"):
        load_sst2("train")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "dev.tsv").write_text(DEV)
    assert len(load_sst2("dev")) == 2  # the shared folder beside the repository is found without --data
